"""System programs the suite needs (Redis, PostgreSQL 15, podman, Chromium), installed from Debian on first use.

CI is a fresh machine, root, with the Debian mirror reachable: `apt-get update` runs once (the package lists of
a fresh image are empty), then `apt-get install`. A file lock keeps two pytest processes (or a test and
scripts/bench) from fighting over dpkg's own lock. Where the program cannot be installed (not root, no apt-get)
the caller gets a reason to skip loudly with.
"""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
from pathlib import Path

LOCK = Path("/tmp/tollgate-apt.lock")
UPDATED = Path("/tmp/tollgate-apt.updated")


def find(program: str, extra_dirs: tuple[str, ...] = ()) -> str | None:
    """The program's path: PATH, the sbin folders, then extra_dirs (globs, e.g. /usr/lib/postgresql/*/bin)."""
    if p := shutil.which(program):
        return p
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin", *extra_dirs):
        for folder in sorted(glob.glob(d), reverse=True):
            if os.access(p := os.path.join(folder, program), os.X_OK):
                return p
    return None


def ensure(program: str, packages: list[str], extra_dirs: tuple[str, ...] = ()) -> str:
    """The path of `program`, apt-installing `packages` first if it is missing. Raises RuntimeError (with the
    reason and the command to run by hand) when it cannot be had."""
    if p := find(program, extra_dirs):
        return p
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"{program} is not installed and this is not a root Debian machine; install it with "
                           f"`sudo apt-get install -y {' '.join(packages)}`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing the same thing right now
        if p := find(program, extra_dirs):
            return p
        if not UPDATED.exists():
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            UPDATED.touch()
        r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env,
                           capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(packages)} failed:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
    if p := find(program, extra_dirs):
        return p
    raise RuntimeError(f"{program} is still missing after apt-get install {' '.join(packages)}")

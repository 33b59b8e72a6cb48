"""The running gateway's live state, published as a small JSON file beside the ledger.

Budget reservations exist only in the gateway's memory; `tollgate budgets` (another process) reads
them from here. Written atomically every second or so, mode 0600.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("tollgate")
FRESH = 10.0  # seconds after which a status file is taken to be from a gateway that is gone


def status_path(db_path: str) -> str:
    return str(db_path) + ".status.json"


def write_status(path: str, status: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(status, f, default=str)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("tollgate: cannot write %s: %s", path, e)


def read_status(path: str) -> dict[str, Any] | None:
    """The status a live gateway wrote, or None when there is none or it is stale."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or time.time() - float(data.get("written_at", 0)) > FRESH:
        return None
    return data

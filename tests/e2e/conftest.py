import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for standin

from standin import Standin  # noqa: E402

from .harness import REAL_KEYS, Gateway, Proc, base_policy  # noqa: E402


@pytest.fixture(scope="session")
def standin():
    s = Standin(real_keys=dict(REAL_KEYS))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def confdir(tmp_path_factory):
    """One mitmproxy CA for the whole run (generating one takes a moment)."""
    return tmp_path_factory.mktemp("confdir")


@pytest.fixture
def make_gateway(tmp_path, standin, confdir):
    started = []

    def make(policy_update=None, name="gw", extra_args=None, program="mitmdump") -> Gateway:
        pol = base_policy(standin.port, tmp_path / name / "usage.duckdb")
        if policy_update:
            policy_update(pol)
        gw = Gateway(tmp_path / name, pol, confdir, extra_args, program=program).start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, standin, confdir):
    """A shared gateway for tests that only add rows (module scope: one mitmdump per file)."""
    d = tmp_path_factory.mktemp("gw")
    gw = Gateway(d, base_policy(standin.port, d / "usage.duckdb"), confdir).start()
    yield gw
    gw.stop()


@pytest.fixture
def procs():
    """Start command-line processes with procs.start(args, log_file, env=…, cwd=…); all are stopped after."""
    started: list[Proc] = []

    class Procs:
        def start(self, args, log_file, env=None, cwd=None) -> Proc:
            p = Proc([str(a) for a in args], log_file, env=env, cwd=cwd)
            started.append(p)
            return p

    yield Procs()
    for p in started:
        p.stop()

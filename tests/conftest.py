import os
import sys

import pytest

import model  # noqa: F401  (first, so OpenBLAS is loaded before mlx.core; see model/_blas.py)

_exit = {}


@pytest.fixture(scope="module")
def engine():
    """The tiny fixture model's engine, for the HTTP tests (modules with other needs define their own)."""
    from server_harness import tiny_engine

    e = tiny_engine()
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    """The app over `engine` on a real socket."""
    from server_harness import ServerThread, tiny_app

    with ServerThread(tiny_app(engine)) as srv:
        yield srv


def pytest_sessionfinish(session, exitstatus):
    _exit["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # A process that ran MLX on a second thread (the engine's) can abort in MLX's own teardown
    # at interpreter exit; leave with pytest's status once everything has been reported.
    if "status" in _exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit["status"])

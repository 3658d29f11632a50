import os
import sys

import pytest

import model  # noqa: F401  (first, so OpenBLAS is loaded before mlx.core; see model/_blas.py)

_exit = {}


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

"""OpenBLAS preloading on Linux: used when installed, off on request, and numerically sound."""

import os
import subprocess
import sys

import numpy as np
import pytest

PROBE = (
    "import model, mlx.core as mx, numpy as np; print(model._blas.loaded);"
    "a = np.random.default_rng(0).normal(size=(300, 200)).astype(np.float32);"
    "b = np.random.default_rng(1).normal(size=(200, 100)).astype(np.float32);"
    "np.save('{out}', np.array(mx.array(a) @ mx.array(b)))"
)


def probe(tmp_path, setting):
    out = tmp_path / f"{setting}.npy"
    env = {**os.environ, "DELTASERVE_OPENBLAS": setting}
    res = subprocess.run([sys.executable, "-c", PROBE.format(out=out)], env=env, capture_output=True, text=True,
                         check=True)
    return res.stdout.strip(), np.load(out)


@pytest.mark.skipif(sys.platform != "linux", reason="the preload only applies to Linux")
def test_openblas_preload_when_installed_and_off_on_request(tmp_path):
    a = np.random.default_rng(0).normal(size=(300, 200)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(200, 100)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    loaded, on = probe(tmp_path, "1")
    off_name, off = probe(tmp_path, "0")
    assert off_name == "None"
    for result in (on, off):
        assert np.abs(result - ref).max() < 1e-3
    if loaded == "None":
        pytest.skip("no OpenBLAS installed on this machine (Debian: libopenblas0-pthread)")
    assert "openblas" in loaded

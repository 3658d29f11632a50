"""On Linux the mlx[cpu] wheel links the reference BLAS (~5 GFLOP/s fp32 matmul here). When an
OpenBLAS is installed (Debian: libopenblas0-pthread), loading it into the global symbol scope
before MLX loads makes MLX's BLAS calls resolve to it (~50-190 GFLOP/s here).
Set DELTASERVE_OPENBLAS=0 to keep the reference BLAS, or to a path to choose the library."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: str | None = None


def preload_openblas() -> str | None:
    """Returns the library loaded, or None (not Linux, disabled, too late, or none installed)."""
    global loaded
    setting = os.environ.get("DELTASERVE_OPENBLAS", "1")
    if loaded or sys.platform != "linux" or setting == "0" or "mlx.core" in sys.modules:
        return loaded
    names = [setting] if setting not in ("1", "") else [ctypes.util.find_library("openblas"), *_CANDIDATES]
    for name in filter(None, names):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        return loaded
    return None

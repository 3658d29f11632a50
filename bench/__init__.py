"""Benchmarks against mlx-lm; run each as a module from the repository root (`python -m bench.run_all`)."""

import model  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx.core, see model/_blas.py)

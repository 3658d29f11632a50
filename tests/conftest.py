import model  # noqa: F401  (first, so OpenBLAS is loaded before mlx.core; see model/_blas.py)

"""deltaserve's engine and OpenAI-compatible HTTP server."""

import model  # noqa: F401,E402  (loads OpenBLAS before mlx.core where available; see model/_blas.py)

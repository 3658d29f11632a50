import sys

import model  # noqa: F401  (first: loads OpenBLAS before mlx.core on Linux)

from .cli import main

sys.exit(main())

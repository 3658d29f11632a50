"""GGUF and HF checkpoints -> mixed-precision MLX checkpoint directories (see convert.pipeline)."""

from .errors import ConvertError
from .pipeline import cached_conversion, convert

__all__ = ["ConvertError", "cached_conversion", "convert"]

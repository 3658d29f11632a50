"""deltaserve's MLX implementation of the Qwen3.5 hybrid models (dense and MoE)."""

from ._blas import preload_openblas

preload_openblas()  # before anything imports mlx.core

# ruff: noqa: E402

from .cache import Cache
from .config import ModelConfig, ModelLoadError
from .loader import load, load_model, load_tokenizer
from .qwen3_5 import Model

__all__ = ["Cache", "Model", "ModelConfig", "ModelLoadError", "load", "load_model", "load_tokenizer"]

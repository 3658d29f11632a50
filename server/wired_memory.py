"""MLX's wired-memory limit, set once at start so that the model and the memory budget stay
resident on Metal (mlx-lm's server does the same; without it long sessions page GPU memory out,
and macOS can panic: ml-explore/mlx#3186). Backends without the notion (CPU, CUDA) are left alone."""

from __future__ import annotations

import logging

import mlx.core as mx
from mlx.utils import tree_flatten

log = logging.getLogger("deltaserve")
_MB = 1 << 20


def plan(model_bytes: int, budget_bytes: int, device_info: dict) -> tuple[int | None, str | None]:
    """(wired limit or None for a backend without one, warning or None). The limit covers the
    model and the budget, never more than the working set Metal recommends for this machine."""
    recommended = device_info.get("max_recommended_working_set_size")
    if not recommended:
        return None, None
    want = model_bytes + budget_bytes
    if model_bytes > 0.9 * recommended:
        return recommended, (f"the model needs {model_bytes // _MB} MB, close to the {recommended // _MB} MB Metal "
                             "recommends as this machine's working set: generation can be slow")
    if want > recommended:
        return recommended, (f"the model ({model_bytes // _MB} MB) and --memory-budget ({budget_bytes // _MB} MB) "
                             f"exceed the {recommended // _MB} MB Metal recommends as this machine's working set; "
                             "a lower --memory-budget keeps them resident")
    return want, None


def set_wired_limit(model, budget_bytes: int) -> int | None:
    """Applies `plan` to this machine; the limit set, or None where the backend has none."""
    try:  # the wired limit is Metal's notion: another backend's device info is not asked
        info = mx.device_info() if mx.metal.is_available() else {"device_name": "not Metal"}
    except Exception:  # a backend without device information
        info = {}
    model_bytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    limit, warning = plan(model_bytes, budget_bytes, info)
    if limit is None:
        log.debug("no wired-memory limit on this backend (%s)", info.get("device_name", "unknown device"))
        return None
    if warning:
        log.warning(warning)
    mx.set_wired_limit(limit)
    log.info("MLX wired-memory limit %d MB (model %d MB + memory budget %d MB)", limit // _MB,
             model_bytes // _MB, budget_bytes // _MB)
    return limit

"""What `deltaserve serve [MODEL]` loads: an MLX or HF checkpoint directory as it is, a GGUF file
converted once into a cache directory (reused afterwards), a Hugging Face repo id (fetched by
server.hub, then either of those), or the embedded default model."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from . import hub

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$")
QUANT_OPTIONS = ("quantize", "q_bits", "q_group_size", "q_recipe", "imatrix_path")


class ModelSourceError(Exception):
    """The MODEL argument cannot be served; the message says why (the CLI exits non-zero)."""


def default_model_path() -> Path:
    """The embedded demo model (model/demo/deltaserve-demo.gguf), converted on first use like any GGUF."""
    from model.demo import DEMO_GGUF

    if not DEMO_GGUF.is_file():
        raise ModelSourceError(f"the embedded demo model {DEMO_GGUF} is missing from this installation "
                               "(rebuild it with: python -m demo.build), or pass a MODEL path")
    return DEMO_GGUF


def first_gguf_part(path: Path) -> Path:
    """A split GGUF is named by its first part; any part given leads there."""
    m = _SPLIT.match(path.name)
    if not m or m["part"] == "00001":
        return path
    first = path.with_name(f"{m['stem']}-00001-of-{m['total']}.gguf")
    if not first.exists():
        raise ModelSourceError(f"{path}: a split GGUF part; its first part {first.name} is missing")
    return first


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _convert(path: Path, options: dict, cache_root: Optional[Path]) -> Path:
    from convert import ConvertError, cached_conversion

    print(f"deltaserve: preparing {path} (converted on first use, then reused from the cache)...",
          file=sys.stderr, flush=True)
    try:
        return Path(cached_conversion(path, cache_root=cache_root, **options))
    except ConvertError as e:
        raise ModelSourceError(str(e)) from None


def _is_mlx_dir(path: Path) -> bool:
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "quantization" in config or "quantization_config" in config and "bits" in config["quantization_config"]


def _local_or_hub(arg: str, revision: Optional[str], fetch, what: str) -> Path:
    """A local path that exists wins; otherwise ORG/NAME[:TAG] is a Hugging Face repo."""
    path = Path(arg).expanduser()
    if path.exists():
        return path
    ref = hub.parse_ref(arg)
    if ref is None:
        raise ModelSourceError(f"{arg}: no such file or directory ({what})")
    try:
        return fetch(ref, revision)
    except hub.HubError as e:
        raise ModelSourceError(str(e)) from None


def resolve_model(arg: Optional[str], options: Optional[dict] = None, cache_root: Optional[Path] = None,
                  revision: Optional[str] = None) -> Path:
    """MODEL argument -> a directory model.load can read. options: convert flags (None = unset);
    revision: of a hub MODEL (and of an --imatrix-path naming the same repo)."""
    options = {k: v for k, v in (options or {}).items() if v not in (None, False)}
    if revision and (arg is None or Path(arg).expanduser().exists()):
        raise ModelSourceError("--revision applies only to a Hugging Face repo id given as MODEL")
    if arg is None:
        path = default_model_path()
    else:
        path = _local_or_hub(arg, revision, hub.model_path, "MODEL is a local MLX or HF directory, a GGUF "
                             "file, or a Hugging Face repo ORG/NAME[:TAG]")
    if "imatrix_path" in options:
        imatrix = str(options["imatrix_path"])
        ref = hub.parse_ref(imatrix)
        same_repo = ref is not None and arg is not None and ref.repo == arg.partition(":")[0]
        options["imatrix_path"] = _local_or_hub(imatrix, revision if same_repo else None, hub.file_path,
                                                "--imatrix-path is a local file or a Hugging Face ORG/NAME[:PATH]")
    if path.is_file():
        if not _is_gguf(path):
            raise ModelSourceError(f"{arg}: not a GGUF file; pass a GGUF file or a checkpoint directory")
        return _convert(first_gguf_part(path), options, cache_root)
    if not (path / "config.json").exists():
        ggufs = sorted(p for p in path.glob("*.gguf") if not _SPLIT.match(p.name) or "-00001-of-" in p.name)
        if len(ggufs) == 1:
            return _convert(ggufs[0], options, cache_root)
        raise ModelSourceError(f"{arg}: no config.json here (and not exactly one GGUF file)")
    wants_quant = any(k in options for k in QUANT_OPTIONS)
    if wants_quant and not _is_mlx_dir(path):
        return _convert(path, options, cache_root)
    return path

"""A runtime install has no torch: `python -m convert convert` on a GGUF in a process where torch is not
installed (the import system finds neither the module nor its distribution) writes what the
conversion writes in this process, byte for byte: the same tensors, tokenizer files and configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fixtures import get_fixture

from convert import convert

REPO = Path(__file__).resolve().parents[1]

# PathFinder, the finder of everything installed, with torch taken out: find_spec("torch") is None and
# importlib.metadata has no torch distribution, as where it was never installed (transformers and
# huggingface_hub ask both before deciding torch is there).
WITHOUT_TORCH = """
import importlib.util, sys
from importlib.machinery import PathFinder

HIDDEN = {"torch", "torchgen", "functorch"}

class WithoutTorch(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else super().find_spec(name, path, target)

    @staticmethod
    def find_distributions(*args, **kwargs):
        return (d for d in PathFinder.find_distributions(*args, **kwargs)
                if (d.metadata["Name"] or "").lower() not in HIDDEN)

sys.meta_path[:] = [WithoutTorch if f is PathFinder else f for f in sys.meta_path]
sys.path_importer_cache.clear()
try:
    import torch
    sys.exit("torch is still importable")
except ModuleNotFoundError:
    pass

from convert.cli import main

code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_gguf_conversion_without_torch_matches_the_in_process_one(tmp_path):
    gguf = get_fixture("dense_r2_tied").gguf_path()
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "convert", "--input", str(gguf),
                           "--output", str(tmp_path / "no_torch"), "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = convert(gguf, tmp_path / "in_process", progress=False)
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in (tmp_path / "no_torch").iterdir()) == names
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"} <= set(names)
    for name in names:
        assert (tmp_path / "no_torch" / name).read_bytes() == (expected / name).read_bytes(), name

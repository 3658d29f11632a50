"""Interrupt a conversion (SIGKILL mid-way), rerun it, and get the bytes of an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import get_fixture

from convert import convert
from model import ModelLoadError, load_model

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(quantize=True, q_recipe="unsloth", shard_size_bytes=2_000_000)

KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import model
from convert import convert

def progress(status):
    if status.done_tensors >= {after}:
        os.kill(os.getpid(), signal.SIGKILL)

convert({src!r}, {out!r}, progress=progress, **{options!r})
"""


def checksums(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_killed_conversion_resumes_to_identical_output(tmp_path):
    src = str(get_fixture("moe_r4").gguf_path())
    whole = convert(src, tmp_path / "whole", progress=False, **OPTIONS)
    shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
    assert len(shards) >= 4

    out = tmp_path / "killed"
    code = KILLER.format(repo=str(REPO), after=90, src=src, out=str(out), options=OPTIONS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == -signal.SIGKILL, done.stderr
    finished = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert 0 < len(finished) < len(shards)
    assert not (out / "config.json").exists()
    with pytest.raises(ModelLoadError):
        load_model(out)
    stamps = {name: os.stat(out / name).st_mtime_ns for name in finished}

    convert(src, out, progress=False, **OPTIONS)
    assert checksums(out) == checksums(whole)
    assert {name: os.stat(out / name).st_mtime_ns for name in finished} == stamps  # not rewritten
    assert not list(out.glob(".*.partial"))
    load_model(out)

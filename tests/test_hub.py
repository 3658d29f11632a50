"""Hugging Face repo ids as MODEL: the GGUF tag selector over file listings (llama.cpp's `-hf REPO:TAG`
rules), and resolution through huggingface_hub's own cache lookup, offline, from a cache built here in
its documented layout (models--ORG--NAME/{blobs,snapshots/COMMIT,refs})."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import openai
import pytest
from fixtures import get_fixture
from fixtures.ports import free_port
from test_server_cli import SEED_FLAGS, cli, wait_healthy

from server import hub
from server.model_source import ModelSourceError, resolve_model

UNSLOTH = [  # the layout of unsloth/Qwen3.5-397B-A17B-GGUF, shortened
    ".gitattributes", "README.md", "imatrix_unsloth.gguf_file", "mmproj-BF16.gguf",
    *(f"BF16/Qwen3.5-397B-A17B-BF16-0000{i}-of-00003.gguf" for i in (1, 2, 3)),
    *(f"Q4_K_M/Qwen3.5-397B-A17B-Q4_K_M-0000{i}-of-00002.gguf" for i in (2, 1)),
    *(f"UD-Q4_K_XL/Qwen3.5-397B-A17B-UD-Q4_K_XL-0000{i}-of-00005.gguf" for i in range(1, 6)),
    "Qwen3.5-397B-A17B-Q8_0.gguf", "Qwen3.5-397B-A17B-UD-IQ1_S.gguf",
]


# ---------------------------------------------------------------- the selector, over listings

@pytest.mark.parametrize("tag,first,count", [
    ("BF16", "BF16/Qwen3.5-397B-A17B-BF16-00001-of-00003.gguf", 3),
    ("bf16", "BF16/Qwen3.5-397B-A17B-BF16-00001-of-00003.gguf", 3),
    ("UD-Q4_K_XL", "UD-Q4_K_XL/Qwen3.5-397B-A17B-UD-Q4_K_XL-00001-of-00005.gguf", 5),
    ("q4_k_xl", "UD-Q4_K_XL/Qwen3.5-397B-A17B-UD-Q4_K_XL-00001-of-00005.gguf", 5),
    ("Q4_K_M", "Q4_K_M/Qwen3.5-397B-A17B-Q4_K_M-00001-of-00002.gguf", 2),
    ("UD-IQ1_S", "Qwen3.5-397B-A17B-UD-IQ1_S.gguf", 1),
    # a tag may also be a file's path; a later part of a split GGUF leads to all of it
    ("bf16/qwen3.5-397b-a17b-bf16-00002-of-00003.gguf", "BF16/Qwen3.5-397B-A17B-BF16-00001-of-00003.gguf", 3),
])
def test_tag_picks_every_part_of_its_gguf_first_part_first(tag, first, count):
    files, note = hub.select_gguf(UNSLOTH, tag, "unsloth/Q")
    assert files[0] == first and len(files) == count and files == sorted(files)
    assert len({hub.split_info(f).prefix for f in files}) == 1
    assert note == f"unsloth/Q: using {first}"


def test_without_a_tag_q4_k_m_then_q8_0_then_the_first_model_gguf():
    files, note = hub.select_gguf(UNSLOTH, None, "r")
    assert files == ["Q4_K_M/Qwen3.5-397B-A17B-Q4_K_M-00001-of-00002.gguf",
                     "Q4_K_M/Qwen3.5-397B-A17B-Q4_K_M-00002-of-00002.gguf"]
    assert "no :TAG given" in note and "Q4_K_M" in note
    no_q4 = [f for f in UNSLOTH if "Q4_K_M" not in f]
    assert hub.select_gguf(no_q4, None)[0] == ["Qwen3.5-397B-A17B-Q8_0.gguf"]
    others = ["z/m-BF16.gguf", "mmproj-F16.gguf", "a/m-IQ2_XS-00001-of-00002.gguf", "a/m-IQ2_XS-00002-of-00002.gguf"]
    files, note = hub.select_gguf(others, None, "r")
    assert files == others[2:] and "no Q4_K_M or Q8_0" in note


def test_sidecar_ggufs_are_never_the_model():
    files = ["a/mmproj-BF16.gguf", "b/imatrix-BF16.gguf", "c/mtp-BF16.gguf", "d/model-BF16.gguf"]
    assert hub.select_gguf(files, "BF16")[0] == ["d/model-BF16.gguf"]


def test_a_tag_is_followed_by_a_dot_or_dash_so_q4_k_does_not_find_q4_k_m():
    with pytest.raises(hub.HubError, match="no GGUF file matches the tag 'Q4_K'"):
        hub.select_gguf(UNSLOTH, "Q4_K", "r")


def test_an_unknown_tag_lists_the_available_ones():
    with pytest.raises(hub.HubError) as e:
        hub.select_gguf(UNSLOTH, "Q3_K_S", "unsloth/Q")
    assert str(e.value) == ("unsloth/Q: no GGUF file matches the tag 'Q3_K_S'; available tags: "
                            "BF16, IQ1_S, Q4_K_M, Q4_K_XL, Q8_0")


def test_a_split_gguf_with_a_part_missing_is_refused():
    files = [f for f in UNSLOTH if "00002-of-00003" not in f]
    with pytest.raises(hub.HubError, match="part 2 of 3"):
        hub.select_gguf(files, "BF16")


def test_plan_prefers_safetensors_without_a_tag_and_gguf_with_one():
    both = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "README.md", "original/consolidated.safetensors", "m-Q4_K_M.gguf", "m-BF16.gguf"]
    kind, files, note = hub.plan(both, None, "org/m")
    assert kind == "safetensors" and "ORG/NAME:TAG" in note
    assert files == ["chat_template.jinja", "config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert hub.plan(both, "bf16", "org/m")[:2] == ("gguf", ["m-BF16.gguf"])
    assert hub.plan(both[:4], None, "org/m")[2] is None
    with pytest.raises(hub.HubError, match="org/m: no GGUF model files"):
        hub.plan(both[:4], "Q4_K_M", "org/m")
    with pytest.raises(hub.HubError, match="neither safetensors weights"):
        hub.plan(["README.md"], None, "org/m")


def test_select_file_by_path_or_the_one_imatrix():
    assert hub.select_file(UNSLOTH, "IMATRIX_unsloth.gguf_file") == "imatrix_unsloth.gguf_file"
    assert hub.select_file(UNSLOTH, None) == "imatrix_unsloth.gguf_file"
    with pytest.raises(hub.HubError, match="no file 'nope.dat'"):
        hub.select_file(UNSLOTH, "nope.dat", "r")
    with pytest.raises(hub.HubError, match="2 imatrix files"):
        hub.select_file(["a/imatrix.dat", "b/imatrix.dat"], None, "r")


@pytest.mark.parametrize("text,ref", [
    ("Qwen/Qwen3.5-35B-A3B", hub.HubRef("Qwen/Qwen3.5-35B-A3B")),
    ("unsloth/Qwen3.5-397B-A17B-GGUF:UD-Q4_K_XL", hub.HubRef("unsloth/Qwen3.5-397B-A17B-GGUF", "UD-Q4_K_XL")),
    ("org/repo:BF16/x-00001-of-00002.gguf", hub.HubRef("org/repo", "BF16/x-00001-of-00002.gguf")),
    ("gpt2", None), ("./models/x", None), ("/abs/path", None), ("a/b/c", None), ("~/m", None),
    ("org/a--b", None), ("org/-bad", None), ("org/x.git", None),
])
def test_hub_ids_follow_the_hubs_repo_id_rules(text, ref):
    assert hub.parse_ref(text) == ref


# ---------------------------------------------------------------- a local HF cache, offline

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for the subprocesses
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, when imported; this process imported it already
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_repo(cache: Path, repo: str, files: dict[str, Path], ref: str = "main") -> Path:
    """Put files into a local HF cache as huggingface_hub lays it out: content-addressed blobs,
    a snapshot per commit of relative symlinks, refs/REF naming the commit. Returns the snapshot."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    for rel, src in files.items():
        data = src.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snapshot


def checkpoint_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_an_hf_repo_resolves_to_its_cached_snapshot_at_a_revision(hf_cache):
    fx = get_fixture("moe_r4")
    main = cache_repo(hf_cache, "org/tiny", checkpoint_files(fx.hf_dir))
    v1 = cache_repo(hf_cache, "org/tiny", checkpoint_files(fx.hf_dir), ref="v1")
    assert main != v1
    assert resolve_model("org/tiny") == main
    assert resolve_model("org/tiny", revision="v1") == v1
    assert resolve_model("org/tiny", revision=v1.name) == v1  # a commit hash
    with pytest.raises(ModelSourceError, match="--revision applies only to a Hugging Face repo id"):
        resolve_model(str(fx.hf_dir), revision="v1")


def test_a_local_path_that_exists_wins_over_a_hub_id(hf_cache, tmp_path, monkeypatch):
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    shutil.copy(get_fixture("moe_r4").hf_dir / "config.json", tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)  # "org/tiny" is not in the HF cache: only the local directory can answer
    assert resolve_model("org/tiny") == Path("org/tiny")


def test_a_tagged_gguf_repo_resolves_to_the_tagged_file(hf_cache, capsys):
    gguf = get_fixture("dense_r2_tied").gguf_path()
    snapshot = cache_repo(hf_cache, "org/tiny-GGUF", {"tiny-BF16.gguf": gguf, "README.md": gguf.parent / "meta.json"})
    assert hub.model_path(hub.HubRef("org/tiny-GGUF", "bf16")) == snapshot / "tiny-BF16.gguf"
    assert hub.model_path(hub.HubRef("org/tiny-GGUF")) == snapshot / "tiny-BF16.gguf"
    assert "org/tiny-GGUF: using tiny-BF16.gguf (no :TAG given and no Q4_K_M or Q8_0 file)" in capsys.readouterr().err
    with pytest.raises(ModelSourceError, match=r"no GGUF file matches the tag 'Q4_K_M'; available tags: BF16 "
                                               r"\(in the local cache only"):
        resolve_model("org/tiny-GGUF:Q4_K_M")


def test_a_split_gguf_in_a_subfolder_is_converted_from_all_its_parts(hf_cache, tmp_path):
    from test_convert import rewrite_gguf

    from model import load_model

    fx = get_fixture("dense_r2_tied")
    rewrite_gguf(fx.gguf_path(), tmp_path / "tiny-BF16.gguf", split_max_tensors=12)
    parts = sorted(tmp_path.glob("tiny-BF16-*-of-*.gguf"))
    assert len(parts) >= 3
    cache_repo(hf_cache, "org/tiny-GGUF", {f"BF16/{p.name}": p for p in parts})
    out = resolve_model("org/tiny-GGUF:BF16", {"dtype": "float32"}, cache_root=tmp_path / "converted")
    import mlx.core as mx

    logits = np.array(load_model(out, dtype="float32")(mx.array(fx.prompt_ids)[None]).astype(mx.float32))[0]
    assert (logits.argmax(-1) == fx.ref_logits.argmax(-1)).all()  # transformers' reference


def test_an_imatrix_from_a_hub_repo_goes_to_the_converter(hf_cache, tmp_path):
    imatrix = tmp_path / "imatrix.gguf"
    imatrix.write_bytes(b"GGUF")  # a truncated file, so the converter's error shows which file it was given
    snapshot = cache_repo(hf_cache, "org/tiny-GGUF", {"imatrix_unsloth.gguf_file": imatrix})
    want = snapshot / "imatrix_unsloth.gguf_file"
    assert hub.file_path(hub.HubRef("org/tiny-GGUF", "imatrix_unsloth.gguf_file")) == want
    assert hub.file_path(hub.HubRef("org/tiny-GGUF")) == want
    gguf = get_fixture("dense_r2_tied").gguf_path()
    with pytest.raises(ModelSourceError, match=f"^{want}: "):
        resolve_model(str(gguf), {"quantize": True, "imatrix_path": "org/tiny-GGUF:imatrix_unsloth.gguf_file"},
                      cache_root=tmp_path / "converted")


def test_without_the_network_the_cache_still_answers(hf_cache, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    snapshot = cache_repo(hf_cache, "org/tiny", checkpoint_files(get_fixture("moe_r4").hf_dir))
    assert resolve_model("org/tiny") == snapshot
    with pytest.raises(ModelSourceError, match=r"org/absent is not in the local Hugging Face cache and the Hub "
                                               r"could not be reached \(.*`hf download org/absent` when online"):
        resolve_model("org/absent")


def test_a_repo_not_in_the_cache_exits_with_one_line_naming_it(hf_cache):
    proc = cli("serve", "org/absent-model", "--port", str(free_port()))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert out.strip().splitlines() == [
        "deltaserve serve: error: org/absent-model is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "fetch it with `hf download org/absent-model` or unset HF_HUB_OFFLINE"]


def test_a_path_that_is_no_hub_id_keeps_the_local_message(hf_cache, tmp_path):
    with pytest.raises(ModelSourceError, match="no such file or directory"):
        resolve_model(str(tmp_path / "a" / "b" / "c"))


# ---------------------------------------------------------------- the model card's command line

def test_the_model_cards_command_line_serves_the_repo_from_the_cache(hf_cache, tmp_path):
    from convert import cached_conversion

    repo = "jackzampolin/Qwen3.5-397B-A17B-unsloth-mlx-4bit"
    mlx_dir = cached_conversion(get_fixture("moe_r4").hf_dir, cache_root=tmp_path / "converted", quantize=True,
                                q_bits=4, progress=False)
    cache_repo(hf_cache, repo, checkpoint_files(mlx_dir))
    port = free_port()
    proc = cli("serve", repo, "--port", str(port), "--host", "127.0.0.1", *SEED_FLAGS)
    try:
        assert wait_healthy(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=repo, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.model == repo and 1 <= r.usage.completion_tokens <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"serving {repo} on http://127.0.0.1:{port}/v1" in out

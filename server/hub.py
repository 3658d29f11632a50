"""Hugging Face Hub repos as MODEL (and as --imatrix-path): `ORG/NAME` or `ORG/NAME:TAG`.

Which files a repo needs is decided by pure functions over its file listing (`plan`, `select_gguf`,
`select_file`); fetching is huggingface_hub's: its cache, progress bars, HF_TOKEN and HF_HUB_OFFLINE.
GGUF tags are matched as llama.cpp's `-hf REPO:TAG` matches them (common/download.cpp)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from convert.hf_reader import TOKENIZER_FILES

_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.](?P<tag>[A-Z0-9_]+)$", re.IGNORECASE)
# llama.cpp's sidecar files: GGUFs in a repo that are not the model
_SIDECARS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
# without a tag llama.cpp takes the first of these that exists, else the first model GGUF
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")
WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES)


class HubError(Exception):
    """A hub MODEL cannot be resolved; the message names the repo and what to do."""


@dataclass(frozen=True)
class HubRef:
    repo: str
    tag: Optional[str] = None


def parse_ref(text: str) -> Optional[HubRef]:
    """`ORG/NAME` or `ORG/NAME:TAG` by the Hub's repo-id rules, else None (not a hub id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, _, tag = str(text).partition(":")
    if repo.count("/") != 1:
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return HubRef(repo, tag or None)


# ---------------------------------------------------------------- selection over file listings

@dataclass(frozen=True)
class SplitInfo:
    prefix: str  # the path without `.gguf` and `-0000i-of-0000n`
    tag: str  # llama.cpp's quantisation tag, upper case ("" when the name has none)
    index: int
    count: int


def split_info(path: str) -> SplitInfo:
    stem = path[:-len(".gguf")] if path.lower().endswith(".gguf") else path
    index = count = 1
    if m := _SPLIT.match(stem):
        stem, index, count = m["prefix"], int(m["index"]), int(m["count"])
    m = _TAG.search(stem)
    return SplitInfo(stem, m["tag"].upper() if m else "", index, count)


def is_gguf_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return name.endswith(".gguf") and not any(s in name for s in _SIDECARS)


def _first_parts(files: list[str]) -> list[str]:
    return [f for f in sorted(files) if is_gguf_model(f) and split_info(f).index == 1]


def gguf_tags(files: list[str]) -> list[str]:
    return sorted({t for f in _first_parts(files) if (t := split_info(f).tag)})


def _parts(files: list[str], first: str) -> list[str]:
    """All parts of the split GGUF that `first` begins (just [first] when it is one file)."""
    info = split_info(first)
    if info.count == 1:
        return [first]
    parts = sorted(f for f in files if (s := split_info(f)).prefix == info.prefix and s.count == info.count)
    found = {split_info(p).index for p in parts}
    missing = [i for i in range(1, info.count + 1) if i not in found]
    if missing:
        raise HubError(f"{first}: part {missing[0]} of {info.count} of this split GGUF is missing")
    return parts


def _exact(files: list[str], name: str) -> Optional[str]:
    return next((f for f in sorted(files) if f.lower() == name.lower()), None)


def select_gguf(files: list[str], tag: Optional[str], repo: str = "the repo") -> tuple[list[str], str]:
    """The GGUF `tag` names (every part of a split one, first part first) and a note saying what was
    chosen. A tag is a file's path in the repo, or a quantisation matched anywhere in a path followed
    by `.` or `-` (case-insensitive: `BF16` finds `BF16/x-BF16-00001-of-00003.gguf`); without a tag,
    Q4_K_M, else Q8_0, else the first model GGUF in path order."""
    candidates = _first_parts(files)
    if not candidates:
        raise HubError(f"{repo}: no GGUF model files in this repo")
    if tag and (exact := _exact(files, tag)):
        parts = _parts(files, exact)
        return parts, f"{repo}: using {parts[0]}"
    for t in [tag] if tag else DEFAULT_TAGS:
        pattern = re.compile(re.escape(t) + "[.-]", re.IGNORECASE)
        if found := next((f for f in candidates if pattern.search(f)), None):
            how = "" if tag else f" (no :TAG given: {t}, as llama.cpp chooses; tags: {', '.join(gguf_tags(files))})"
            return _parts(files, found), f"{repo}: using {found}{how}"
    if tag:
        raise HubError(f"{repo}: no GGUF file matches the tag {tag!r}; available tags: "
                       f"{', '.join(gguf_tags(files)) or '(none found in the file names)'}")
    first = candidates[0]
    return _parts(files, first), f"{repo}: using {first} (no :TAG given and no Q4_K_M or Q8_0 file)"


def select_weights(files: list[str]) -> list[str]:
    """What serving (or converting) a safetensors checkpoint reads: top-level weights, config and
    tokenizer files; nothing else in the repo (READMEs, images, other formats) is fetched."""
    top = [f for f in sorted(files) if "/" not in f]
    return [f for f in top if f.endswith(".safetensors") or f in WEIGHT_FILES]


def plan(files: list[str], tag: Optional[str], repo: str = "the repo") -> tuple[str, list[str], Optional[str]]:
    """(kind, files to fetch, note): kind "gguf" (files[0] is the first part) or "safetensors".
    A tag asks for a GGUF; without one, safetensors weights win over GGUF files."""
    has_weights = any(f.endswith(".safetensors") and "/" not in f for f in files) and "config.json" in files
    if tag or not has_weights:
        if not tag and not _first_parts(files):
            raise HubError(f"{repo}: neither safetensors weights with a config.json nor GGUF files in this repo")
        chosen, note = select_gguf(files, tag, repo)
        return "gguf", chosen, note
    note = f"{repo}: serving its safetensors weights (ORG/NAME:TAG picks one of its GGUFs)" \
        if _first_parts(files) else None
    return "safetensors", select_weights(files), note


def select_file(files: list[str], name: Optional[str], repo: str = "the repo") -> str:
    """One file of a repo, e.g. an imatrix: `name` is its path in the repo (case-insensitive); without
    a name, the repo's one file with "imatrix" in its name."""
    if name:
        if found := _exact(files, name):
            return found
        raise HubError(f"{repo}: no file {name!r} in this repo")
    found = [f for f in sorted(files) if "imatrix" in f.rsplit("/", 1)[-1].lower()]
    if len(found) != 1:
        what = f"{len(found)} imatrix files ({', '.join(found)})" if found else "no imatrix file"
        raise HubError(f"{repo}: {what}; name one as {repo}:PATH")
    return found[0]


# ---------------------------------------------------------------- fetching

def _listing(repo: str, revision: Optional[str]) -> tuple[list[str], Optional[Path]]:
    """(files, None) from the Hub, or (files, snapshot dir) from the local cache when the Hub cannot
    be asked (HF_HUB_OFFLINE, no network, a token missing now), as huggingface_hub itself falls back."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        info = HfApi().model_info(repo, revision=revision)
        return [s.rfilename for s in info.siblings or []], None
    except Exception as e:  # whatever stopped the Hub answering (the HTTP library's errors vary): try the cache
        reason = e
    try:
        # allow_patterns=[]: the cached snapshot folder itself, whichever of the repo's files it holds
        snapshot = Path(snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=[]))
    except LocalEntryNotFoundError:
        raise HubError(_not_cached(repo, revision, reason)) from None
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return files, snapshot


def _not_cached(repo: str, revision: Optional[str], reason: Exception) -> str:
    from huggingface_hub.errors import (GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f" at revision {revision}" if revision else ""
    fetch = f"`hf download {repo}{' --revision ' + revision if revision else ''}`"
    if isinstance(reason, OfflineModeIsEnabled):
        return (f"{repo}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"fetch it with {fetch} or unset HF_HUB_OFFLINE")
    if isinstance(reason, GatedRepoError):
        return f"{repo} is gated: accept its terms on huggingface.co and set HF_TOKEN"
    if isinstance(reason, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r}"
    if isinstance(reason, RepositoryNotFoundError):
        return (f"{repo}: no such local file or directory, and no such model repo on the Hugging Face Hub "
                "(a private one needs HF_TOKEN)")
    return (f"{repo}{at} is not in the local Hugging Face cache and the Hub could not be reached "
            f"({type(reason).__name__}: {reason}); fetch it with {fetch} when online")


def _download(repo: str, revision: Optional[str], chosen: list[str], snapshot: Optional[Path]) -> Path:
    """The snapshot directory holding `chosen`, fetched unless the listing came from the cache."""
    from huggingface_hub import snapshot_download

    if snapshot is None:
        try:
            snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=chosen))
        except Exception as e:  # a download cut off, a disk full: the message says which
            raise HubError(f"{repo}: download failed ({type(e).__name__}: {e})") from None
    missing = [f for f in chosen if not (snapshot / f).is_file()]
    if missing:
        raise HubError(f"{repo}: {missing[0]} is missing from the cached snapshot {snapshot} "
                       f"({len(missing)} of {len(chosen)} files); fetch it with `hf download {repo}`")
    return snapshot


def _choose(select, files: list[str], snapshot: Optional[Path]):
    try:
        return select(files)
    except HubError as e:
        if snapshot is None:
            raise
        raise HubError(f"{e} (in the local cache only: the Hub could not be asked)") from None


def model_path(ref: HubRef, revision: Optional[str] = None) -> Path:
    """A hub MODEL as a local path: the snapshot directory (safetensors) or the GGUF's first part."""
    files, snapshot = _listing(ref.repo, revision)
    kind, chosen, note = _choose(lambda f: plan(f, ref.tag, ref.repo), files, snapshot)
    if note:
        print(f"deltaserve: {note}", file=sys.stderr, flush=True)
    snapshot = _download(ref.repo, revision, chosen, snapshot)
    return snapshot if kind == "safetensors" else snapshot / chosen[0]


def file_path(ref: HubRef, revision: Optional[str] = None) -> Path:
    """One file of a hub repo (`ORG/NAME:PATH`, or `ORG/NAME` for its one imatrix file)."""
    files, snapshot = _listing(ref.repo, revision)
    chosen = _choose(lambda f: select_file(f, ref.tag, ref.repo), files, snapshot)
    return _download(ref.repo, revision, [chosen], snapshot) / chosen

"""Where model weights live on a node, and how a model reference becomes a local directory.

A reference is a hub id, a local directory (diffusers/transformers layout), or a preset word such as
`tiny`. Everything ends as a local directory loaded with `from_pretrained`, so tests with tiny random
models exercise the same loading code as a cluster with real weights.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


class ModelLoadError(RuntimeError):
    """A model reference that cannot be turned into loadable weights (not found, offline, corrupt)."""


def cache_dir() -> Path:
    """Node-local cache for prepared weights: $ANIMA_CACHE, else ~/.cache/anima."""
    root = Path(os.environ.get("ANIMA_CACHE") or Path.home() / ".cache" / "anima")
    root.mkdir(parents=True, exist_ok=True)
    return root


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Build a directory under the cache exactly once per node, even with many actors racing for it.

    The directory is built under a temporary name and renamed, so a process killed mid-build never
    leaves a half-written model that later loads look at.
    """
    target = cache_dir() / name
    if (target / ".complete").exists():
        return target
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            build(staging)
            (staging / ".complete").touch()
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Download (or, offline, find) a hub repository's files and return the local snapshot directory."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=allow_patterns,
            cache_dir=os.environ.get("ANIMA_HF_CACHE") or None,
            local_files_only=offline(),
        )
    except Exception as exc:
        include = "".join(f" --include '{p}'" for p in allow_patterns or [])
        hint = (
            f" (HF_HUB_OFFLINE is set and it is not cached: fetch it with `huggingface-cli download {repo_id}"
            f"{include}` where the hub is reachable, or pass a local directory)"
            if offline()
            else ""
        )
        raise ModelLoadError(f"cannot fetch model {repo_id!r} from the hub{hint}: {exc}") from exc
    return Path(path)


def is_cached(ref: str, allow_patterns: list[str] | None = None) -> bool:
    """Whether a hub id's files (or a local directory) are on this node already, without downloading."""
    if Path(ref).expanduser().is_dir():
        return True
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            ref,
            allow_patterns=allow_patterns,
            cache_dir=os.environ.get("ANIMA_HF_CACHE") or None,
            local_files_only=True,
        )
    except Exception:
        return False
    return True


def resolve(
    ref: str, presets: dict[str, Callable[[], Path]], allow_patterns: list[str] | None = None
) -> Path:
    """Local directory for a reference: a preset word, an existing directory, or a hub id."""
    if ref in presets:
        return presets[ref]()
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelLoadError(f"model directory {ref!r} does not exist")
    return hub_snapshot(ref, allow_patterns)

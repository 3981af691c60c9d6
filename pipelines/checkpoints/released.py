"""Hub ids of released checkpoints as model references: downloaded and converted once per node.

`--backbone Doubiiu/DynamiCrafter_512` downloads the repository's Lightning file, converts it with
`anima convert`'s code into the node's model cache under its file lock (`model_cache.build_once`), and
loads the converted backbone; its adapter comes with it. With HF_HUB_OFFLINE=1 only what is cached is
used, and a missing file is a clear load error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines import model_cache

# Bump when the conversion's output changes, so that stale converted copies are not reused.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class Release:
    repo: str
    files: tuple[str, ...]
    family: str  # dynamicrafter (backbone + adapter), videocrafter1 (backbone), stylecrafter (adapter)
    variant: str | None = None


RELEASES: dict[str, Release] = {
    r.repo: r
    for r in (
        Release("Doubiiu/DynamiCrafter", ("model.ckpt",), "dynamicrafter", "256"),
        Release("Doubiiu/DynamiCrafter_512", ("model.ckpt",), "dynamicrafter", "512"),
        Release("Doubiiu/DynamiCrafter_1024", ("model.ckpt",), "dynamicrafter", "1024"),
        Release("Doubiiu/DynamiCrafter_512_Interp", ("model.ckpt",), "dynamicrafter", "512_interp"),
        Release("VideoCrafter/Text2Video-512", ("model.ckpt",), "videocrafter1"),
        Release("liuhuohuo/StyleCrafter", ("adapter_v1.pth", "temporal_v1_1.pth"), "stylecrafter"),
    )
}


def is_release(ref: str | None) -> bool:
    return ref in RELEASES


def _convert(release: Release, files: list[str], staging: Path) -> None:
    from pipelines.checkpoints import dynamicrafter, stylecrafter

    if release.family == "dynamicrafter":
        dynamicrafter.convert_checkpoint(files[0], str(staging), release.variant)
    elif release.family == "videocrafter1":
        stylecrafter.convert_videocrafter1(files[0], str(staging))
    else:
        stylecrafter.convert_stylecrafter(files[0], files[1], str(staging))


def prepare(ref: str) -> Path:
    """A released repository converted (`backbone/` and/or `adapter/`), once per node."""
    release = RELEASES[ref]

    def build(staging: Path) -> None:
        from pipelines.checkpoints.keymap import ConversionError

        snapshot = model_cache.hub_snapshot(release.repo, list(release.files))
        try:
            _convert(release, [str(snapshot / f) for f in release.files], staging)
        except ConversionError as exc:
            raise model_cache.ModelLoadError(f"cannot convert {ref}: {exc}") from exc

    name = f"converted-{release.repo.replace('/', '--')}-v{CONVERTER_VERSION}"
    return model_cache.build_once(name, build)


def backbone_dir(ref: str) -> Path:
    return prepare(ref) / "backbone"


def adapter_dir(ref: str) -> Path:
    return prepare(ref) / "adapter"


def bundles_adapter(ref: str | None) -> bool:
    """Whether a released backbone comes with its adapter (DynamiCrafter's checkpoints hold both)."""
    return is_release(ref) and RELEASES[ref].family == "dynamicrafter"

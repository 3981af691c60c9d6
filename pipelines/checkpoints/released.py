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
    file: str
    family: str
    variant: str


RELEASES: dict[str, Release] = {
    r.repo: r
    for r in (
        Release("Doubiiu/DynamiCrafter", "model.ckpt", "dynamicrafter", "256"),
        Release("Doubiiu/DynamiCrafter_512", "model.ckpt", "dynamicrafter", "512"),
        Release("Doubiiu/DynamiCrafter_1024", "model.ckpt", "dynamicrafter", "1024"),
        Release("Doubiiu/DynamiCrafter_512_Interp", "model.ckpt", "dynamicrafter", "512_interp"),
    )
}


def is_release(ref: str | None) -> bool:
    return ref in RELEASES


def prepare(ref: str) -> Path:
    """The converted directory of a released repository (`backbone/`, `adapter/`), built once per node."""
    release = RELEASES[ref]

    def build(staging: Path) -> None:
        from pipelines.checkpoints import dynamicrafter
        from pipelines.checkpoints.keymap import ConversionError

        snapshot = model_cache.hub_snapshot(release.repo, [release.file])
        try:
            dynamicrafter.convert_checkpoint(str(snapshot / release.file), str(staging), release.variant)
        except ConversionError as exc:
            raise model_cache.ModelLoadError(f"cannot convert {ref}: {exc}") from exc

    name = f"converted-{release.repo.replace('/', '--')}-v{CONVERTER_VERSION}"
    return model_cache.build_once(name, build)


def backbone_dir(ref: str) -> Path:
    return prepare(ref) / "backbone"


def adapter_dir(ref: str) -> Path:
    return prepare(ref) / "adapter"

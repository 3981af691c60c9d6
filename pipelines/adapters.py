"""What the adapter methods (DynamiCrafter, StyleCrafter) share: the CLIP image tower and adapter files.

An adapter directory holds `adapter.json` (the adapter's configuration) and `adapter.safetensors` (its
weights, and the UNet layers a training stage fine-tuned, as `unet.<name>`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines import media

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"
OFFICIAL_IMAGE_ENCODER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# A new adapter's initial weights come from this seed, so that every data-parallel training worker starts
# from the same weights (gradients are averaged, not weights) and an untrained adapter is reproducible.
ADAPTER_INIT_SEED = 0


# What a full CLIP checkpoint (both towers and their projections: the official image encoder
# `OFFICIAL_IMAGE_ENCODER`, tiny) holds beyond the image tower. Only these keys may be left over.
_OTHER_TOWER = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")


def load_image_encoder(ref: str, device: str, dtype: torch.dtype) -> nn.Module:
    """The CLIP vision tower (hub id | local dir | tiny), with the mean/std it was trained with attached.

    transformers' load report would list the other tower's keys of a full CLIP checkpoint as unexpected
    on every load; instead the load is checked here, strictly: every tower weight present and of its
    shape, nothing left over but the other tower.
    """
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    from pipelines.clip import prepare_clip
    from pipelines.model_cache import ModelLoadError

    path = Path(prepare_clip(ref))
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    try:
        report.setLevel(logging.ERROR)
        encoder, info = CLIPVisionModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
        processor = CLIPImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the image encoder {ref!r} from {path}: {exc}") from exc
    finally:
        report.setLevel(level)
    stray = sorted(k for k in info["unexpected_keys"] if not _OTHER_TOWER.match(k))
    if info["missing_keys"] or info["mismatched_keys"] or stray:
        raise ModelLoadError(
            f"{ref!r} ({path}) is not a CLIP image tower: missing {sorted(info['missing_keys'])[:5]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:5]}, unexpected {stray[:5]}"
        )
    encoder = encoder.to(device).eval()
    encoder.image_mean, encoder.image_std = list(processor.image_mean), list(processor.image_std)
    return encoder


@torch.no_grad()
def encode_images(encoder: nn.Module, images: torch.Tensor) -> Any:
    """Images [B, 3, H, W] in [-1, 1] through the CLIP tower, preprocessed as DynamiCrafter's official image
    embedder does: squashed (no crop) to the tower's size by kornia's resize (a Gaussian pre-blur, then
    bicubic with aligned corners), then (x + 1) / 2 and the CLIP normalisation, without clamping."""
    from kornia.geometry.transform import resize

    size = encoder.config.image_size
    x = resize(images.float(), (size, size), interpolation="bicubic", align_corners=True, antialias=True)
    x = (x + 1) / 2
    mean = torch.tensor(encoder.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.image_std, device=x.device).view(1, 3, 1, 1)
    return encoder(pixel_values=((x - mean) / std).to(encoder.device, encoder.dtype))


def save_adapter(directory: str, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    media.write_text(json.dumps(config, indent=1), media.join(directory, ADAPTER_CONFIG))
    # Cloned: safetensors refuses tensors that share memory (conv_in may appear twice).
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in weights.items()}
    media.write_bytes(save(tensors), media.join(directory, ADAPTER_WEIGHTS))


def read_adapter(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load

    config = json.loads(media.read_bytes(media.join(directory, ADAPTER_CONFIG)))
    return config, load(media.read_bytes(media.join(directory, ADAPTER_WEIGHTS)))


def load_parts(state: dict[str, torch.Tensor], parts: dict[str, nn.Module], unet: nn.Module) -> None:
    """Load `prefix.` entries into each part, and `unet.` entries (fine-tuned layers) into the UNet."""
    for prefix, module in parts.items():
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    fine_tuned = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    if fine_tuned:
        missing = set(fine_tuned) - set(unet.state_dict())
        if missing:
            raise KeyError(f"adapter holds UNet weights this backbone lacks: {sorted(missing)[:5]}")
        unet.load_state_dict(fine_tuned, strict=False)


def part_state(parts: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach() for prefix, m in parts.items() for k, v in m.state_dict().items()}


def adapter_of(models: dict[str, str | None]) -> str | None:
    """The adapter directory to load: the one asked for (a released adapter's hub id is converted once
    per node), else the one a released DynamiCrafter backbone's conversion wrote."""
    from pipelines.checkpoints import released

    adapter, backbone = models.get("adapter"), models.get("backbone")
    if adapter:
        return str(released.adapter_dir(adapter)) if released.is_release(adapter) else adapter
    return str(released.adapter_dir(backbone)) if released.bundles_adapter(backbone) else None


def image_encoder_ref(adapter: str | None, backbone: str | None) -> str:
    """The adapter's image encoder (a "./" path lies inside the adapter directory, as a converted
    checkpoint's does); without an adapter, tiny for tiny backbones, else the official one."""
    if adapter:
        ref = read_adapter(adapter)[0]["image_encoder"]
        return media.join(adapter, ref[2:]) if ref.startswith("./") else ref
    return "tiny" if (backbone or "tiny").startswith("tiny") else OFFICIAL_IMAGE_ENCODER


def load_model(
    models: dict[str, str | None],
    device: str,
    dtype: torch.dtype,
    build: Callable[[Any, nn.Module, Any], nn.Module],
    config_type: type,
    default_config: Callable[[int, str], Any],
) -> Any:
    """An adapter model on a fresh backbone: `adapter_of(models)` if any, else a new (untrained) adapter.

    `models["image_encoder"]` overrides the CLIP tower (benches with random real-size weights).

    `default_config(cross_attention_width, image_encoder)` chooses the new adapter's size.
    """
    from pipelines.backbone import load_backbone_uncached

    backbone = load_backbone_uncached(models.get("backbone") or "tiny", device, dtype)
    adapter = adapter_of(models)
    encoder_ref = models.get("image_encoder") or image_encoder_ref(adapter, models.get("backbone"))
    encoder = load_image_encoder(encoder_ref, device, dtype)
    if adapter:
        config, weights = read_adapter(adapter)
        # The encoder by a path that holds wherever this adapter is saved again (fine-tuning exports).
        config = config_type(**{**config, "image_encoder": image_encoder_ref(adapter, None)})
    else:
        config, weights = default_config(backbone.unet.config.cross_attention_dim, encoder_ref), None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ADAPTER_INIT_SEED)
        model = build(backbone, encoder, config)
    if weights is not None:
        model.load_adapter_state(weights)
    return model


class AdapterFiles:
    """Mixin of the adapter models: `_parts()` names (by key prefix) the modules the adapter adds."""

    config: Any
    backbone: Any

    def _parts(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return part_state(self._parts())

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        load_parts(state, self._parts(), self.backbone.unet)

    def save_adapter(self, directory: str, extra: dict[str, torch.Tensor] | None = None) -> None:
        """adapter.json (the config) and adapter.safetensors (the adapter's weights, plus `extra`)."""
        save_adapter(
            directory, dataclasses.asdict(self.config), {**self.adapter_state_dict(), **(extra or {})}
        )

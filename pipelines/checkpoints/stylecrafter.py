"""The released StyleCrafter: its VideoCrafter1 base and its style adapter, onto anima's modules.

- `VideoCrafter/Text2Video-512` (`model.ckpt`): the LVDM UNet without temporal convolutions and with
  relative-position temporal attention (`lvdm.py`, `pipelines/temporal.py`), plus the VAE and OpenCLIP
  text encoder every LVDM checkpoint carries (`ldm_parts.py`). It has no image tower: the style
  references go through the public `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, the weights the official
  code loads for them.
- `liuhuohuo/StyleCrafter`: `adapter_v1.pth` (the style Q-Former, the scale predictor, and each spatial
  `attn2`'s style key/value/LayerNorm) and `temporal_v1_1.pth`, which holds all 17 temporal transformers
  (relative tables included) as a nested dict and replaces the base's; those land in the adapter
  directory as fine-tuned UNet layers (`unet.*`).

Facts from the official `configs/inference_video_320_512.yaml`, `scripts/run_infer_{video,image}.sh` and
`lvdm/models/ddpm3d_cond.py` (StyleCrafter c2a2e27).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipelines import adapters
from pipelines.checkpoints import ldm_parts, lvdm
from pipelines.checkpoints.keymap import ConversionError, Rule, prefixed, remap
from pipelines.stylecrafter.model import StyleConfig, StyleModules, style_modules

UNET_PREFIX = "model.diffusion_model."
RELEASED_UNET: dict[str, Any] = {
    **lvdm.RELEASED_COMMON,
    "in_channels": 4,
    "temporal_conv": False,
    "use_relative_position": True,
}
# `adapter_config.params` of the released adapter.
RELEASED_ADAPTER: dict[str, Any] = {
    "scale": 1.0,
    "image_context_config": {
        "params": {"in_dim": 1280, "out_dim": 1024, "num_heads": 8, "num_tokens": 8, "n_layers": 3}
    },
    "scale_predictor_config": {
        "params": {"in_dim": 1024, "out_dim": 1, "num_heads": 8, "num_tokens": 16, "n_layers": 2}
    },
}
# The LDM schedule without zero terminal SNR, eps-prediction, DDIM "uniform" spacing ([1, 21, ..., 981]).
SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
# run_infer_video.sh / run_infer_image.sh.
SAMPLE_DEFAULTS: dict[str, Any] = {
    "cfg_text": 15.0,
    "cfg_style": 7.5,
    "image_cfg": 6.0,
    "image_size": 512,
    "steps": 50,
    "eta": 1.0,
    "num_frames": 16,
    "height": 320,
    "width": 512,
    "seed": 123,
    "fps": 10,
}
STYLE_IMAGE_ENCODER = adapters.OFFICIAL_IMAGE_ENCODER


# -- the VideoCrafter1 base ---------------------------------------------------------------------


def _check_videocrafter1(state: dict[str, torch.Tensor]) -> None:
    conv_in = state.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is None:
        raise ConversionError(f"not a VideoCrafter1 checkpoint: no {UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in.shape[1] != 4 or any(".attn2.to_k_ip." in k for k in state):
        raise ConversionError(
            "not a VideoCrafter1 checkpoint: its UNet is image-conditioned (DynamiCrafter?); "
            "use anima convert dynamicrafter"
        )
    if not any("relative_position_k" in k for k in state):
        raise ConversionError("not a VideoCrafter1 checkpoint: no relative-position temporal attention")


def convert_videocrafter1(
    checkpoint: str,
    output: str,
    config: dict[str, Any] | None = None,
    tokenizer: str = ldm_parts.OPENCLIP_TOKENIZER,
) -> dict[str, str]:
    """VideoCrafter1's `model.ckpt` as a diffusers-layout backbone directory (OUTPUT/backbone)."""
    from pipelines.checkpoints.reader import read_checkpoint

    state = read_checkpoint(checkpoint)
    _check_videocrafter1(state)
    if not ldm_parts.holds_schedule(state, SCHEDULER):
        raise ConversionError("the checkpoint's alphas_cumprod is not the LDM schedule VideoCrafter1 uses")
    unet_config = unet_config_of(config)
    frozen = ldm_parts.FrozenParts(state, tokenizer)
    unet = lvdm.build_unet(unet_config, "meta")
    rules = [
        *prefixed(lvdm.unet_rules(unet_config, target="unet."), source=UNET_PREFIX),
        *frozen.text_rules,
        *ldm_parts.frozen_drops(),
    ]
    expected = {f"unet.{k}": v for k, v in unet.state_dict().items()} | frozen.expected()
    converted = remap(state, rules, expected, f"VideoCrafter1 checkpoint {checkpoint}")
    backbone = f"{output}/backbone"
    frozen.save(backbone, unet, converted, SCHEDULER)
    return {"backbone": backbone}


def unet_config_of(config: dict[str, Any] | None) -> dict[str, Any]:
    """The released UNet config, or an official inference YAML's (`model.params.unet_config.params`)."""
    if config is None:
        return RELEASED_UNET
    try:
        return config["model"]["params"]["unet_config"]["params"]
    except KeyError as exc:
        raise ConversionError("the config lacks model.params.unet_config.params") from exc


# -- the style adapter ----------------------------------------------------------------------------


def style_config_of(adapter: dict[str, Any], image_encoder: str, **fields: Any) -> StyleConfig:
    """anima's StyleConfig for an official `adapter_config.params`."""
    qformer = adapter["image_context_config"]["params"]
    scales = adapter["scale_predictor_config"]["params"]
    return StyleConfig(
        image_encoder=image_encoder,
        style_tokens=qformer["num_tokens"],
        qformer_layers=qformer["n_layers"],
        qformer_heads=qformer["num_heads"],
        scale_layers=scales["n_layers"],
        scale_heads=scales["num_heads"],
        style_weight=adapter.get("scale", 1.0),
        **fields,
    )


def _resblocks(source: str, target: str, layers: int) -> list[Rule]:
    """open_clip ResidualAttentionBlocks -> torch TransformerEncoderLayers (pre-norm, packed q/k/v alike)."""
    names = [
        ("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_weight", "self_attn.in_proj_weight"),
        ("attn.in_proj_bias", "self_attn.in_proj_bias"), ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "linear1."), ("mlp.c_proj.", "linear2."),
    ]  # fmt: skip
    return [Rule(f"{source}{i}.{a}", f"{target}{i}.{b}") for i in range(layers) for a, b in names]


def adapter_rules(config: StyleConfig, unet_config: dict[str, Any]) -> list[Rule]:
    """`adapter_v1.pth` keys -> `adapter.<anima adapter key>`."""
    q, s = "image_context_model.", "scale_predictor."
    rules = [
        Rule(f"{q}style_emb", "qformer.queries"),
        Rule(f"{q}ln1.", "qformer.norm_in."),
        Rule(f"{q}ln2.", "qformer.norm_out."),
        Rule(f"{q}proj", "qformer.proj"),
        *_resblocks(f"{q}transformer_blocks.resblocks.", "qformer.blocks.layers.", config.qformer_layers),
        Rule(f"{s}scale_emb", "scales.queries"),
        Rule(f"{s}ln1.", "scales.norm_in."),
        Rule(f"{s}ln2.", "scales.norm_out."),
        Rule(f"{s}out.0.", "scales.head.0."),
        Rule(f"{s}out.2.", "scales.head.2."),
        *_resblocks(f"{s}transformer_blocks.resblocks.", "scales.blocks.layers.", config.scale_layers),
    ]
    for official, module in lvdm.spatial_cross_attentions(unet_config).items():
        source = f"kv_attn_layers.{official.replace('.', '_')}_processor."
        target = f"processors.{module.replace('.', '__')}."
        rules += [
            Rule(f"{source}to_k_style.", f"{target}to_k_extra."),
            Rule(f"{source}to_v_style.", f"{target}to_v_extra."),
            Rule(f"{source}norm_style.", f"{target}norm."),
        ]
    return prefixed(rules, target="adapter.")


def flatten_temporal(nested: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`temporal_v1_1.pth`'s {TemporalTransformer path: its state dict} as `path.key` UNet keys."""
    if not nested or not all(isinstance(v, dict) for v in nested.values()):
        raise ConversionError(
            "not a StyleCrafter temporal file: expected {temporal transformer path: state dict}"
        )
    return {
        f"{outer}.{inner}": t for outer, inner_state in nested.items() for inner, t in inner_state.items()
    }


def temporal_rules(unet_config: dict[str, Any]) -> list[Rule]:
    """Temporal transformer keys (without `model.diffusion_model.`) -> `unet.<diffusers key>`."""
    temporal = tuple(f"{path}." for path in lvdm.temporal_transformers(unet_config))
    return [r for r in lvdm.unet_rules(unet_config, target="unet.") if r.source.startswith(temporal)]


@dataclasses.dataclass(eq=False)
class AdapterParts:
    """A VideoCrafter1 UNet with StyleCrafter's modules beside it (not installed)."""

    unet: torch.nn.Module
    modules: StyleModules
    unet_config: dict[str, Any]

    def expected(self) -> dict[str, torch.Tensor]:
        """`adapter.*` (the adapter's modules) and `unet.*` of the temporal transformers."""
        temporal = tuple(f"{name}." for name in lvdm.temporal_transformers(self.unet_config).values())
        out = {f"adapter.{k}": v for k, v in adapters.part_state(self.modules.parts()).items()}
        return out | {f"unet.{k}": v for k, v in self.unet.state_dict().items() if k.startswith(temporal)}


def build_adapter_parts(
    unet_config: dict[str, Any], config: StyleConfig, image_width: int, device: str = "cpu"
) -> AdapterParts:
    unet = lvdm.build_unet(unet_config, device)
    with torch.device(device):
        return AdapterParts(unet, style_modules(unet, config, image_width), unet_config)


def convert_adapter(
    adapter: dict[str, torch.Tensor],
    temporal: dict[str, torch.Tensor],
    parts: AdapterParts,
    config: StyleConfig,
    what: str = "StyleCrafter adapter",
) -> dict[str, torch.Tensor]:
    """The adapter's and the temporal file's tensors onto `parts`' keys, every tensor used once."""
    keyed = {f"adapter_file.{k}": v for k, v in adapter.items()} | {
        f"temporal_file.{k}": v for k, v in temporal.items()
    }
    rules = prefixed(adapter_rules(config, parts.unet_config), source="adapter_file.")
    rules += prefixed(temporal_rules(parts.unet_config), source="temporal_file.")
    return remap(keyed, rules, parts.expected(), what)


def read_adapter_files(
    adapter_file: str, temporal_file: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`adapter_v1.pth` (flat) and `temporal_v1_1.pth` (nested), read as tensors only."""
    from pipelines.checkpoints.reader import read_checkpoint, read_nested

    adapter = read_checkpoint(adapter_file)
    if not any(k.startswith("image_context_model.") for k in adapter):
        raise ConversionError(f"{adapter_file} is not a StyleCrafter adapter (no image_context_model.* keys)")
    return adapter, flatten_temporal(read_nested(temporal_file))


def convert_stylecrafter(
    adapter_file: str,
    temporal_file: str,
    output: str,
    config: dict[str, Any] | None = None,
    image_encoder: str = STYLE_IMAGE_ENCODER,
) -> dict[str, str]:
    """The released adapter and temporal weights as an adapter directory (OUTPUT/adapter) for a converted
    VideoCrafter1 backbone. `config` is an official inference YAML for other architectures."""
    adapter, temporal = read_adapter_files(adapter_file, temporal_file)
    unet_config = unet_config_of(config)
    adapter_config = (config or {}).get("model", {}).get("params", {}).get("adapter_config", {}).get("params")
    official = adapter_config or RELEASED_ADAPTER
    style = style_config_of(
        official, image_encoder, variant="official", sample_defaults=dict(SAMPLE_DEFAULTS)
    )
    parts = build_adapter_parts(
        unet_config, style, official["image_context_config"]["params"]["in_dim"], "meta"
    )
    converted = convert_adapter(
        adapter, temporal, parts, style, f"StyleCrafter files {adapter_file}, {temporal_file}"
    )
    directory = f"{output}/adapter"
    weights = ldm_parts.part(converted, "adapter.") | {
        f"unet.{k}": v for k, v in ldm_parts.part(converted, "unet.").items()
    }
    adapters.save_adapter(directory, dataclasses.asdict(style), weights)
    return {"adapter": directory}

"""The released DynamiCrafter UNet and Resampler onto anima's modules, and what each variant is.

The released UNet is the LVDM 3D UNet (`lvdm.py`) plus, in every spatial `attn2`, the image keys and
values `to_k_ip` / `to_v_ip` (and on the 256 model the gate `alpha`), and the fs embedding
`fps_embedding` (stored as `framestride_embed` in the 256 checkpoint, which the official loader renames).
They land on anima's DynamiCrafter adapter: `processors.<layer>.{to_k_extra,to_v_extra,alpha}` and
`stride_embedding`. The Resampler (`image_proj_model`) is anima's `ContextNetwork`.

The variant facts below are the official inference configs' and `scripts/run.sh`'s
(`Doubiiu/DynamiCrafter` c453369; `configs/inference_{256,512,1024}_v1.0.yaml`; see the fixtures'
`sampler_facts.json` for file:line).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipelines import adapters
from pipelines.checkpoints import ldm_parts, lvdm
from pipelines.checkpoints.keymap import ConversionError, Rule, prefixed, remap
from pipelines.ddim import dynamic_rescale_table
from pipelines.dynamicrafter.model import AdapterModules, ContextConfig, adapter_modules, install

UNET_PREFIX = "model.diffusion_model."
RESAMPLER_PREFIX = "image_proj_model."
# The released UNet's `unet_config` (identical in 256/512/1024 but for the gate and default_fs).
RELEASED_UNET: dict[str, Any] = {
    **lvdm.RELEASED_COMMON,
    "in_channels": 8,
    "temporal_conv": True,
    "use_relative_position": False,
    "image_cross_attention": True,
    "image_cross_attention_scale_learnable": False,
    "default_fs": 24,
    "fs_condition": True,
}
# `image_proj_stage_config`, the same in every variant.
RELEASED_RESAMPLER: dict[str, Any] = {
    "dim": 1024,
    "depth": 4,
    "dim_head": 64,
    "heads": 12,
    "num_queries": 16,
    "embedding_dim": 1280,
    "output_dim": 1024,
    "ff_mult": 4,
    "video_length": 16,
}


@dataclass(frozen=True)
class Variant:
    """What differs between the released models (inference configs and run.sh)."""

    name: str
    gate: str  # "one_plus_tanh" (learnable alpha, 256) or "one"
    fs_kind: str  # what the fs input means
    default_fs: int
    fs_range: tuple[int, int]  # the official recommended (and training) range
    prediction_type: str
    zero_snr: bool
    timestep_spacing: str  # diffusers' name: "leading" (+1 offset: official "uniform") or "trailing"
    guidance_rescale: float
    dynamic_rescale: float  # base_scale of scale_arr, 0 = off
    height: int
    width: int
    interpolation: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def unet_config(self) -> dict[str, Any]:
        return {
            **RELEASED_UNET,
            "image_cross_attention_scale_learnable": self.gate == "one_plus_tanh",
            "default_fs": self.default_fs,
        }

    def scheduler_config(self) -> dict[str, Any]:
        """diffusers' DDIMScheduler config with the official schedule (LDM betas, 1000 steps)."""
        return {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": self.prediction_type,
            "rescale_betas_zero_snr": self.zero_snr,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": 1 if self.timestep_spacing == "leading" else 0,
            "clip_sample": False,
            "set_alpha_to_one": False,
        }

    def sample_defaults(self) -> dict[str, Any]:
        """The sampling parameters the official inference of this variant uses."""
        return {
            "fs": self.default_fs,
            "guidance": "single",
            "cfg_scale": 7.5,
            "guidance_rescale": self.guidance_rescale,
            "dynamic_rescale": self.dynamic_rescale,
            "rescale_turning_step": 400,
            "height": self.height,
            "width": self.width,
            "num_frames": 16,
            "steps": 50,
            "eta": 1.0,
            "repeat_condition": True,
            **({"mode": "interpolate"} if self.interpolation else {}),
        }

    def context_fields(self) -> dict[str, Any]:
        """What adapter.json records of this variant (`ContextConfig` fields)."""
        return {
            "gate": self.gate,
            "widen_conv_in": False,
            "frames_mismatch": "share",
            "fs_kind": self.fs_kind,
            "variant": self.name,
            "sample_defaults": self.sample_defaults(),
            "schedule": {
                "prediction_type": self.prediction_type,
                "rescale_betas_zero_snr": self.zero_snr,
                "timestep_spacing": self.timestep_spacing,
            },
        }


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "256", "one_plus_tanh", "frame_stride", 3, (1, 6), "epsilon", False, "leading", 0.0, 0.0, 256, 256
        ),
        Variant("512", "one", "fps", 24, (15, 30), "v_prediction", True, "trailing", 0.7, 0.7, 320, 512),
        Variant("1024", "one", "fps", 10, (5, 15), "v_prediction", True, "trailing", 0.7, 0.3, 576, 1024),
        Variant(  # run_application.sh runs it at fs 5
            "512_interp", "one", "fps", 5, (15, 30), "v_prediction", True, "trailing", 0.7, 0.7, 320, 512,
            interpolation=True,
        ),
    )
}  # fmt: skip


def context_config_of(resampler: dict[str, Any], **overrides: Any) -> ContextConfig:
    """anima's ContextConfig for an official Resampler config."""
    return ContextConfig(
        dim=resampler["dim"],
        depth=resampler["depth"],
        heads=resampler["heads"],
        dim_head=resampler["dim_head"],
        ff_mult=resampler["ff_mult"],
        queries_per_frame=resampler["num_queries"],
        video_length=resampler["video_length"],
        **overrides,
    )


def _attn2_rules(source: str, module: str) -> list[Rule]:
    processor = f"adapter.processors.{module.replace('.', '__')}."
    return [
        Rule(f"{source}to_k_ip.", f"{processor}to_k_extra."),
        Rule(f"{source}to_v_ip.", f"{processor}to_v_extra."),
        Rule(f"{source}alpha", f"{processor}alpha"),
    ]


def unet_rules(config: dict[str, Any]) -> list[Rule]:
    """Official UNet keys (under `model.diffusion_model.`) -> `unet.<diffusers key>` / `adapter.<key>`."""
    if not config.get("image_cross_attention") or not config.get("fs_condition"):
        raise ConversionError("not a DynamiCrafter UNet config: image_cross_attention and fs_condition unset")
    rules = lvdm.unet_rules(config, _attn2_rules, target="unet.")
    for name in ("fps_embedding", "framestride_embed"):  # the 256 checkpoint's name, as the official loader
        rules += [
            Rule(f"{name}.0.", "adapter.stride_embedding.linear_1."),
            Rule(f"{name}.2.", "adapter.stride_embedding.linear_2."),
        ]
    return prefixed(rules, source=UNET_PREFIX)


def resampler_rules(depth: int) -> list[Rule]:
    """Official `image_proj_model.*` -> anima's context network (`adapter.context.*`): the same modules,
    but for the attention's two LayerNorms (norm1 of the image tokens, norm2 of the latents)."""
    rules = [Rule(name, name) for name in ("latents", "proj_in.", "proj_out.", "norm_out.", "layers.")]
    for i in range(depth):
        rules += [
            Rule(f"layers.{i}.0.norm1.", f"layers.{i}.0.norm_media."),
            Rule(f"layers.{i}.0.norm2.", f"layers.{i}.0.norm_latents."),
        ]
    return prefixed(rules, source=RESAMPLER_PREFIX, target="adapter.context.")


@dataclass(eq=False)
class Parts:
    """A bare official-layout DynamiCrafter: a plain diffusers UNet and the adapter modules beside it."""

    unet: nn.Module
    modules: AdapterModules
    config: ContextConfig

    def expected(self, with_context: bool = True) -> dict[str, torch.Tensor]:
        """The keys and shapes a checkpoint must fill: `unet.*` (the plain UNet) and `adapter.*`."""
        parts = self._parts(with_context)
        return {f"unet.{k}": v for k, v in self.unet.state_dict().items()} | {
            f"adapter.{k}": v for k, v in adapters.part_state(parts).items()
        }

    def _parts(self, with_context: bool) -> dict[str, nn.Module]:
        parts = self.modules.parts()
        return parts if with_context else {k: m for k, m in parts.items() if k != "context."}

    def load(self, converted: dict[str, torch.Tensor]) -> None:
        """Load `convert`'s output into the plain UNet and the adapter modules (before `install`)."""
        self.unet.load_state_dict(ldm_parts.part(converted, "unet."))
        adapter = ldm_parts.part(converted, "adapter.")
        adapters.load_parts(adapter, self._parts(any(k.startswith("context.") for k in adapter)), self.unet)

    def install(self) -> nn.Module:
        """The UNet with DynamiCrafter in place, ready to run."""
        install(self.unet, self.modules, self.config)
        return self.unet


def build_parts(
    unet_config: dict[str, Any], context: ContextConfig, image_width: int, device: str = "cpu"
) -> Parts:
    """anima's modules for an official UNet config (on `device`, e.g. "meta" for shapes only)."""
    unet = lvdm.build_unet(unet_config, device)
    with torch.device(device):
        modules = adapter_modules(unet, context, image_width)
    return Parts(unet, modules, context)


def gate_of(unet_config: dict[str, Any]) -> str:
    return "one_plus_tanh" if unet_config.get("image_cross_attention_scale_learnable") else "one"


def convert(
    checkpoint: dict[str, torch.Tensor],
    unet_config: dict[str, Any],
    parts: Parts,
    resampler: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The UNet (and, with its config, the Resampler) tensors of a checkpoint onto `parts`' keys.

    Every tensor given is used exactly once (`keymap.remap`); the full-checkpoint converter passes the
    other parts' rules and keys alongside.
    """
    rules = unet_rules(unet_config) + (resampler_rules(resampler["depth"]) if resampler else [])
    return remap(checkpoint, rules, parts.expected(with_context=resampler is not None), "DynamiCrafter")


# -- whole checkpoints ----------------------------------------------------------------------------

EMBEDDER_PREFIX = "embedder.model."
VISION_PREFIX = f"{EMBEDDER_PREFIX}visual."
# adapter.json names the image encoder converted into the adapter directory relative to it.
ADAPTER_IMAGE_ENCODER = "./image_encoder"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# What the image embedder keeps of its CLIP's text side, which it deletes the transformer of.
_EMBEDDER_TEXT = ("positional_embedding", "text_projection", "logit_scale", "token_embedding.", "ln_final.")


def detect_variant(state: dict[str, torch.Tensor], given: str | None = None) -> Variant:
    """The released variant a checkpoint is, from its keys and shapes (and `scale_arr`, which tells 512
    from 1024); `given` is checked against them. 512 and its interpolation model share every key."""
    conv_in = state.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is None:
        raise ConversionError(f"not a DynamiCrafter checkpoint: no {UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in.shape[1] != 8 or not any(".attn2.to_k_ip." in k for k in state):
        raise ConversionError(
            f"not a DynamiCrafter checkpoint: its UNet takes {conv_in.shape[1]} input channels and has no "
            "image cross-attention (a text-to-video model such as VideoCrafter1?)"
        )
    learnable = any(k.endswith(".attn2.alpha") for k in state)
    if given is not None:
        if given not in VARIANTS:
            raise ConversionError(f"unknown variant {given!r}; known: {', '.join(VARIANTS)}")
        if learnable != (VARIANTS[given].gate == "one_plus_tanh"):
            raise ConversionError(
                f"--variant {given} does not fit this checkpoint: it {'has' if learnable else 'lacks'} the "
                "learnable image gates (attn2.alpha) that only the 256 model has"
            )
        return VARIANTS[given]
    if learnable:
        return VARIANTS["256"]
    if "scale_arr" not in state:
        raise ConversionError(
            "cannot tell 512 from 1024: the file has no scale_arr buffer; pass --variant 512, 1024 or "
            "512_interp"
        )
    base = float(state["scale_arr"][-1])
    found = [v for v in VARIANTS.values() if v.dynamic_rescale and abs(v.dynamic_rescale - base) < 1e-4]
    if not found:
        raise ConversionError(f"scale_arr ends at {base:.4f}, which no released variant uses; pass --variant")
    return found[0]


def _architecture(variant: Variant, config: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """UNet and Resampler configs: the released ones, or an official inference YAML's (`model.params`)."""
    if config is None:
        return variant.unet_config(), RELEASED_RESAMPLER
    params = config.get("model", {}).get("params", {})
    try:
        return params["unet_config"]["params"], params["image_proj_stage_config"]["params"]
    except KeyError as exc:
        raise ConversionError(f"the config lacks model.params.{exc.args[0]}.params") from exc


def _checked_schedule(state: dict[str, torch.Tensor], variant: Variant) -> Variant:
    """The variant with the schedule its buffers hold; official inference samples with the checkpoint's
    buffers, so they decide. A schedule that is neither the LDM one with nor without zero terminal SNR
    is refused."""
    if "alphas_cumprod" not in state:
        return variant
    for zero_snr in (variant.zero_snr, not variant.zero_snr):
        if ldm_parts.holds_schedule(
            state, {**variant.scheduler_config(), "rescale_betas_zero_snr": zero_snr}
        ):
            break
    else:
        raise ConversionError(
            "the checkpoint's alphas_cumprod is not the LDM schedule (0.00085-0.012, 1000 steps)"
        )
    base = variant.dynamic_rescale
    if "scale_arr" in state:
        table = state["scale_arr"].double()
        base = round(float(table[-1]), 4)
        expected = dynamic_rescale_table(base, 400, len(table))
        if not torch.allclose(table, expected, atol=1e-5, rtol=0):
            raise ConversionError("the checkpoint's scale_arr is not a 400-step ramp to a constant")
    if zero_snr != variant.zero_snr or base != variant.dynamic_rescale:
        print(
            f"[anima] the checkpoint's buffers say zero_snr={zero_snr}, dynamic rescale {base}: converting "
            f"with those (the released {variant.name} config: {variant.zero_snr}, {variant.dynamic_rescale})"
        )
    return dataclasses.replace(variant, zero_snr=zero_snr, dynamic_rescale=base)


def _drops() -> list[Rule]:
    text_side = "the image embedder's unused text side"
    return [
        *ldm_parts.frozen_drops(("scale_arr",)),
        *(Rule(f"{EMBEDDER_PREFIX}{name}", None, reason=text_side) for name in _EMBEDDER_TEXT),
    ]


def convert_checkpoint(
    checkpoint: str,
    output: str,
    variant: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer: str = ldm_parts.OPENCLIP_TOKENIZER,
) -> dict[str, str]:
    """A released DynamiCrafter checkpoint as `OUTPUT/backbone` (diffusers layout: unet with 8 input
    channels, vae, text_encoder, tokenizer, scheduler) and `OUTPUT/adapter` (adapter.json,
    adapter.safetensors, image_encoder/). Every tensor is used once or refused; nothing is written
    until the whole checkpoint converted."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from pipelines.checkpoints.reader import read_checkpoint

    state = read_checkpoint(checkpoint)
    chosen = _checked_schedule(state, detect_variant(state, variant))
    unet_config, resampler = _architecture(chosen, config)
    frozen = ldm_parts.FrozenParts(state, tokenizer)
    vision_cfg = CLIPVisionConfig(**ldm_parts.vision_config(state, VISION_PREFIX))
    context = context_config_of(resampler, image_encoder=ADAPTER_IMAGE_ENCODER, **chosen.context_fields())
    with torch.device("meta"):
        vision = CLIPVisionModel(vision_cfg)
    parts = build_parts(unet_config, context, vision_cfg.hidden_size, device="meta")
    rules = [
        *unet_rules(unet_config),
        *resampler_rules(resampler["depth"]),
        *frozen.text_rules,
        *ldm_parts.vision_rules(state, VISION_PREFIX, f"image_encoder.{ldm_parts.model_prefix(vision)}"),
        *_drops(),
    ]
    expected = parts.expected() | frozen.expected()
    expected |= {f"image_encoder.{k}": v for k, v in vision.state_dict().items()}
    converted = remap(state, rules, expected, f"DynamiCrafter {chosen.name} checkpoint {checkpoint}")

    backbone, adapter = f"{output}/backbone", f"{output}/adapter"
    frozen.save(backbone, parts.unet, converted, chosen.scheduler_config())
    encoder_dir = f"{adapter}/{ADAPTER_IMAGE_ENCODER[2:]}"
    ldm_parts.save_module(vision, ldm_parts.part(converted, "image_encoder."), encoder_dir)
    size = vision_cfg.image_size
    CLIPImageProcessorPil(
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
    ).save_pretrained(encoder_dir)
    adapters.save_adapter(adapter, dataclasses.asdict(context), ldm_parts.part(converted, "adapter."))
    return {"backbone": backbone, "adapter": adapter, "variant": chosen.name}

"""The frozen parts every LVDM checkpoint carries, onto diffusers and transformers classes.

- `first_stage_model.*`, the LDM AutoencoderKL, through diffusers' own `convert_ldm_vae_checkpoint`;
  anima only checks that it used every tensor once and filled every key (each LDM tensor becomes one
  diffusers tensor, a view of it).
- OpenCLIP transformers (`cond_stage_model.model.*`, the text tower; `embedder.model.visual.*`, the
  image tower) onto transformers' `CLIPTextModel` / `CLIPVisionModel`. The two towers share OpenCLIP's
  residual-block layout (packed q/k/v `in_proj`, `c_fc`/`c_proj`), so one set of rules serves both;
  diffusers' `convert_open_clip_checkpoint` covers the text tower only and copies the q/k/v splits, so
  it could not be checked for tensors it leaves out.
Sizes come from the tensors' shapes, except head counts, which OpenCLIP configs fix (see `vision_heads`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pipelines.checkpoints.keymap import ConversionError, Rule, remap

VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
# The official tokenizer is OpenCLIP's, the CLIP BPE that pads with id 0 ("!"); these files hold it.
OPENCLIP_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# The DDPM module's persistent schedule buffers (ddpm3d.py register_schedule).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip
LDM_SCALE_FACTOR = 0.18215  # the `scale_factor` of the released configs (a constant, not a buffer)
_OPENCLIP_HEAD_WIDTH = 64
# OpenCLIP's large image towers use 16 heads of width/16 (ViT-H-14: 1280 = 16 x 80), the others 64-wide heads.
_WIDE_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# -- VAE ----------------------------------------------------------------------------------------


def vae_config(state: Mapping[str, torch.Tensor], scale_factor: float = LDM_SCALE_FACTOR) -> dict[str, Any]:
    """AutoencoderKL config of an LDM VAE (`ddconfig`: ch, ch_mult, num_res_blocks, z_channels; 32 groups)."""
    p = VAE_PREFIX
    if f"{p}encoder.conv_in.weight" not in state:
        raise ConversionError(f"no VAE in the checkpoint ({p}encoder.conv_in.weight missing)")
    levels = _count(state, re.escape(p) + r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": state[f"{p}encoder.conv_in.weight"].shape[1],
        "out_channels": state[f"{p}decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [
            state[f"{p}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)
        ],
        "layers_per_block": _count(state, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": state[f"{p}post_quant_conv.weight"].shape[0],
        "norm_num_groups": 32,
        "scaling_factor": scale_factor,
    }


def convert_vae(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The VAE's tensors in diffusers' names, checked: every `first_stage_model.` tensor used once,
    every key of `expected` (an AutoencoderKL state dict) filled with its shape."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sources = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    converted = convert_ldm_vae_checkpoint(dict(sources), {**vae_config(state)})
    used = {v.untyped_storage().data_ptr() for v in converted.values()}
    unused = [k for k, v in sources.items() if v.untyped_storage().data_ptr() not in used]
    if unused or len(converted) != len(sources):
        raise ConversionError(
            f"the VAE does not convert one to one: {len(sources)} checkpoint tensors, {len(converted)} "
            f"converted; unused: {', '.join(sorted(unused)[:20]) or 'none'}"
        )
    return remap(converted, [Rule(k, k) for k in converted], expected, "VAE (first_stage_model)")


# -- OpenCLIP towers ----------------------------------------------------------------------------


def _split_qkv(kind: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """nn.MultiheadAttention's packed in_proj (q, k, v stacked on dim 0) as three projections."""

    def split(t: torch.Tensor) -> dict[str, torch.Tensor]:
        q, k, v = t.chunk(3, dim=0)
        return {f"q_proj.{kind}": q.clone(), f"k_proj.{kind}": k.clone(), f"v_proj.{kind}": v.clone()}

    return split


def _block_rules(source: str, target: str) -> list[Rule]:
    return [
        Rule(f"{source}ln_1.", f"{target}layer_norm1."),
        Rule(f"{source}ln_2.", f"{target}layer_norm2."),
        Rule(f"{source}mlp.c_fc.", f"{target}mlp.fc1."),
        Rule(f"{source}mlp.c_proj.", f"{target}mlp.fc2."),
        Rule(f"{source}attn.out_proj.", f"{target}self_attn.out_proj."),
        Rule(f"{source}attn.in_proj_weight", f"{target}self_attn.", _split_qkv("weight")),
        Rule(f"{source}attn.in_proj_bias", f"{target}self_attn.", _split_qkv("bias")),
    ]


def text_config(state: Mapping[str, torch.Tensor], prefix: str, token_ids: dict[str, int]) -> dict[str, Any]:
    """CLIPTextConfig of an OpenCLIP text tower used at its penultimate layer (the last block dropped)."""
    if f"{prefix}token_embedding.weight" not in state:
        raise ConversionError(f"no OpenCLIP text encoder in the checkpoint ({prefix}token_embedding missing)")
    vocab, width = state[f"{prefix}token_embedding.weight"].shape
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.") - 1,
        "num_attention_heads": width // _OPENCLIP_HEAD_WIDTH,
        "max_position_embeddings": state[f"{prefix}positional_embedding"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": width,
        **token_ids,
    }


def model_prefix(model: torch.nn.Module) -> str:
    """Where a transformers CLIP model keeps its tower in its state dict ("" in transformers 5, whose
    CLIPTextModel / CLIPVisionModel are the towers themselves; `text_model.` / `vision_model.` before)."""
    first = next(iter(model.state_dict()))
    return next((p for p in ("text_model.", "vision_model.") if first.startswith(p)), "")


def text_rules(state: Mapping[str, torch.Tensor], prefix: str, target: str) -> list[Rule]:
    """OpenCLIP text tower -> CLIPTextModel keys under `target` (see `model_prefix`); its last block,
    projection and logit scale are dropped."""
    layers = _count(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    rules = [
        Rule(f"{prefix}token_embedding.weight", f"{target}embeddings.token_embedding.weight"),
        Rule(f"{prefix}positional_embedding", f"{target}embeddings.position_embedding.weight"),
        Rule(f"{prefix}ln_final.", f"{target}final_layer_norm."),
        Rule(
            f"{prefix}transformer.resblocks.{layers - 1}.", None, reason="the penultimate layer is the output"
        ),
        Rule(f"{prefix}text_projection", None, reason="token features are used, not the pooled projection"),
        Rule(f"{prefix}logit_scale", None, reason="CLIP's contrastive temperature, unused"),
    ]
    for i in range(layers - 1):
        rules += _block_rules(f"{prefix}transformer.resblocks.{i}.", f"{target}encoder.layers.{i}.")
    return rules


def vision_heads(width: int) -> int:
    return _WIDE_VISION_HEADS.get(width, width // _OPENCLIP_HEAD_WIDTH)


def vision_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """CLIPVisionConfig of an OpenCLIP image tower."""
    if f"{prefix}conv1.weight" not in state:
        raise ConversionError(f"no OpenCLIP image encoder in the checkpoint ({prefix}conv1.weight missing)")
    width, _, patch, _ = state[f"{prefix}conv1.weight"].shape
    grid = round((state[f"{prefix}positional_embedding"].shape[0] - 1) ** 0.5)
    return {
        "hidden_size": width,
        "intermediate_size": state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."),
        "num_attention_heads": vision_heads(width),
        "image_size": patch * grid,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }


def vision_rules(state: Mapping[str, torch.Tensor], prefix: str, target: str) -> list[Rule]:
    """OpenCLIP image tower -> CLIPVisionModel keys under `target`; the image projection is dropped
    (tokens are used)."""
    layers = _count(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    v = target
    rules = [
        Rule(f"{prefix}class_embedding", f"{v}embeddings.class_embedding"),
        Rule(f"{prefix}conv1.weight", f"{v}embeddings.patch_embedding.weight"),
        Rule(f"{prefix}positional_embedding", f"{v}embeddings.position_embedding.weight"),
        Rule(f"{prefix}ln_pre.", f"{v}pre_layrnorm."),
        Rule(f"{prefix}ln_post.", f"{v}post_layernorm."),
        Rule(
            f"{prefix}proj", None, reason="the image projection: the last layer's tokens are used before it"
        ),
    ]
    for i in range(layers):
        rules += _block_rules(f"{prefix}transformer.resblocks.{i}.", f"{v}encoder.layers.{i}.")
    return rules


# -- a whole LVDM backbone ------------------------------------------------------------------------


def tokenizer(ref: str) -> Any:
    """OpenCLIP's tokenizer as a transformers CLIPTokenizer: padded with "!" (id 0), as OpenCLIP pads."""
    from transformers import CLIPTokenizer

    from pipelines import model_cache
    from pipelines.backbone import PRESETS

    path = model_cache.resolve(ref, PRESETS, ["*.json", "*.txt"])
    sub = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    return CLIPTokenizer.from_pretrained(sub, pad_token="!", model_max_length=77)


def holds_schedule(state: Mapping[str, torch.Tensor], scheduler_config: dict[str, Any]) -> bool:
    """Whether the checkpoint's `alphas_cumprod` buffer is that scheduler's (True when it has none)."""
    from diffusers import DDIMScheduler

    if "alphas_cumprod" not in state:
        return True
    stored = state["alphas_cumprod"].double()
    expected = DDIMScheduler.from_config(scheduler_config).alphas_cumprod.double()
    return stored.shape == expected.shape and torch.allclose(stored, expected, atol=1e-5, rtol=0)


def frozen_drops(extra: tuple[str, ...] = ()) -> list[Rule]:
    """Rules that account for what `FrozenParts` converts elsewhere or checks: the VAE and the buffers."""
    buffer = "a schedule buffer; checked against the scheduler config written"
    return [
        Rule(VAE_PREFIX, None, reason="converted by diffusers' LDM VAE helper (convert_vae)"),
        *(Rule(name, None, reason=buffer) for name in (*SCHEDULE_BUFFERS, *extra)),
    ]


class FrozenParts:
    """An LVDM checkpoint's VAE, OpenCLIP text encoder and tokenizer as the backbone directory holds them.

    The modules are built on the meta device and take the checkpoint's tensors as they are
    (`load_state_dict(assign=True)`), so a full-size conversion needs no second copy in memory.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], tokenizer_ref: str):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel

        self.tokenizer = tokenizer(tokenizer_ref)
        t = self.tokenizer
        ids = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}
        with torch.device("meta"):
            self.text = CLIPTextModel(CLIPTextConfig(**text_config(state, TEXT_PREFIX, ids)))
            self.vae = AutoencoderKL(**vae_config(state))
        self.vae_state = convert_vae(state, self.vae.state_dict())
        self.text_rules = text_rules(state, TEXT_PREFIX, f"text_encoder.{model_prefix(self.text)}")

    def expected(self) -> dict[str, torch.Tensor]:
        return {f"text_encoder.{k}": v for k, v in self.text.state_dict().items()}

    def save(
        self, backbone: str, unet: torch.nn.Module, converted: dict[str, torch.Tensor], scheduler: dict
    ) -> None:
        """`backbone/` in diffusers layout, `unet.*` and `text_encoder.*` of `converted` in their modules."""
        from diffusers import DDIMScheduler

        for module, weights, where in (
            (unet, part(converted, "unet."), "unet"),
            (self.vae, self.vae_state, "vae"),
            (self.text, part(converted, "text_encoder."), "text_encoder"),
        ):
            save_module(module, weights, f"{backbone}/{where}")
        self.tokenizer.save_pretrained(f"{backbone}/tokenizer")
        DDIMScheduler.from_config(scheduler).save_pretrained(f"{backbone}/scheduler")


def part(converted: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The converted tensors under `prefix`, without it (contiguous, for saving)."""
    return {k[len(prefix) :]: v.contiguous() for k, v in converted.items() if k.startswith(prefix)}


def save_module(module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    module.load_state_dict(weights, assign=True, strict=True)
    module.save_pretrained(where)

"""The LVDM 3D UNet (`lvdm.modules.networks.openaimodel3d.UNetModel`) onto diffusers' UNet3DConditionModel.

DynamiCrafter and VideoCrafter1 both release this UNet. Its blocks are ModelScope's (diffusers' UNet3D
was ported from the same code): LVDM `input_blocks` / `middle_block` / `output_blocks` hold
[ResBlock (with its temporal conv), SpatialTransformer, TemporalTransformer, Up/Downsample] where
diffusers has `resnets`, `temp_convs`, `attentions`, `temp_attentions` and `up/downsamplers` per block;
inside a transformer the names are the same. This module turns an official config into the matching
diffusers config and lists the key rules between the two (`keymap.Rule`); the methods add their own
rules for what they put into `attn2` (image or style keys and values). VideoCrafter1's variant has no
temporal convolutions and relative-position tables in its temporal attentions (`pipelines/temporal.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines import temporal
from pipelines.checkpoints.keymap import ConversionError, Rule

# What the released DynamiCrafter and VideoCrafter1 UNet configs share (their `unet_config.params`).
RELEASED_COMMON: dict[str, Any] = {
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "transformer_depth": 1,
    "context_dim": 1024,
    "use_linear": True,
    "temporal_attention": True,
    "temporal_selfatt_only": True,
    "use_causal_attention": False,
    "temporal_length": 16,
    "addition_attention": True,
}
# diffusers' UNet3D builds one transformer layer per block and the LVDM GroupNorm has 32 groups.
_SUPPORTED = {"transformer_depth": 1, "use_linear": True, "temporal_selfatt_only": True}
_RESBLOCK = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


def _squeeze_last(t: torch.Tensor) -> torch.Tensor:
    """A kernel-1 Conv1d weight [out, in, 1] as the Linear weight [out, in] it equals."""
    return t.squeeze(-1)


def check_supported(config: dict[str, Any]) -> None:
    """Refuse official configs this mapping does not reproduce exactly, naming the options."""
    wrong = [f"{k}={config.get(k)!r} (need {v!r})" for k, v in _SUPPORTED.items() if config.get(k, v) != v]
    if config.get("num_head_channels", -1) in (-1, None):
        wrong.append("num_head_channels unset (per-block head counts are not supported)")
    if config.get("use_scale_shift_norm") or config.get("resblock_updown"):
        wrong.append("use_scale_shift_norm / resblock_updown")
    if wrong:
        raise ConversionError(f"unsupported LVDM UNet option(s): {', '.join(wrong)}")


def attention_levels(config: dict[str, Any]) -> list[bool]:
    """Which resolution levels have transformers: level l's downsampling factor is 2**l."""
    return [2**level in config["attention_resolutions"] for level in range(len(config["channel_mult"]))]


def unet3d_config(config: dict[str, Any]) -> dict[str, Any]:
    """The diffusers UNet3DConditionModel config that computes what the official UNet computes."""
    check_supported(config)
    attn = attention_levels(config)
    return {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "down_block_types": ["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(attn)],
        "block_out_channels": [config["model_channels"] * m for m in config["channel_mult"]],
        "layers_per_block": config["num_res_blocks"],
        # diffusers' UNet3D reads attention_head_dim as the head width (heads = channels // it).
        "attention_head_dim": config["num_head_channels"],
        "cross_attention_dim": config["context_dim"],
        "norm_num_groups": 32,
    }


def build_unet(config: dict[str, Any], device: str = "cpu") -> nn.Module:
    """The diffusers UNet3D of an official config, with VideoCrafter1's temporal layers when it has
    them (on `device`; "meta" for shapes only)."""
    from diffusers import UNet3DConditionModel

    variant = temporal.variant_of(config.get("temporal_conv", True), _relative(config))
    with torch.device(device):
        unet = UNet3DConditionModel(**unet3d_config(config))
        if variant:
            unet.register_to_config(**{temporal.CONFIG_KEY: variant})
        return temporal.apply_variant(unet, variant).eval()


def _relative(config: dict[str, Any]) -> int | None:
    return config.get("temporal_length", 16) if config.get("use_relative_position") else None


@dataclass(frozen=True)
class Block:
    """One LVDM block position and where diffusers keeps it."""

    source: str  # e.g. "input_blocks.1"
    kind: str  # "res" | "down" | "up_res" | "mid"
    target: str  # e.g. "down_blocks.0"
    index: int  # resnets / attentions index inside the diffusers block
    attention: bool
    upsample: bool = False


def blocks(config: dict[str, Any]) -> Iterator[Block]:
    """Every LVDM block with its diffusers counterpart, in the official order."""
    attn, res = attention_levels(config), config["num_res_blocks"]
    levels = len(attn)
    k = 1
    for level in range(levels):
        for j in range(res):
            yield Block(f"input_blocks.{k}", "res", f"down_blocks.{level}", j, attn[level])
            k += 1
        if level != levels - 1:
            yield Block(f"input_blocks.{k}", "down", f"down_blocks.{level}", 0, False)
            k += 1
    n = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(res + 1):
            up = level != 0 and j == res
            yield Block(f"output_blocks.{n}", "up_res", f"up_blocks.{i}", j, attn[level], up)
            n += 1


def _resblock(source: str, target: str, j: int, temporal_conv: bool) -> list[Rule]:
    rules = [Rule(f"{source}{a}", f"{target}resnets.{j}.{b}") for a, b in _RESBLOCK.items()]
    return [*rules, Rule(f"{source}temopral_conv.", f"{target}temp_convs.{j}.")] if temporal_conv else rules


def _relative_tables(source: str, target: str) -> list[Rule]:
    """VideoCrafter1's relative-position tables of a temporal transformer's two attentions, onto
    `temporal.RelativePositionProcessor`."""
    return [
        Rule(
            f"{source}transformer_blocks.0.{attn}.relative_position_{kind}.embeddings_table",
            f"{target}transformer_blocks.0.{attn}.processor.relative_{kind}",
        )
        for attn in ("attn1", "attn2")
        for kind in ("k", "v")
    ]


def spatial_cross_attentions(config: dict[str, Any]) -> dict[str, str]:
    """Official path of every spatial `attn2` -> its diffusers module name, in the official order
    (input blocks, middle, output blocks: the order of StyleCrafter's `layer_idx`)."""
    attn2 = "transformer_blocks.0.attn2"
    found = {}
    for b in blocks(config):
        if b.kind != "down" and b.attention:
            found[f"{b.source}.1.{attn2}"] = f"{b.target}.attentions.{b.index}.{attn2}"
    middle = {f"middle_block.1.{attn2}": f"mid_block.attentions.0.{attn2}"}
    inputs = {k: v for k, v in found.items() if k.startswith("input_blocks")}
    return inputs | middle | {k: v for k, v in found.items() if k.startswith("output_blocks")}


def temporal_transformers(config: dict[str, Any]) -> dict[str, str]:
    """Official path of every TemporalTransformer -> its diffusers module name (17 in the released UNets)."""
    found = {"init_attn.0": "transformer_in"} if config.get("addition_attention") else {}
    for b in blocks(config):
        if b.kind != "down" and b.attention:
            found[f"{b.source}.2"] = f"{b.target}.temp_attentions.{b.index}"
    found["middle_block.2"] = "mid_block.temp_attentions.0"
    return found


def unet_rules(
    config: dict[str, Any],
    attn2_rules: Callable[[str, str], list[Rule]] = lambda source, target: [],
    target: str = "",
) -> list[Rule]:
    """Rules from official UNet keys (without `model.diffusion_model.`) to diffusers UNet keys.

    `attn2_rules(official_attn2_prefix, diffusers_attn2_module_name)` adds a method's own keys of each
    spatial cross-attention (e.g. DynamiCrafter's `to_k_ip`). Targets get `target` in front.
    """
    check_supported(config)
    t, conv = target, config.get("temporal_conv", True)
    rules = [
        Rule("time_embed.0.", f"{t}time_embedding.linear_1."),
        Rule("time_embed.2.", f"{t}time_embedding.linear_2."),
        Rule("input_blocks.0.0.", f"{t}conv_in."),
        Rule("out.0.", f"{t}conv_norm_out."),
        Rule("out.2.", f"{t}conv_out."),
    ]
    if config.get("addition_attention"):
        rules += [
            Rule("init_attn.0.", f"{t}transformer_in."),
            Rule("init_attn.0.proj_in.weight", f"{t}transformer_in.proj_in.weight", _squeeze_last),
            Rule("init_attn.0.proj_out.weight", f"{t}transformer_in.proj_out.weight", _squeeze_last),
        ]

    def transformers(source: str, dest: str, j: int) -> list[Rule]:
        spatial = f"{dest}attentions.{j}"
        attn2 = f"{spatial}.transformer_blocks.0.attn2"
        return [
            Rule(f"{source}.1.", f"{t}{spatial}."),
            Rule(f"{source}.2.", f"{t}{dest}temp_attentions.{j}."),
            *attn2_rules(f"{source}.1.transformer_blocks.0.attn2.", attn2),
        ]

    for b in blocks(config):
        dest = f"{b.target}."
        if b.kind == "down":
            rules.append(Rule(f"{b.source}.0.op.", f"{t}{dest}downsamplers.0.conv."))
            continue
        rules += _resblock(f"{b.source}.0.", f"{t}{dest}", b.index, conv)
        if b.attention:
            rules += transformers(b.source, dest, b.index)
        if b.upsample:
            rules.append(Rule(f"{b.source}.{3 if b.attention else 1}.conv.", f"{t}{dest}upsamplers.0.conv."))
    mid = "mid_block."
    rules += _resblock("middle_block.0.", f"{t}{mid}", 0, conv) + _resblock(
        "middle_block.3.", f"{t}{mid}", 1, conv
    )
    rules += transformers("middle_block", mid, 0)
    if config.get("use_relative_position"):
        for source, dest in temporal_transformers(config).items():
            rules += _relative_tables(f"{source}.", f"{t}{dest}.")
    return rules

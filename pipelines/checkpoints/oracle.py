"""`check-oracle`: does anima, fed official-layout weights, compute what the official code computed?

An oracle is a safetensors file of official-layout weights (`weight_prefix`), inputs (`input.*`),
outputs (`output.*`) and intermediates (`intermediate.*`), with a JSON beside it that records the
official class, its constructor config and the call. anima's module is built from that config, the
weights go through the same conversion rules as `anima convert`, and every output and intermediate is
compared: within 1e-4 · max(1, max |expected|) passes. Any config of a supported family works.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pipelines import adapters
from pipelines.checkpoints import dynamicrafter as dc
from pipelines.checkpoints import ldm_parts, lvdm
from pipelines.checkpoints import stylecrafter as sc
from pipelines.checkpoints.keymap import ConversionError, prefixed, remap
from pipelines.dynamicrafter.model import ContextConfig, ContextNetwork
from pipelines.stylecrafter.model import install as install_style

RELATIVE_TOLERANCE = 1e-4
# The name suffix of an oracle's outputs through the official xformers code path (StyleCrafter).
XFORMERS_TWIN = "_xformers_path"
# The official UNet splits its context at 77 text tokens + 16 image tokens per frame (hard-coded).
_IMAGE_TOKENS_PER_FRAME = 16


@dataclass(frozen=True)
class Comparison:
    name: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def compare(name: str, got: torch.Tensor, expected: torch.Tensor) -> Comparison:
    if tuple(got.shape) != tuple(expected.shape):
        raise ConversionError(
            f"{name}: anima gives shape {list(got.shape)}, the oracle {list(expected.shape)}"
        )
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(expected.abs().max()))
    return Comparison(name, float((got.float() - expected.float()).abs().max()), tolerance)


def _weights(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The oracle's official-layout weights, under their checkpoint names (e.g. the 256 model's
    `framestride_embed`, which the converter accepts as the official loader does)."""
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def _output_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else getattr(out, "sample", out)


def _block_modules(unet: nn.Module, config: dict[str, Any]) -> dict[str, nn.Module]:
    """The diffusers module whose output is each official block's output (frames batched as (b t))."""
    modules = dict(unet.named_modules())
    found = {
        "input_blocks.0": unet.conv_in,
        "init_attn": unet.transformer_in,
        "middle_block": unet.mid_block,
        "time_embed": unet.time_embedding,
    }
    for b in lvdm.blocks(config):
        if b.kind == "down":
            last = f"{b.target}.downsamplers.0"
        elif b.upsample:
            last = f"{b.target}.upsamplers.0"
        elif b.attention:
            last = f"{b.target}.temp_attentions.{b.index}"
        else:
            last = f"{b.target}.temp_convs.{b.index}"
        found[b.source] = modules[last]
    return found


def _capture(modules: dict[str, nn.Module], names: list[str]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ConversionError(f"intermediate(s) with no anima counterpart: {', '.join(unknown)}")
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        return lambda _m, _args, out: seen.__setitem__(name, _output_of(out).detach().clone())

    return seen, [modules[n].register_forward_hook(hook(n)) for n in names]


def _dynamicrafter_unet(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Comparison]:
    config = spec["config"]
    frames = tensors["input.x"].shape[2]
    context = ContextConfig(
        gate=dc.gate_of(config),
        widen_conv_in=False,
        queries_per_frame=_IMAGE_TOKENS_PER_FRAME,
        video_length=frames,
        fs_kind="fps",
    )
    parts = dc.build_parts(config, context, image_width=1)
    weights = _weights(tensors, spec["weight_prefix"])
    parts.load(dc.convert(weights, config, parts))
    names = [k.removeprefix("intermediate.") for k in tensors if k.startswith("intermediate.")]
    modules = _block_modules(parts.unet, config)
    modules["fps_embedding"] = parts.modules.fs_embedding.stride_embedding
    seen, hooks = _capture(modules, names)  # before install: time_embed is seen without the fs term
    unet = parts.install()
    # The official UNet takes default_fs when called without fs.
    fs = tensors.get("input.fs", torch.full((len(tensors["input.x"]),), config.get("default_fs", 24)))
    context = tensors.get("input.context")
    if context is None:
        context = torch.cat([tensors["input.context_text"], tensors["input.context_image"]], 1)
    parts.modules.fs_embedding.fs = fs
    try:
        with torch.no_grad():
            out = unet(tensors["input.x"], tensors["input.timesteps"], context).sample
    finally:
        parts.modules.fs_embedding.fs = None
        for h in hooks:
            h.remove()
    results = [compare("output.unet_out", out, tensors["output.unet_out"])]
    return results + [compare(f"intermediate.{n}", seen[n], tensors[f"intermediate.{n}"]) for n in names]


def _dynamicrafter_resampler(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Comparison]:
    config = spec["config"]
    network = ContextNetwork(dc.context_config_of(config), config["embedding_dim"], config["output_dim"])
    expected = {f"adapter.context.{k}": v for k, v in network.state_dict().items()}
    weights = _weights(tensors, spec["weight_prefix"])
    converted = remap(weights, dc.resampler_rules(config["depth"]), expected, "Resampler oracle")
    network.load_state_dict({k.removeprefix("adapter.context."): v for k, v in converted.items()})
    with torch.no_grad():
        out = network.eval()(tensors["input.clip_image_tokens"], config["video_length"])
    return [compare("output.image_tokens", out, tensors["output.image_tokens"])]


def _stylecrafter(spec: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path) -> list[Comparison]:
    """VideoCrafter1 with StyleCrafter: base weights, then the adapter, then the temporal override (the
    official order). The styled outputs are compared with the xformers-path twin when it lies beside
    `file`, anima's default attention scaling; otherwise with the official CPU path's, unscaled."""
    config = spec["unet_config"]
    adapter_params = spec["adapter_config"]["params"]
    image_width = adapter_params["image_context_config"]["params"]["in_dim"]
    style = sc.style_config_of(adapter_params, "oracle")
    parts = sc.build_adapter_parts(config, style, image_width)
    base = _weights(tensors, sc.UNET_PREFIX)
    unet_rules = prefixed(lvdm.unet_rules(config, target="unet."), source=sc.UNET_PREFIX)
    expected = {f"unet.{k}": v for k, v in parts.unet.state_dict().items()}
    parts.unet.load_state_dict(
        ldm_parts.part(remap(base, unet_rules, expected, "VideoCrafter1 oracle"), "unet.")
    )
    x, t, text = tensors["input.x"], tensors["input.timesteps"], tensors["input.context_text"]
    with torch.no_grad():
        results = [
            compare(
                "output.unet_out_vc1_base", parts.unet(x, t, text).sample, tensors["output.unet_out_vc1_base"]
            )
        ]

    adapter = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    temporal = {
        k.removeprefix("temporal/").replace("/", "."): v
        for k, v in tensors.items()
        if k.startswith("temporal/")
    }
    converted = sc.convert_adapter(adapter, temporal, parts, style, "StyleCrafter oracle")
    parts.unet.load_state_dict(ldm_parts.part(converted, "unet."), strict=False)
    adapters.load_parts(ldm_parts.part(converted, "adapter."), parts.modules.parts(), parts.unet)
    install_style(parts.unet, parts.modules)
    twin = file.with_name(f"{file.stem}{XFORMERS_TWIN}{file.suffix}")
    styled = load_file(str(twin)) if twin.exists() else tensors
    for processor in parts.modules.processors.values():
        processor.logit_scale = None if twin.exists() else 1.0
    m = parts.modules
    with torch.no_grad():
        tokens = m.qformer(tensors["input.clip_style_tokens"])
        scales = m.scales(tokens, text)
        m.set_scales(scales)
        outputs = {
            "output.style_tokens": tokens,
            "output.style_tokens_multiref": m.qformer(tensors["input.clip_style_tokens_multiref"]),
            "output.scale_scalar": (scales - 1)[..., None],  # the official tanh output; layer i uses 1 + it
            "output.unet_out_nostyle": parts.unet(x, t, text).sample,
            "output.unet_out_style": parts.unet(x, t, torch.cat([text, tokens], 1)).sample,
        }
    for name, got in outputs.items():
        results.append(compare(name, got, (styled if name == "output.unet_out_style" else tensors)[name]))
    return results


def _family(spec: dict[str, Any]) -> str:
    classes = spec.get("official_classes") or {}
    return spec.get("official_class") or classes.get("unet", "")


FAMILIES: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor], Path], list[Comparison]]] = {
    "lvdm.modules.networks.openaimodel3d.UNetModel (DynamiCrafter)": lambda s, t, _: _dynamicrafter_unet(
        s, t
    ),
    "lvdm.modules.encoders.resampler.Resampler": lambda s, t, _: _dynamicrafter_resampler(s, t),
    "lvdm.modules.networks.openaimodel3d.UNetModel (StyleCrafter repo; VideoCrafter1 architecture, "
    "relative-position temporal attention)": _stylecrafter,
}


def check_oracle(path: str) -> list[Comparison]:
    """Every output and intermediate of the oracle file at `path`, compared (raises if it cannot run)."""
    file = Path(path)
    spec_path = file.with_suffix(".json")
    if not spec_path.exists():
        raise ConversionError(f"no oracle description {spec_path} beside {file}")
    spec = json.loads(spec_path.read_text())
    family = FAMILIES.get(_family(spec))
    twin_of = file.with_name(file.name.replace(XFORMERS_TWIN, ""))
    if family is None and XFORMERS_TWIN in file.stem and twin_of.exists():
        # An outputs-only twin: the oracle it belongs to holds the weights and inputs, and compares its
        # styled outputs with this file's.
        return check_oracle(str(twin_of))
    if family is None:
        raise ConversionError(
            f"oracle {file.name}: official class {_family(spec)!r} is not one anima converts; "
            f"known: {', '.join(FAMILIES)}"
        )
    torch.manual_seed(0)
    return family(spec, load_file(str(file)), file)

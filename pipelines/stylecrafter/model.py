"""StyleCrafter's style adapter on a text-to-video UNet (Liu et al., SIGGRAPH Asia 2024; official code
`GongyeLiu/StyleCrafter`, inference only).

- Style tokens: CLIP vision tokens (the CLS after its final LayerNorm + the last layer's patch tokens) of
  one or more references, concatenated across references -> a Q-Former with 8 learned style queries
  (self-attention over [queries; image tokens]) -> 8 style tokens in the cross-attention width.
- Style cross-attention in every spatial `attn2`: text attention + s_i · LayerNorm(style attention), the
  style key/value projections initialized from the text ones.
- Scale factors: learned queries over [style tokens; text tokens] -> one s_i = 1 + tanh(·) per spatial
  cross-attention layer, mapped to layers by module name in the paper's order (encoder, middle,
  decoder; diffusers registers down, up, mid).

A context of text only skips the style branch, so without style the model is the base backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipelines import adapters, attention
from pipelines.adapters import OFFICIAL_IMAGE_ENCODER
from pipelines.backbone import Backbone

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def paper_order(names: list[str]) -> list[str]:
    """Layer names in the papers' order: encoder blocks, middle, decoder blocks, each by index."""

    def key(name: str) -> tuple[int, ...]:
        part, *rest = name.split(".")
        return (_BLOCK_ORDER[part], *(int(p) for p in rest if p.isdigit()))

    return sorted(names, key=key)


@dataclass(frozen=True)
class StyleConfig:
    """Defaults are the official adapter's (`image_context_config`, `scale_predictor_config`).

    A converted official adapter also records `sample_defaults`, its official inference settings,
    and `variant` ("official"). `style_weight` is the official `--style_weight` (the adapter's `scale`).
    """

    image_encoder: str = OFFICIAL_IMAGE_ENCODER
    style_tokens: int = 8
    qformer_layers: int = 3
    qformer_heads: int = 8
    scale_layers: int = 2
    scale_heads: int = 8
    style_weight: float = 1.0
    variant: str | None = None
    sample_defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def small(cls, image_encoder: str) -> StyleConfig:
        """A small adapter for tiny backbones (tests, demo)."""
        return cls(image_encoder, style_tokens=4, qformer_layers=1, qformer_heads=2, scale_layers=1,
                   scale_heads=2)  # fmt: skip


def _transformer(width: int, layers: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class StyleQFormer(nn.Module):
    """CLIP tokens [B, N, E] -> style tokens [B, K, D]: learned queries prepended, self-attention, first K."""

    def __init__(self, config: StyleConfig, embedding_dim: int, output_dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, config.style_tokens, embedding_dim) / embedding_dim**0.5)
        self.norm_in = nn.LayerNorm(embedding_dim)
        self.blocks = _transformer(embedding_dim, config.qformer_layers, config.qformer_heads)
        self.norm_out = nn.LayerNorm(embedding_dim)
        self.proj = nn.Parameter(torch.randn(embedding_dim, output_dim) / embedding_dim**0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        k = self.queries.shape[1]
        x = self.norm_in(torch.cat([self.queries.expand(len(tokens), -1, -1).to(tokens.dtype), tokens], 1))
        return self.norm_out(self.blocks(x)[:, :k]) @ self.proj.to(tokens.dtype)


class ScalePredictor(nn.Module):
    """[style tokens; text tokens] -> one factor per layer, s = 1 + tanh(·) ∈ (0, 2)."""

    def __init__(self, config: StyleConfig, width: int, num_layers: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_layers, width) / width**0.5)
        self.norm_in = nn.LayerNorm(width)
        self.blocks = _transformer(width, config.scale_layers, config.scale_heads)
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, style: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        n = self.queries.shape[1]
        x = torch.cat(
            [self.queries.expand(len(style), -1, -1).to(style.dtype), style, text.to(style.dtype)], 1
        )
        out = self.norm_out(self.blocks(self.norm_in(x))[:, :n])
        return 1 + torch.tanh(self.head(out)[..., 0])  # [B, layers]


class StyleProcessor(attention.ExtraStreamProcessor):
    """One layer's style cross-attention: text + w · s · LayerNorm(style attention), w the style weight.

    The style logits are scaled by 1/√d, as the official code computes them where it runs on GPUs (its
    xformers path); `logit_scale = 1.0` is its CPU fallback, which leaves them unscaled.
    """

    def __init__(self, attn: nn.Module, style_weight: float = 1.0):
        inner, context = attn.to_k.out_features, attn.to_k.in_features
        super().__init__(inner, context, tokens_per_frame=None)
        with torch.no_grad():  # the official adapter starts its style K/V from the text ones
            self.to_k_extra.weight.copy_(attn.to_k.weight)
            self.to_v_extra.weight.copy_(attn.to_v.weight)
        self.norm = nn.LayerNorm(inner)
        self.style_weight = style_weight
        self.scale: torch.Tensor | None = None  # [B], set by StyleCrafter.set_scales before each UNet call

    def weight(self, extra: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("style tokens were given without scale factors")
        rows = extra.shape[0]
        scale = self.scale.to(extra.dtype).repeat_interleave(
            rows // len(self.scale)
        )  # per (sample, frame) row
        return (self.style_weight * scale).view(-1, 1, 1) * self.norm(extra)


@dataclass(eq=False)
class StyleModules:
    """What StyleCrafter adds to a UNet, before or after `install` puts it there."""

    layers: list[str]  # spatial attn2 names in the paper's order: scale factor i is layer i's
    qformer: StyleQFormer
    scales: ScalePredictor
    processors: nn.ModuleDict

    def parts(self) -> dict[str, nn.Module]:
        return {"qformer.": self.qformer, "scales.": self.scales, "processors.": self.processors}

    def set_scales(self, scales: torch.Tensor | None) -> None:
        """The scale factors the processors use until the next call sets others.

        They stay set after the UNet call: gradient checkpointing recomputes the layers during backward.
        A context without style tokens skips the style branch whatever is set.
        """
        for i, name in enumerate(self.layers):
            self.processors[name.replace(".", "__")].scale = None if scales is None else scales[:, i]


def style_modules(unet: nn.Module, config: StyleConfig, image_width: int) -> StyleModules:
    """StyleCrafter's new modules sized for `unet` (converters and check-oracle read their keys)."""
    width = unet.config.cross_attention_dim
    layers = paper_order(attention.spatial_cross_attention_names(unet))
    modules = dict(unet.named_modules())
    processors = nn.ModuleDict(
        {n.replace(".", "__"): StyleProcessor(modules[n], config.style_weight) for n in layers}
    )
    qformer = StyleQFormer(config, image_width, width)
    return StyleModules(layers, qformer, ScalePredictor(config, width, len(layers)), processors)


def install(unet: nn.Module, modules: StyleModules) -> None:
    attention.install(unet, lambda name, _: modules.processors[name.replace(".", "__")])


class StyleCrafter(adapters.AdapterFiles, nn.Module):
    """A backbone with StyleCrafter's style adapter; it takes over (modifies) the backbone's UNet."""

    def __init__(self, backbone: Backbone, image_encoder: nn.Module, config: StyleConfig):
        super().__init__()
        self.backbone, self.config = backbone, config
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.parts = style_modules(backbone.unet, config, image_encoder.config.hidden_size)
        install(backbone.unet, self.parts)
        self.layers, self.qformer, self.scales, self.processors = (
            self.parts.layers,
            self.parts.qformer,
            self.parts.scales,
            self.parts.processors,
        )
        self.to(backbone.device)
        for module in (self.processors, self.qformer, self.scales):
            module.to(backbone.dtype)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """References [R, 3, H, W] in [-1, 1] -> [1, R·(1 + patches), E]: CLS (post-LN) and patch tokens,
        rounded to fp16 as the official embedder returns them, references concatenated on the token axis."""
        out = adapters.encode_images(self.image_encoder, images)
        tokens = torch.cat([out.pooler_output[:, None], out.last_hidden_state[:, 1:]], 1)
        return tokens.to(torch.float16).to(tokens.dtype).reshape(1, -1, tokens.shape[-1])

    def style(self, references: list[torch.Tensor], text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Style tokens [B, K, D] and scale factors [B, layers] of each sample's references and prompt."""
        tokens = [self.qformer(self.image_tokens(r).to(self.backbone.dtype)) for r in references]
        style = torch.cat(tokens)
        return style, self.scales(style, text)

    def set_scales(self, scales: torch.Tensor | None) -> None:
        self.parts.set_scales(scales)

    def predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        style: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's raw output (ε or v) given text [B, 77, D] and optionally style tokens [B, K, D] with
        their scales [B, layers]."""
        tokens = text if style is None else torch.cat([text, style.to(text.dtype)], 1)
        self.set_scales(scales)
        return self.backbone.predict(latents, t, tokens)

    # -- adapter files --------------------------------------------------------------------------

    def _parts(self) -> dict[str, nn.Module]:
        return self.parts.parts()


def read_adapter(directory: str) -> tuple[StyleConfig, dict[str, torch.Tensor]]:
    config, weights = adapters.read_adapter(directory)
    return StyleConfig(**config), weights


def load_stylecrafter(models: dict[str, str | None], device: str, dtype: torch.dtype) -> StyleCrafter:
    """StyleCrafter on the backbone: from `models["adapter"]`, or untrained (official sizes at 1024)."""

    def default(width: int, encoder: str) -> StyleConfig:
        return StyleConfig(encoder) if width == 1024 else StyleConfig.small(encoder)

    return adapters.load_model(models, device, dtype, StyleCrafter, StyleConfig, default)

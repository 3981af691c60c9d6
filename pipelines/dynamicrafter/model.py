"""DynamiCrafter's additions to a text-to-video UNet (Xing et al., ECCV 2024; `Doubiiu/DynamiCrafter`).

- Context network: all tokens of the last layer of a CLIP vision tower -> a query transformer (Perceiver
  resampler) -> `queries_per_frame` context tokens per frame in the UNet's cross-attention width.
- Dual cross-attention in every spatial `attn2`: text attention + λ · attention over the frame's context
  tokens, with their own key/value projections.
- Visual detail guidance: the condition image's VAE latent concatenated to the noisy latent (conv_in
  with 8 input channels).
- fs conditioning: an embedding of the frame stride (official 256) or the fps (official 512/1024) added
  to the time embedding.

The gate λ follows `ContextConfig.gate`: the official 256 model's 1 + tanh(α), the official 512/1024
models' constant 1, or anima's tanh(α) for adapters trained from scratch, which starts at 0 so that a
new adapter (with zero new conv_in weights and a zero last fs-embedding layer) is exactly the backbone.
Converted official models carry their 8-channel conv_in in the backbone's `unet/`. The per-frame queries
of the resampler are interpolated along the frame axis for clips whose length differs from
`video_length` (the official models only run 16 frames).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from pipelines import adapters, attention
from pipelines.adapters import OFFICIAL_IMAGE_ENCODER
from pipelines.backbone import Backbone
from pipelines.model_cache import ModelLoadError

GATES = ("tanh", "one_plus_tanh", "one")
FS_KINDS = ("frame_stride", "fps")


@dataclass(frozen=True)
class ContextConfig:
    """The adapter's configuration (adapter.json).

    The query transformer's defaults are the official 256/512/1024 models' (`image_proj_stage_config`).
    A converted official model also records what differs between the variants: its gate, what its fs
    input means, and `sample_defaults`, the sampling parameters its official inference uses (fs value,
    size, repeated condition latent, guidance rescale, dynamic rescale). `schedule` records the noise
    schedule it was trained with, which the backbone's scheduler must match.
    """

    image_encoder: str = OFFICIAL_IMAGE_ENCODER
    dim: int = 1024
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4
    queries_per_frame: int = 16
    video_length: int = 16
    gate: str = "tanh"
    widen_conv_in: bool = True  # False: the backbone's conv_in already takes the condition latent
    fs_kind: str = "frame_stride"
    variant: str | None = None  # the official model it was converted from: 256, 512, 1024, 512_interp
    sample_defaults: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    frames_mismatch: str = "interpolate"  # or "share": see DynamiCrafter.image_context

    def __post_init__(self) -> None:
        if self.gate not in GATES or self.fs_kind not in FS_KINDS:
            raise ValueError(f"gate must be one of {GATES} and fs_kind one of {FS_KINDS}")
        if self.frames_mismatch not in ("interpolate", "share"):
            raise ValueError(f"frames_mismatch must be interpolate or share, got {self.frames_mismatch!r}")

    @classmethod
    def small(cls, image_encoder: str, width: int) -> ContextConfig:
        """A small context network for tiny backbones (tests, demo)."""
        return cls(image_encoder=image_encoder, dim=width, depth=2, heads=2, dim_head=16, queries_per_frame=4,
                   video_length=4)  # fmt: skip


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media_tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, lat = self.norm_media(media_tokens), self.norm_latents(latents)
        b = x.shape[0]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        k, v = self.to_kv(torch.cat([x, lat], 1)).chunk(2, -1)
        out = F.scaled_dot_product_attention(split(self.to_q(lat)), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, lat.shape[1], -1))


class ContextNetwork(nn.Module):
    """Perceiver resampler: image tokens [B, N, E] -> context tokens [B, frames·Q, D], Q per frame."""

    def __init__(self, config: ContextConfig, embedding_dim: int, output_dim: int):
        super().__init__()
        self.config = config
        d = config.dim
        self.latents = nn.Parameter(
            torch.randn(1, config.video_length * config.queries_per_frame, d) / d**0.5
        )
        self.proj_in = nn.Linear(embedding_dim, d)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    _PerceiverAttention(d, config.heads, config.dim_head),
                    nn.Sequential(
                        nn.LayerNorm(d),
                        nn.Linear(d, d * config.ff_mult, bias=False),
                        nn.GELU(),
                        nn.Linear(d * config.ff_mult, d, bias=False),
                    ),
                ]
            )
            for _ in range(config.depth)
        )
        self.proj_out = nn.Linear(d, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def queries(self, frames: int) -> torch.Tensor:
        """The learned per-frame queries, linearly resampled along time for another clip length."""
        cfg = self.config
        q = self.latents.view(cfg.video_length, cfg.queries_per_frame, -1)
        if frames != cfg.video_length:
            q = F.interpolate(q.permute(1, 2, 0), size=frames, mode="linear", align_corners=True).permute(
                2, 0, 1
            )
        return q.reshape(1, frames * cfg.queries_per_frame, -1)

    def forward(self, image_tokens: torch.Tensor, frames: int) -> torch.Tensor:
        x = self.proj_in(image_tokens)
        lat = self.queries(frames).expand(len(x), -1, -1).to(x.dtype)
        for attn, ff in self.layers:
            lat = lat + attn(x, lat)
            lat = lat + ff(lat)
        return self.norm_out(self.proj_out(lat))


class GatedContextProcessor(attention.ExtraStreamProcessor):
    """One layer's image cross-attention: text + λ · attention over its frame's context tokens, with
    λ = tanh(α), 1 + tanh(α) or 1 (`gate`)."""

    def __init__(self, inner_dim: int, context_dim: int, tokens_per_frame: int, gate: str = "tanh"):
        super().__init__(inner_dim, context_dim, tokens_per_frame)
        self.gate = gate
        if gate != "one":
            self.alpha = nn.Parameter(torch.zeros(()))

    def weight(self, extra: torch.Tensor) -> torch.Tensor:
        if self.gate == "one":
            return extra
        gate = torch.tanh(self.alpha) + (1.0 if self.gate == "one_plus_tanh" else 0.0)
        return gate.to(extra.dtype) * extra


class FsEmbedding(nn.Module):
    """The embedding of fs, the frame stride or fps, added to the UNet's time embedding (official
    `fps_embedding`: sinusoidal features of fs, cos first, then Linear-SiLU-Linear; last layer
    zero-initialized for a new adapter). It rides on a forward hook of the UNet's `time_embedding`,
    so the UNet keeps its own module names."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.stride_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.stride_embedding = TimestepEmbedding(channels, embed_dim)
        nn.init.zeros_(self.stride_embedding.linear_2.weight)
        nn.init.zeros_(self.stride_embedding.linear_2.bias)
        self.fs: torch.Tensor | None = None  # set around each UNet call

    def add_to(self, _module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        if self.fs is None:
            return out
        fs = self.fs.to(out.device).reshape(-1).expand(out.shape[0])
        return out + self.stride_embedding(self.stride_proj(fs).to(out.dtype))


def place_condition(
    latents: torch.Tensor, frames: int, positions: list[list[int]], repeat: bool = False
) -> torch.Tensor:
    """Condition latents [B, C, K, h, w] placed on `frames` frames: sample b's latent k at frame
    positions[b][k], zeros elsewhere; `repeat` instead repeats the first over every frame (the official
    image-to-video layout)."""
    if repeat:
        return latents[:, :, :1].expand(-1, -1, frames, -1, -1).contiguous()
    out = latents.new_zeros(latents.shape[0], latents.shape[1], frames, *latents.shape[3:])
    for i, where in enumerate(positions):
        for j, f in enumerate(where):
            out[i, :, f] = latents[i, :, j]
    return out


def _widen_conv_in(unet: nn.Module, extra: int) -> None:
    """Add `extra` zero-initialized input channels to conv_in: the UNet ignores them until trained."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding)
    new = new.to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


@dataclass(eq=False)
class AdapterModules:
    """What DynamiCrafter adds to a UNet, before or after `install` puts it there."""

    context: ContextNetwork
    processors: nn.ModuleDict
    fs_embedding: FsEmbedding

    def parts(self) -> dict[str, nn.Module]:
        """The adapter file's key prefixes and modules (a widened conv_in comes on top)."""
        return {
            "context.": self.context,
            "processors.": self.processors,
            "stride_embedding.": self.fs_embedding.stride_embedding,
        }


def adapter_modules(unet: nn.Module, config: ContextConfig, image_width: int) -> AdapterModules:
    """DynamiCrafter's new modules sized for `unet`, without touching it (converters read their keys)."""
    width = unet.config.cross_attention_dim
    modules = dict(unet.named_modules())
    processors = nn.ModuleDict(
        {
            name.replace(".", "__"): GatedContextProcessor(
                modules[name].to_q.out_features, width, config.queries_per_frame, config.gate
            )
            for name in attention.spatial_cross_attention_names(unet)
        }
    )
    fs_embedding = FsEmbedding(unet.config.block_out_channels[0], unet.time_embedding.linear_2.out_features)
    return AdapterModules(ContextNetwork(config, image_width, width), processors, fs_embedding)


def install(unet: nn.Module, parts: AdapterModules, config: ContextConfig) -> None:
    """Turn a UNet into DynamiCrafter's in place: processors in its spatial attn2, the fs embedding on
    its time embedding, and (for a new adapter) the widened conv_in.

    The same code serves a full model and the bare official-layout UNet that `check-oracle` runs.
    """
    attention.install(unet, lambda name, _: parts.processors[name.replace(".", "__")])
    if config.widen_conv_in:
        _widen_conv_in(unet, unet.config.out_channels)
    elif unet.config.in_channels != 2 * unet.config.out_channels:
        raise ValueError(
            f"the backbone's UNet takes {unet.config.in_channels} input channels; without widening it "
            f"needs {2 * unet.config.out_channels} (noisy latent + condition latent)"
        )
    unet.time_embedding.register_forward_hook(parts.fs_embedding.add_to)


class DynamiCrafter(adapters.AdapterFiles, nn.Module):
    """A backbone turned into DynamiCrafter. It takes over (modifies) the backbone's UNet."""

    def __init__(self, backbone: Backbone, image_encoder: nn.Module, config: ContextConfig):
        super().__init__()
        self.backbone, self.config = backbone, config
        scheduler = backbone.scheduler.config
        wrong = {k: (v, scheduler.get(k)) for k, v in config.schedule.items() if scheduler.get(k) != v}
        if wrong:
            raise ModelLoadError(
                f"the adapter ({config.variant or 'converted'}) needs a backbone scheduler with "
                + ", ".join(f"{k}={v!r} (this backbone has {have!r})" for k, (v, have) in wrong.items())
            )
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.parts = adapter_modules(backbone.unet, config, image_encoder.config.hidden_size)
        install(backbone.unet, self.parts, config)
        self.context, self.processors, self.fs_embedding = (
            self.parts.context,
            self.parts.processors,
            self.parts.fs_embedding,
        )
        self.to(backbone.device)
        for module in (self.context, self.processors, self.fs_embedding):
            module.to(backbone.dtype)

    # -- conditions ------------------------------------------------------------------------------

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> all last-layer CLIP tokens [B, N, E] (no final LayerNorm)."""
        return adapters.encode_images(self.image_encoder, images).last_hidden_state

    def image_context(self, images: torch.Tensor, frames: int) -> torch.Tensor:
        """Context tokens [B, frames·Q, D] of condition images (gray images stand for "no image").

        With `frames_mismatch="share"` (converted official models) a clip of another length than
        `video_length` gets the video_length·Q tokens, which every frame then attends to, as the
        official UNet does; anima-trained adapters resample the queries to the clip's length."""
        length = self.config.video_length if self.config.frames_mismatch == "share" else frames
        return self.context(self.image_tokens(images).to(self.backbone.dtype), length)

    @torch.no_grad()
    def condition_latents(
        self,
        images: torch.Tensor,
        frames: int,
        positions: list[list[int]],
        repeat: bool = False,
        generators: list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Visual detail guidance input [B, C, frames, h, w] of condition images [B, K, 3, H, W] in [-1, 1].

        The latents are VAE posterior samples, as the official code draws them (each image its own
        noise, sample b's from `generators[b]`); see `place_condition` for where they go.
        """
        sampled = self.backbone.encode_frames(
            images.to(self.backbone.device), sample=True, generators=generators
        )  # [B, C, K, h, w]
        return place_condition(sampled, frames, positions, repeat)

    # -- denoising ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def conditioning(self, fs: torch.Tensor | None, frames: int) -> Iterator[None]:
        """fs and the clip length for the UNet call inside: the fs embedding and the processors read them."""
        self.fs_embedding.fs = fs
        for p in self.processors.values():
            p.frames = frames
        try:
            yield
        finally:
            self.fs_embedding.fs = None
            for p in self.processors.values():
                p.frames = None

    def predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        context: torch.Tensor | None,
        condition: torch.Tensor,
        fs: torch.Tensor | None,
    ) -> torch.Tensor:
        """The raw UNet output (ε or v) for noisy latents [B, C, F, h, w] given text [B, 77, D], image
        context, condition latents and fs (frame stride or fps, as the adapter's `fs_kind`)."""
        tokens = text if context is None else torch.cat([text, context.to(text.dtype)], 1)
        with self.conditioning(fs, latents.shape[2]):
            return self.backbone.predict(latents, t, tokens, extra_channels=condition)

    # -- adapter files --------------------------------------------------------------------------

    def _parts(self) -> dict[str, nn.Module]:
        parts = self.parts.parts()
        # A widened conv_in is the adapter's; a converted model's 8-channel conv_in is the backbone's.
        return {**parts, "conv_in.": self.backbone.unet.conv_in} if self.config.widen_conv_in else parts


def read_adapter(directory: str) -> tuple[ContextConfig, dict[str, torch.Tensor]]:
    config, weights = adapters.read_adapter(directory)
    return ContextConfig(**config), weights


def load_dynamicrafter(models: dict[str, str | None], device: str, dtype: torch.dtype) -> DynamiCrafter:
    """DynamiCrafter on the backbone: from `models["adapter"]`, or untrained (official sizes at 1024)."""

    def default(width: int, encoder: str) -> ContextConfig:
        return ContextConfig(encoder) if width == 1024 else ContextConfig.small(encoder, width)

    return adapters.load_model(models, device, dtype, DynamiCrafter, ContextConfig, default)

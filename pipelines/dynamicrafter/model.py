"""DynamiCrafter's additions to a text-to-video UNet (Xing et al., ECCV 2024; `Doubiiu/DynamiCrafter`).

- Context network: all tokens of the last layer of a CLIP vision tower -> a query transformer (Perceiver
  resampler) -> `queries_per_frame` context tokens per frame in the UNet's cross-attention width.
- Dual cross-attention in every spatial `attn2`: text attention + λ · attention over the frame's context
  tokens, with their own key/value projections; λ = tanh(α) per layer.
- Visual detail guidance: the condition image's VAE latent concatenated to the noisy latent (conv_in
  widened from 4 to 8 input channels).
- Frame-stride conditioning: an embedding of the frame stride added to the time embedding.

Every new part starts as the identity (zero gate α, zero new conv_in weights, zero last layer of the
frame-stride embedding), so the untrained model is exactly the base backbone. Deliberate differences
from the official code: λ = tanh(α) instead of 1 + tanh(α) (which is not the identity at the start);
the per-frame queries of the resampler are interpolated along the frame axis for clips whose length
differs from `video_length` (the official model only runs 16 frames).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from pipelines import adapters, attention
from pipelines.adapters import OFFICIAL_IMAGE_ENCODER
from pipelines.backbone import Backbone


@dataclass(frozen=True)
class ContextConfig:
    """The query transformer; defaults are the official 256/512/1024 models' (`image_proj_stage_config`)."""

    image_encoder: str = OFFICIAL_IMAGE_ENCODER
    dim: int = 1024
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4
    queries_per_frame: int = 16
    video_length: int = 16

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
    """One layer's image cross-attention: text + tanh(α) · attention over its frame's context tokens."""

    def __init__(self, inner_dim: int, context_dim: int, tokens_per_frame: int):
        super().__init__(inner_dim, context_dim, tokens_per_frame)
        self.alpha = nn.Parameter(torch.zeros(()))

    def weight(self, extra: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha).to(extra.dtype) * extra


class FrameStrideTimeEmbedding(nn.Module):
    """The UNet's time embedding plus an embedding of the frame stride (last layer zero-initialized)."""

    def __init__(self, time_embedding: nn.Module, channels: int, embed_dim: int):
        super().__init__()
        self.time_embedding = time_embedding
        self.stride_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.stride_embedding = TimestepEmbedding(channels, embed_dim)
        nn.init.zeros_(self.stride_embedding.linear_2.weight)
        nn.init.zeros_(self.stride_embedding.linear_2.bias)
        self.frame_stride: torch.Tensor | None = None  # set around each UNet call

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        out = self.time_embedding(sample, condition)
        if self.frame_stride is None:
            return out
        stride = self.frame_stride.to(out.device).reshape(-1).expand(out.shape[0])
        return out + self.stride_embedding(self.stride_proj(stride).to(out.dtype))


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


class DynamiCrafter(adapters.AdapterFiles, nn.Module):
    """A backbone turned into DynamiCrafter. It takes over (modifies) the backbone's UNet."""

    def __init__(self, backbone: Backbone, image_encoder: nn.Module, config: ContextConfig):
        super().__init__()
        self.backbone, self.config = backbone, config
        unet = backbone.unet
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        width = unet.config.cross_attention_dim
        self.context = ContextNetwork(config, image_encoder.config.hidden_size, width)
        self.processors = nn.ModuleDict()
        modules = dict(unet.named_modules())
        for name in attention.spatial_cross_attention_names(unet):
            inner = modules[name].to_q.out_features
            self.processors[name.replace(".", "__")] = GatedContextProcessor(
                inner, width, config.queries_per_frame
            )
        attention.install(unet, lambda name, _: self.processors[name.replace(".", "__")])
        _widen_conv_in(unet, unet.config.out_channels)
        self.time_embedding = FrameStrideTimeEmbedding(
            unet.time_embedding, unet.config.block_out_channels[0], unet.time_embedding.linear_2.out_features
        )
        unet.time_embedding = self.time_embedding
        self.to(backbone.device)
        for module in (self.context, self.processors, self.time_embedding.stride_embedding):
            module.to(backbone.dtype)

    # -- conditions ------------------------------------------------------------------------------

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> all last-layer CLIP tokens [B, N, E] (no final LayerNorm)."""
        return adapters.encode_images(self.image_encoder, images).last_hidden_state

    def image_context(self, images: torch.Tensor, frames: int) -> torch.Tensor:
        """Context tokens [B, frames·Q, D] of condition images (gray images stand for "no image")."""
        return self.context(self.image_tokens(images).to(self.backbone.dtype), frames)

    @torch.no_grad()
    def condition_latents(
        self, images: torch.Tensor, frames: int, positions: list[list[int]], repeat: bool = False
    ) -> torch.Tensor:
        """Visual detail guidance input [B, C, frames, h, w].

        images [B, K, 3, H, W] in [-1, 1]: sample b's image k is placed at frame positions[b][k], other
        frames are zero; `repeat` instead repeats the first image over every frame (the official I2V).
        """
        b, k = images.shape[:2]
        latents = self.backbone.encode_frames(images.to(self.backbone.device))  # [B, C, K, h, w]
        if repeat:
            return latents[:, :, :1].expand(-1, -1, frames, -1, -1).contiguous()
        out = latents.new_zeros(b, latents.shape[1], frames, *latents.shape[3:])
        for i in range(b):
            for j in range(k):
                out[i, :, positions[i][j]] = latents[i, :, j]
        return out

    # -- denoising ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def frame_stride(self, stride: torch.Tensor | None) -> Iterator[None]:
        self.time_embedding.frame_stride = stride
        try:
            yield
        finally:
            self.time_embedding.frame_stride = None

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        context: torch.Tensor | None,
        condition: torch.Tensor,
        stride: torch.Tensor | None,
    ) -> torch.Tensor:
        """ε for noisy latents [B, C, F, h, w] given text [B, 77, D], image context, condition latents."""
        tokens = text if context is None else torch.cat([text, context.to(text.dtype)], 1)
        with self.frame_stride(stride):
            return self.backbone.predict_noise(latents, t, tokens, extra_channels=condition)

    # -- adapter files --------------------------------------------------------------------------

    def _parts(self) -> dict[str, nn.Module]:
        return {
            "context.": self.context,
            "processors.": self.processors,
            "stride_embedding.": self.time_embedding.stride_embedding,
            "conv_in.": self.backbone.unet.conv_in,
        }


def read_adapter(directory: str) -> tuple[ContextConfig, dict[str, torch.Tensor]]:
    config, weights = adapters.read_adapter(directory)
    return ContextConfig(**config), weights


def load_dynamicrafter(models: dict[str, str | None], device: str, dtype: torch.dtype) -> DynamiCrafter:
    """DynamiCrafter on the backbone: from `models["adapter"]`, or untrained (official sizes at 1024)."""

    def default(width: int, encoder: str) -> ContextConfig:
        return ContextConfig(encoder) if width == 1024 else ContextConfig.small(encoder, width)

    return adapters.load_model(models, device, dtype, DynamiCrafter, ContextConfig, default)

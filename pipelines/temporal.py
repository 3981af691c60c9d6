"""A video UNet's temporal layers: VideoCrafter1's relative-position attention, its missing temporal
convolutions, and skipping every temporal layer to generate images.

diffusers' UNet3D (ModelScope's design) has a temporal convolution after every ResNet and plain
self-attention over frames. VideoCrafter1's UNet has no temporal convolutions, and every attention of
its temporal transformers (both `attn1` and `attn2`, `transformer_in` included) adds learned relative
position embeddings: for query frame i and key frame j, with r = clamp(j − i, −m, m) + m,
    logits_ij = (q_i · k_j + q_i · K_r) / √d,    out_i = Σ_j p_ij (v_j + V_r),
one [2m + 1, d] table K and one V shared by all heads. That attention is a diffusers attention
processor (`RelativePositionProcessor`); ModelScope backbones keep their processors and convolutions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

TEMPORAL_ATTENTION_SUFFIXES = (".attn1", ".attn2")
# A saved UNet's config.json holds this key when its temporal layers are VideoCrafter1's: diffusers
# keeps private (underscore) config keys and builds the ModelScope layers, which `apply_variant` then
# turns into VideoCrafter1's before the weights are loaded.
CONFIG_KEY = "_anima_temporal"


class RelativePositionProcessor(nn.Module):
    """Self-attention over frames with relative position keys and values (VideoCrafter1)."""

    def __init__(self, head_dim: int, max_distance: int):
        super().__init__()
        self.max_distance = max_distance
        self.relative_k = nn.Parameter(torch.zeros(2 * max_distance + 1, head_dim))
        self.relative_v = nn.Parameter(torch.zeros(2 * max_distance + 1, head_dim))
        nn.init.xavier_uniform_(self.relative_k)
        nn.init.xavier_uniform_(self.relative_v)

    def tables(self, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V embeddings [frames, frames, d] for every (query, key) pair."""
        positions = torch.arange(frames, device=device)
        distance = positions[None, :] - positions[:, None]  # key − query
        index = distance.clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.relative_k[index], self.relative_v[index]

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("relative-position temporal attention is self-attention without a mask")
        b, frames, _ = hidden_states.shape
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, frames, heads, -1).transpose(1, 2)  # [b, heads, frames, d]

        q, k, v = (
            split(attn.to_q(hidden_states)),
            split(attn.to_k(hidden_states)),
            split(attn.to_v(hidden_states)),
        )
        rel_k, rel_v = (t.to(q.dtype) for t in self.tables(frames, q.device))
        logits = (q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, rel_k)) * attn.scale
        p = logits.softmax(dim=-1)
        out = p @ v + torch.einsum("bhij,ijd->bhid", p, rel_v)
        out = out.transpose(1, 2).reshape(b, frames, -1)
        return attn.to_out[1](attn.to_out[0](out))


class NoTemporalConv(nn.Module):
    """Stands in for a temporal convolution a UNet does not have (VideoCrafter1): the identity."""

    def forward(self, hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        return hidden_states


class _SkippedTemporalTransformer(nn.Module):
    """A temporal transformer that is not run: returns its input as diffusers' tuple output."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        return (hidden_states,)


def temporal_attention_names(unet: nn.Module) -> list[str]:
    """Every attention of the temporal transformers, `transformer_in` included."""
    return [
        name
        for name, _ in unet.named_modules()
        if ("temp_attentions" in name or name.startswith("transformer_in"))
        and name.endswith(TEMPORAL_ATTENTION_SUFFIXES)
    ]


def use_videocrafter_temporal_layers(unet: nn.Module, max_distance: int) -> None:
    """Make a diffusers UNet3D VideoCrafter1's: no temporal convolutions, relative-position attention."""
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if hasattr(block, "temp_convs"):
            block.temp_convs = nn.ModuleList(NoTemporalConv() for _ in block.temp_convs)
    modules = dict(unet.named_modules())
    for name in temporal_attention_names(unet):
        attn = modules[name]
        head_dim = attn.to_q.out_features // attn.heads
        attn.set_processor(RelativePositionProcessor(head_dim, max_distance).to(attn.to_q.weight.device))


def variant_of(temporal_conv: bool, relative_position: int | None) -> dict | None:
    """The CONFIG_KEY entry of a UNet (None: diffusers' own temporal layers)."""
    if temporal_conv and not relative_position:
        return None
    return {"temporal_conv": temporal_conv, "relative_position": relative_position}


def apply_variant(unet: nn.Module, variant: dict | None) -> nn.Module:
    """Give a freshly built UNet3D the temporal layers its CONFIG_KEY entry names."""
    if variant:
        if variant["temporal_conv"] or not variant["relative_position"]:
            raise ValueError(f"unsupported temporal layers {variant}: only VideoCrafter1's are known")
        use_videocrafter_temporal_layers(unet, variant["relative_position"])
    return unet


@contextlib.contextmanager
def temporal_layers_skipped(unet: nn.Module) -> Iterator[None]:
    """Run the UNet as an image model: every temporal transformer and temporal convolution is taken out
    (not called at all) for the duration, as the official image models skip them."""
    saved: list[tuple[nn.Module, str, nn.Module]] = [(unet, "transformer_in", unet.transformer_in)]
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for attr, stand_in in (
            ("temp_attentions", _SkippedTemporalTransformer),
            ("temp_convs", NoTemporalConv),
        ):
            if hasattr(block, attr):
                saved.append((block, attr, getattr(block, attr)))
                setattr(block, attr, nn.ModuleList(stand_in() for _ in getattr(block, attr)))
    unet.transformer_in = _SkippedTemporalTransformer()
    try:
        yield
    finally:
        for owner, attr, module in saved:
            setattr(owner, attr, module)

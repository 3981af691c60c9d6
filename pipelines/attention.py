"""Extra cross-attention streams in a UNet's spatial cross-attention (DynamiCrafter, StyleCrafter).

Both methods keep the text cross-attention of every spatial `attn2` and add a second attention over
other tokens (image context, style) with its own key/value projections and the same query, summed into
the layer's output before its output projection: out = to_out(attn(q, text) + w · extra(attn(q, tokens))).
The extra tokens ride behind the 77 text tokens in `encoder_hidden_states`, which UNet3D repeats for
every frame; a processor splits them off again. A context of text only skips the extra stream, so the
layer is then exactly the base model's.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

TEXT_TOKENS = 77
# Spatial cross-attention only: not the temporal layers (temp_attentions), not transformer_in.
SPATIAL_CROSS_ATTENTION = re.compile(
    r"^(down_blocks|up_blocks|mid_block)\..*\battentions\.\d+\.transformer_blocks\.\d+\.attn2$"
)


def spatial_cross_attention_names(unet: nn.Module) -> list[str]:
    """Module names of the UNet's spatial cross-attention layers (ModelScope/ZeroScope/VideoCrafter: 16)."""
    return [name for name, _ in unet.named_modules() if SPATIAL_CROSS_ATTENTION.match(name)]


class ExtraStreamProcessor(nn.Module):
    """Processor of one `attn2`: text attention plus a weighted attention over the extra tokens.

    `tokens_per_frame`: the extra tokens hold that many tokens per frame, frame-major (DynamiCrafter's
    context: 16 per frame); row r of the (batch·frames) UNet batch attends to frame r mod frames, unless
    the tokens are for another number of frames than `frames`, when every row attends to all of them.
    None: every row attends to all extra tokens (StyleCrafter's style tokens).
    `weight(processor, extra_output) -> weighted output` is set by the method: a tanh gate, a predicted
    scale, a normalisation.
    """

    def __init__(self, inner_dim: int, context_dim: int, tokens_per_frame: int | None = None):
        super().__init__()
        self.to_k_extra = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v_extra = nn.Linear(context_dim, inner_dim, bias=False)
        self.tokens_per_frame = tokens_per_frame
        self.frames: int | None = None  # the clip length of the current UNet call, when the method knows it
        self.logit_scale: float | None = None  # of the extra attention's logits; None: 1/√d
        self.base = AttnProcessor2_0()

    def weight(self, extra: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _extra_tokens(self, extra: torch.Tensor, rows: int) -> torch.Tensor:
        if self.tokens_per_frame is None:
            return extra
        per = self.tokens_per_frame
        frames = self.frames or extra.shape[1] // per
        if frames * per != extra.shape[1]:
            # Tokens for another clip length: every frame attends to all of them, as the official UNet
            # does with a context that is not 77 + 16·frames long.
            return extra
        if rows % frames:
            raise ValueError(f"{rows} rows are not a whole number of clips of {frames} frames")
        # Row b·F + f holds sample b's whole context; it attends to frame f's tokens.
        index = torch.arange(rows, device=extra.device) % frames
        return extra.view(rows, frames, per, -1)[torch.arange(rows, device=extra.device), index]

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= TEXT_TOKENS:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        text, extra = encoder_hidden_states[:, :TEXT_TOKENS], encoder_hidden_states[:, TEXT_TOKENS:]
        out = self.base(attn, hidden_states, text, attention_mask, temb)
        extra = self._extra_tokens(extra, hidden_states.shape[0])
        b, heads = hidden_states.shape[0], attn.heads
        query = attn.to_q(hidden_states)
        key, value = self.to_k_extra(extra), self.to_v_extra(extra)
        head_dim = key.shape[-1] // heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, heads, head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(query), split(key), split(value), scale=self.logit_scale
        )
        attended = attended.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)
        # to_out is linear: to_out(a + w·e) = to_out(a) + W_out·(w·e); dropout is identity in eval.
        return out + F.linear(self.weight(attended), attn.to_out[0].weight)


def install(
    unet: nn.Module, make: Callable[[str, nn.Module], ExtraStreamProcessor]
) -> dict[str, ExtraStreamProcessor]:
    """Give every spatial `attn2` the processor `make(name, attention_module)` returns; keep the others."""
    modules = dict(unet.named_modules())
    installed = {}
    for name in spatial_cross_attention_names(unet):
        processor = make(name, modules[name])
        modules[name].set_processor(processor)
        installed[name] = processor
    if not installed:
        raise ValueError("the UNet has no spatial cross-attention layers")
    return installed

"""StyleCrafter sampling: DDIM with the paper's text and style guidance, several videos per call.

ε = ε(∅) + λ_s·[ε(text, style) − ε(text)] + λ_t·[ε(text) − ε(∅)] on the raw UNet output (paper Eq. 2;
defaults λ_t = 15, λ_s = 7.5 as the official video inference). The three conditions run as one UNet
call: the branches without style carry the style tokens with scale factors 0, which is exactly the
model without style. One frame gives the style-only image mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.ddim import ddim_sample
from pipelines.params import from_values, shared_value
from pipelines.stylecrafter.model import StyleCrafter


@dataclass(frozen=True)
class SampleParams:
    steps: int = 50
    eta: float = 1.0
    cfg_text: float = 15.0
    cfg_style: float = 7.5
    num_frames: int = 16  # 1: a stylized image
    height: int = 320
    width: int = 512
    seed: int = 123

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SampleParams:
        p = from_values(cls, values)
        if p.height % 8 or p.width % 8 or p.steps < 1 or p.num_frames < 1:
            raise ValueError("height and width must be multiples of 8, steps and num_frames >= 1")
        return p


@dataclass
class Request:
    prompt: str
    styles: torch.Tensor  # [R, 3, H, W] in [-1, 1]: one or more reference images
    params: SampleParams


# Requests sampled together must agree on these.
BATCH_KEYS = ("steps", "num_frames", "height", "width", "eta")


@torch.no_grad()
def sample(
    model: StyleCrafter, requests: list[Request], batched_cfg: bool = True
) -> tuple[torch.Tensor, float]:
    """Videos [B, F, 3, H, W] in [-1, 1] of requests sharing steps, frames and size; and seconds per step."""
    p0 = requests[0].params
    for name in BATCH_KEYS:
        shared_value(requests, name)
    bb, b = model.backbone, len(requests)
    device = bb.device
    embeds = bb.encode_prompt([r.prompt for r in requests] + [""])
    text, empty = embeds[:b], embeds[b:].expand(b, -1, -1)
    style, scales = model.style([r.styles for r in requests], text)
    none = torch.zeros_like(scales)
    s_txt = torch.tensor([r.params.cfg_text for r in requests], device=device).view(-1, 1, 1, 1, 1)
    s_sty = torch.tensor([r.params.cfg_style for r in requests], device=device).view(-1, 1, 1, 1, 1)
    branches = [(empty, none), (text, none), (text, scales)]

    def guided_output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if batched_cfg:
            eps = model.predict(
                torch.cat([x] * 3),
                torch.cat([t] * 3),
                torch.cat([c[0] for c in branches]),
                torch.cat([style] * 3),
                torch.cat([c[1] for c in branches]),
            ).float()
            e_none, e_text, e_both = eps.chunk(3)
        else:
            e_none, e_text, e_both = (model.predict(x, t, txt, style, s).float() for txt, s in branches)
        return e_none + s_sty * (e_both - e_text) + s_txt * (e_text - e_none)

    generators = [torch.Generator().manual_seed(r.params.seed) for r in requests]
    scale = bb.vae_scale
    shape = (bb.unet.config.out_channels, p0.num_frames, p0.height // scale, p0.width // scale)
    x, seconds_per_step = ddim_sample(bb, shape, generators, p0.steps, p0.eta, guided_output)
    return bb.decode_latents(x.to(bb.dtype)).float(), seconds_per_step

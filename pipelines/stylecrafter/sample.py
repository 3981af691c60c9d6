"""StyleCrafter sampling: DDIM with the official text and style guidance, several videos per call.

Video (the official `DDIMStyleSampler`), on the raw UNet output:
    e = e(text, style) + s_style·[e(text, style) − e(text)] + s_text·[e(text) − e(∅)]
with s_text 15 and s_style 7.5; the empty-prompt branch never has style, and the scale factors come
from the prompt's tokens and the style tokens once per sample. The three branches run as one UNet
call: those without style carry scale factors 0, which is exactly the model without style.

Image (`num_frames` 1), as the official image model: the UNet runs with every temporal layer skipped
(`temporal.temporal_layers_skipped`), and guidance is e(∅) + image_cfg·[e(text, style) − e(∅)]
(`image_cfg` 6.0) at `image_size`² (512).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.ddim import ddim_sample
from pipelines.params import check_frame_size, from_values, shared_value
from pipelines.stylecrafter.model import StyleCrafter
from pipelines.temporal import temporal_layers_skipped


@dataclass(frozen=True)
class SampleParams:
    steps: int = 50
    eta: float = 1.0
    cfg_text: float = 15.0
    cfg_style: float = 7.5
    image_cfg: float = 6.0  # the image model's single guidance scale
    num_frames: int = 16  # 1: a stylized image
    height: int = 320
    width: int = 512
    image_size: int = 512  # of a stylized image (num_frames 1)
    seed: int = 123

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SampleParams:
        p = from_values(cls, values)
        if p.height % 8 or p.width % 8 or p.image_size % 8 or p.steps < 1 or p.num_frames < 1:
            raise ValueError("height, width and image_size must be multiples of 8, steps and num_frames >= 1")
        check_frame_size(p.height, p.width, "height x width")
        check_frame_size(p.image_size, p.image_size, "image_size")
        return p

    @property
    def image(self) -> bool:
        return self.num_frames == 1

    @property
    def size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if self.image else (self.height, self.width)


@dataclass
class Request:
    prompt: str
    styles: torch.Tensor  # [R, 3, H, W] in [-1, 1]: one or more reference images
    params: SampleParams


# Requests sampled together must agree on these.
BATCH_KEYS = ("steps", "num_frames", "height", "width", "image_size", "eta")


@torch.no_grad()
def sample(
    model: StyleCrafter, requests: list[Request], batched_cfg: bool = True
) -> tuple[torch.Tensor, float]:
    """Videos [B, F, 3, H, W] in [-1, 1] of requests sharing `BATCH_KEYS`, and seconds per step."""
    p0 = requests[0].params
    for name in BATCH_KEYS:
        shared_value(requests, name)
    bb, b = model.backbone, len(requests)
    device = bb.device
    embeds = bb.encode_prompt([r.prompt for r in requests] + [""])
    text, empty = embeds[:b], embeds[b:].expand(b, -1, -1)
    style, scales = model.style([r.styles for r in requests], text)
    none = torch.zeros_like(scales)

    def scale(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r.params, name) for r in requests], device=device).view(-1, 1, 1, 1, 1)

    # (text, scale factors) per branch; scale factors 0 are the model without style.
    branches = [(empty, none), (text, scales)] if p0.image else [(empty, none), (text, none), (text, scales)]

    def guided_output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = len(branches)
        if batched_cfg:
            out = model.predict(
                torch.cat([x] * n),
                torch.cat([t] * n),
                torch.cat([c[0] for c in branches]),
                torch.cat([style] * n),
                torch.cat([c[1] for c in branches]),
            ).float()
            outs = out.chunk(n)
        else:
            outs = [model.predict(x, t, txt, style, s).float() for txt, s in branches]
        if p0.image:
            uncond, styled = outs
            return uncond + scale("image_cfg") * (styled - uncond)
        uncond, text_only, styled = outs
        return styled + scale("cfg_style") * (styled - text_only) + scale("cfg_text") * (text_only - uncond)

    generators = [torch.Generator().manual_seed(r.params.seed) for r in requests]
    f, (h, w) = bb.vae_scale, p0.size
    shape = (bb.unet.config.out_channels, p0.num_frames, h // f, w // f)
    skipping = temporal_layers_skipped(bb.unet) if p0.image else contextlib.nullcontext()
    with skipping:
        x, seconds_per_step = ddim_sample(bb, shape, generators, p0.steps, p0.eta, guided_output)
    return bb.decode_latents(x.to(bb.dtype)).float(), seconds_per_step

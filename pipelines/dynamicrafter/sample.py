"""DynamiCrafter sampling: DDIM with multi-condition classifier-free guidance, several videos per call.

ε = ε(∅,∅) + s_img·[ε(img,∅) − ε(∅,∅)] + s_txt·[ε(img,txt) − ε(img,∅)] (the official
`ddim_multiplecond.py`), where ∅ image means the context of a gray image and the visual-detail latent
is always kept. The three conditions run as one UNet call of 3B samples. Every video draws its noise
from its own generator, so a video is the same whatever else shares its batch.

Modes: `animate` (the image at `frame_index`, 0 by default), `loop` (the image at the first and the
last frame), `interpolate` (the image first, `end_image` last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.ddim import ddim_sample, rescale_guidance
from pipelines.dynamicrafter.model import DynamiCrafter
from pipelines.params import from_values, shared_value

MODES = ("animate", "loop", "interpolate")


@dataclass(frozen=True)
class SampleParams:
    """Sampling parameters; defaults are the official 256 model's inference settings."""

    steps: int = 50
    eta: float = 1.0
    cfg_text: float = 7.5
    cfg_image: float = 7.5
    guidance_rescale: float = 0.0  # 0.7 for the official 512/1024 models
    num_frames: int = 16
    height: int = 256
    width: int = 256
    frame_stride: int = 3  # motion magnitude of the 256 model (1–6; larger, more motion)
    mode: str = "animate"
    frame_index: int = 0
    repeat_condition: bool = False  # the official I2V layout: the image latent on every frame
    seed: int = 123

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SampleParams:
        p = from_values(cls, values)
        if p.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {p.mode!r}")
        if p.height % 8 or p.width % 8 or p.steps < 1 or p.num_frames < 2:
            raise ValueError("height and width must be multiples of 8, steps >= 1, num_frames >= 2")
        if not 0 <= p.frame_index < p.num_frames:
            raise ValueError(f"frame_index {p.frame_index} is outside 0..{p.num_frames - 1}")
        return p

    def positions(self) -> list[int]:
        """Frames the condition image(s) are placed at."""
        last = self.num_frames - 1
        return [self.frame_index] if self.mode == "animate" else [0, last]


@dataclass
class Request:
    image: torch.Tensor  # [3, H, W] in [-1, 1] at the sampling size
    prompt: str
    params: SampleParams
    end_image: torch.Tensor | None = None  # interpolate mode


@torch.no_grad()
def sample(
    model: DynamiCrafter, requests: list[Request], batched_cfg: bool = True
) -> tuple[torch.Tensor, float]:
    """Videos [B, F, 3, H, W] in [-1, 1] of requests sharing steps, frames and size; and seconds per step."""
    for name in ("steps", "num_frames", "height", "width", "eta"):
        shared_value(requests, name)
    bb = model.backbone
    p0 = requests[0].params
    frames, device = p0.num_frames, bb.device
    b = len(requests)
    images = []
    for r in requests:
        if r.params.mode == "interpolate" and r.end_image is None:
            raise ValueError("interpolate mode needs an end image")
        second = r.end_image if r.params.mode == "interpolate" else r.image
        images.append(torch.stack([r.image, second]))
    images = torch.stack(images)  # [B, 2, 3, H, W]
    condition = torch.cat(
        [
            model.condition_latents(
                images[i : i + 1, : len(r.params.positions())],
                frames,
                [r.params.positions()],
                repeat=r.params.repeat_condition and r.params.mode == "animate",
            )
            for i, r in enumerate(requests)
        ]
    )
    # The first image gives the CLIP context (the official interp models also use the start frame only).
    context = model.image_context(images[:, 0], frames)
    null_context = model.image_context(torch.zeros_like(images[:, 0]), frames)
    text = bb.encode_prompt([r.prompt for r in requests] + [""])
    text, empty = text[:b], text[b:].expand(b, -1, -1)
    stride = torch.tensor([float(r.params.frame_stride) for r in requests], device=device)
    s_txt = torch.tensor([r.params.cfg_text for r in requests], device=device).view(-1, 1, 1, 1, 1)
    s_img = torch.tensor([r.params.cfg_image for r in requests], device=device).view(-1, 1, 1, 1, 1)
    rescale = torch.tensor([r.params.guidance_rescale for r in requests], device=device)

    generators = [torch.Generator().manual_seed(r.params.seed) for r in requests]
    scale = bb.vae_scale
    shape = (bb.unet.config.out_channels, frames, p0.height // scale, p0.width // scale)
    branches = [(empty, null_context), (empty, context), (text, context)]

    def guided_noise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if batched_cfg:
            eps = model.predict_noise(
                torch.cat([x] * 3),
                torch.cat([t] * 3),
                torch.cat([c[0] for c in branches]),
                torch.cat([c[1] for c in branches]),
                torch.cat([condition] * 3),
                torch.cat([stride] * 3),
            ).float()
            e_none, e_img, e_both = eps.chunk(3)
        else:
            e_none, e_img, e_both = (
                model.predict_noise(x, t, txt, ctx, condition, stride).float() for txt, ctx in branches
            )
        guided = e_none + s_img * (e_img - e_none) + s_txt * (e_both - e_img)
        return rescale_guidance(guided, e_both, rescale)

    x, seconds_per_step = ddim_sample(bb, shape, generators, p0.steps, p0.eta, guided_noise)
    return bb.decode_latents(x.to(bb.dtype)).float(), seconds_per_step

"""DynamiCrafter sampling: DDIM with classifier-free guidance, several videos per call.

Guidance acts on the raw UNet output (ε, or v for the 512/1024 models), as the official sampler does:
- `single` (the official default): out(∅) + s·[out(img, txt) − out(∅)], two passes per step, where ∅ is
  the empty prompt with the context of CLIP(zero image);
- `multi` (the official `ddim_multiplecond.py`): out(∅,∅) + s_img·[out(img,∅) − out(∅,∅)] +
  s_txt·[out(img,txt) − out(img,∅)], three passes per step.
The passes run as one UNet call, and the visual-detail latent is kept in every branch. Then guidance
rescale against the conditional output, and for 512/1024 the dynamic rescale of x0 inside the DDIM step.
Every video draws its noise from its own generator, so a video is the same whatever else shares its batch.

Modes: `animate` (the image at `frame_index`, 0 by default, or on every frame with `repeat_condition`,
the official layout), `loop` (the image at the first and the last frame), `interpolate` (the image
first, `end_image` last); loop and interpolate leave the other frames' condition latents zero, as the
official interpolation model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.ddim import ddim_sample, dynamic_rescale_table, rescale_guidance
from pipelines.dynamicrafter.model import DynamiCrafter
from pipelines.params import check_frame_size, from_values, shared_value

MODES = ("animate", "loop", "interpolate")
GUIDANCE = ("single", "multi")


@dataclass(frozen=True)
class SampleParams:
    """Sampling parameters; defaults are the official 256 model's inference settings. A converted
    model's adapter.json replaces them with its variant's (`ContextConfig.sample_defaults`)."""

    steps: int = 50
    eta: float = 1.0
    guidance: str = "single"
    cfg_scale: float = 7.5  # single guidance
    cfg_text: float = 7.5  # multi guidance
    cfg_image: float = 7.5  # multi guidance
    guidance_rescale: float = 0.0  # 0.7 for the official 512/1024 models
    dynamic_rescale: float = 0.0  # base scale of x0's dynamic rescale, 0 = off (0.7 on 512, 0.3 on 1024)
    rescale_turning_step: int = 400
    num_frames: int = 16
    height: int = 256
    width: int = 256
    fs: int = 3  # frame stride (256: 1-6, more motion when larger) or fps (512: 15-30, 1024: 5-15)
    mode: str = "animate"
    frame_index: int = 0
    repeat_condition: bool = False  # the official I2V layout: the image latent on every frame
    seed: int = 123

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SampleParams:
        p = from_values(cls, values)
        if p.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {p.mode!r}")
        if p.guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCE)}, got {p.guidance!r}")
        if p.height % 8 or p.width % 8 or p.steps < 1 or p.num_frames < 2:
            raise ValueError("height and width must be multiples of 8, steps >= 1, num_frames >= 2")
        check_frame_size(p.height, p.width, "height x width")
        if not 0 <= p.frame_index < p.num_frames:
            raise ValueError(f"frame_index {p.frame_index} is outside 0..{p.num_frames - 1}")
        if p.dynamic_rescale < 0 or p.rescale_turning_step < 1:
            raise ValueError("dynamic_rescale must be >= 0 (0: off) and rescale_turning_step >= 1")
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


# Requests sampled together must agree on these.
BATCH_KEYS = (
    "steps", "num_frames", "height", "width", "eta", "guidance", "dynamic_rescale", "rescale_turning_step"
)  # fmt: skip


def passes_per_step(guidance: str) -> int:
    """UNet evaluations per DDIM step for each video."""
    return 2 if guidance == "single" else 3


@torch.no_grad()
def sample(
    model: DynamiCrafter, requests: list[Request], batched_cfg: bool = True
) -> tuple[torch.Tensor, float]:
    """Videos [B, F, 3, H, W] in [-1, 1] of requests sharing `BATCH_KEYS`; and seconds per step."""
    for name in BATCH_KEYS:
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
    generators = [torch.Generator().manual_seed(r.params.seed) for r in requests]
    condition = torch.cat(
        [
            model.condition_latents(
                images[i : i + 1, : len(r.params.positions())],
                frames,
                [r.params.positions()],
                repeat=r.params.repeat_condition and r.params.mode == "animate",
                generators=[generators[i]],
            )
            for i, r in enumerate(requests)
        ]
    )
    # The first image gives the CLIP context (the official interp models also use the start frame only).
    context = model.image_context(images[:, 0], frames)
    null_context = model.image_context(torch.zeros_like(images[:, 0]), frames)
    text = bb.encode_prompt([r.prompt for r in requests] + [""])
    text, empty = text[:b], text[b:].expand(b, -1, -1)
    fs = torch.tensor([float(r.params.fs) for r in requests], device=device)

    def scales(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r.params, name) for r in requests], device=device).view(-1, 1, 1, 1, 1)

    rescale = torch.tensor([r.params.guidance_rescale for r in requests], device=device)
    if p0.guidance == "single":
        branches = [(empty, null_context), (text, context)]
    else:
        branches = [(empty, null_context), (empty, context), (text, context)]

    def guided_output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = len(branches)
        if batched_cfg:
            out = model.predict(
                torch.cat([x] * n),
                torch.cat([t] * n),
                torch.cat([c[0] for c in branches]),
                torch.cat([c[1] for c in branches]),
                torch.cat([condition] * n),
                torch.cat([fs] * n),
            ).float()
            outs = out.chunk(n)
        else:
            outs = [model.predict(x, t, txt, ctx, condition, fs).float() for txt, ctx in branches]
        if p0.guidance == "single":
            uncond, cond = outs
            guided = uncond + scales("cfg_scale") * (cond - uncond)
        else:
            uncond, image_only, cond = outs
            guided = (
                uncond
                + scales("cfg_image") * (image_only - uncond)
                + scales("cfg_text") * (cond - image_only)
            )
        return rescale_guidance(guided, cond, rescale)

    scale = bb.vae_scale
    shape = (bb.unet.config.out_channels, frames, p0.height // scale, p0.width // scale)
    x0_scale = (
        dynamic_rescale_table(p0.dynamic_rescale, p0.rescale_turning_step, bb.num_train_timesteps)
        if p0.dynamic_rescale
        else None
    )
    x, seconds_per_step = ddim_sample(bb, shape, generators, p0.steps, p0.eta, guided_output, x0_scale)
    return bb.decode_latents(x.to(bb.dtype)).float(), seconds_per_step

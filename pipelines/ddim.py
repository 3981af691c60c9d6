"""DDIM sampling (Song et al.) with per-video random generators, for samplers that guide the noise themselves.

Each video draws its initial noise and its η-noise from its own generator, so a video comes out the
same whatever else shares its batch; diffusers' scheduler step takes one generator for the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pipelines.backbone import Backbone


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Lin et al.'s guidance rescale: give the guided prediction the conditional one's std, in part."""
    dims = tuple(range(1, guided.dim()))
    rescaled = guided * (conditional.std(dims, keepdim=True) / guided.std(dims, keepdim=True))
    f = factor.view(-1, *([1] * (guided.dim() - 1)))
    return f * rescaled + (1 - f) * guided


@torch.no_grad()
def ddim_sample(
    backbone: Backbone,
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    steps: int,
    eta: float,
    guided_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, float]:
    """Latents [B, *shape] after `steps` DDIM steps, and seconds per step.

    `guided_noise(x_t, t)` returns the guided ε for the batch; timesteps follow the backbone scheduler's
    spacing, and the last step lands on ᾱ_0 (or 1 with `set_alpha_to_one`), as diffusers' DDIM.
    """
    device = backbone.device
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, torch.float32)
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    abar = backbone.alphas_cumprod
    final = torch.ones_like(abar[0]) if scheduler.config.set_alpha_to_one else abar[0]
    start = time.perf_counter()
    for i, t in enumerate(timesteps):
        eps = guided_noise(x, torch.full((len(x),), t, device=device, dtype=torch.long)).float()
        a_t = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else final
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(timesteps):
            x = x + sigma * torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    return x, (time.perf_counter() - start) / len(timesteps)

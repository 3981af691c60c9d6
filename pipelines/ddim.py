"""DDIM sampling (Song et al.) as the official LVDM samplers step it, with per-video random generators.

The schedule (ᾱ with or without zero terminal SNR, and the leading or trailing timestep spacing) is
diffusers' DDIMScheduler's, configured from the backbone's `scheduler/`. The step itself is written
here because diffusers' `DDIMScheduler.step` returns NaN on the first step of a zero-terminal-SNR
schedule with η = 1 (1 − ᾱ_prev − σ² rounds below zero under its square root) and has no hook for
DynamiCrafter's dynamic rescale of x0. x0 and ε are formed from the raw UNet output without dividing by
√ᾱ for v-prediction, so ᾱ = 0 is exact. Each video draws its initial noise and its η-noise from its own
generator, so a video comes out the same whatever else shares its batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from pipelines.backbone import Backbone


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Lin et al.'s guidance rescale: give the guided prediction the conditional one's std, in part."""
    dims = tuple(range(1, guided.dim()))
    rescaled = guided * (conditional.std(dims, keepdim=True) / guided.std(dims, keepdim=True))
    f = factor.view(-1, *([1] * (guided.dim() - 1)))
    return f * rescaled + (1 - f) * guided


def dynamic_rescale_table(base_scale: float, turning_step: int, timesteps: int = 1000) -> torch.Tensor:
    """DynamiCrafter 512/1024's `scale_arr` [timesteps]: 1 → base_scale linearly over the first
    `turning_step` timesteps, then base_scale; x0 is trained and sampled at this scale."""
    ramp = torch.linspace(1.0, base_scale, turning_step, dtype=torch.float64)
    flat = torch.full((max(0, timesteps - turning_step),), base_scale, dtype=torch.float64)
    return torch.cat([ramp, flat])[:timesteps]


@dataclass(frozen=True)
class DDIMSchedule:
    """Per step (from the noisiest): timestep, ᾱ_t, ᾱ of the next step (ᾱ_0, or 1, after the last), σ_t."""

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor


def ddim_schedule(scheduler_config: dict, steps: int, eta: float) -> DDIMSchedule:
    """The DDIM coefficients of `steps` steps for a scheduler config (diffusers' spacing and ᾱ)."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.long()
    abar = scheduler.alphas_cumprod.to(torch.float64)
    final = torch.ones((), dtype=torch.float64) if scheduler.config.set_alpha_to_one else abar[0]
    alphas = abar[timesteps]
    alphas_prev = torch.cat([abar[timesteps[1:]], final[None]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    return DDIMSchedule(timesteps, alphas, alphas_prev, sigmas)


def _draw(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, torch.float32)


@torch.no_grad()
def ddim_sample(
    backbone: Backbone,
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    steps: int,
    eta: float,
    guided_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Latents [B, *shape] after `steps` DDIM steps, and seconds per step.

    `guided_output(x_t, t)` returns the guided raw UNet output (ε or v, the backbone's parameterization).
    `x0_scale` [timesteps] turns on dynamic rescale: x0 is multiplied by x0_scale[t_next] / x0_scale[t]
    before the step (1 on the last step), as the official DynamiCrafter 512/1024 sampler does. The
    η-noise is added on every step, the last included, as in the official samplers.
    """
    device = backbone.device
    schedule = ddim_schedule(dict(backbone.scheduler.config), steps, eta)
    x = _draw(generators, shape, device)
    ratios = torch.ones(len(schedule.timesteps), dtype=torch.float64)
    if x0_scale is not None:
        at = x0_scale.to(torch.float64)[schedule.timesteps]
        ratios = torch.cat([at[1:], at[-1:]]) / at
    start = time.perf_counter()
    for i, t in enumerate(schedule.timesteps.tolist()):
        out = guided_output(x, torch.full((len(x),), t, device=device, dtype=torch.long)).float()
        a_t, a_prev, sigma = (float(v[i]) for v in (schedule.alphas, schedule.alphas_prev, schedule.sigmas))
        if backbone.prediction_type == "v_prediction":
            x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * out
            eps = a_t**0.5 * out + (1 - a_t) ** 0.5 * x
        elif backbone.prediction_type == "epsilon":
            x0, eps = (x - (1 - a_t) ** 0.5 * out) / a_t**0.5, out
        else:
            raise ValueError(f"unsupported prediction type {backbone.prediction_type!r}")
        x0 = x0 * float(ratios[i])
        x = a_prev**0.5 * x0 + max(0.0, 1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _draw(generators, shape, device)
    return x, (time.perf_counter() - start) / len(schedule.timesteps)

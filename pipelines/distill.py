"""Score distillation: the gradient a frozen video diffusion model gives an optimized video latent.

LiveSketch distills with SDS (Poole et al.): noise the rendered video's latent, ask the model for the
noise, and push the latent along w(t)·(eps_cfg − eps). DreamMotion builds its V-DDS gradient from the
same pieces. The gradient is applied through a surrogate loss whose derivative is exactly the
gradient, so it flows back through the VAE encoder into whatever produced the pixels.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Denoiser(Protocol):
    """What distillation needs of a backbone (pipelines.backbone.Backbone, or a test oracle)."""

    alphas_cumprod: torch.Tensor

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def predict_noise(
        self, latents: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor
    ) -> torch.Tensor: ...


def sample_timesteps(
    generators: list[torch.Generator], ranges: list[tuple[int, int]], device: torch.device
) -> torch.Tensor:
    """One timestep per batch element b, uniform on [low_b, high_b), drawn from generators[b].

    Per-element generators make a batched run draw exactly what separate runs would.
    """
    pairs = zip(generators, ranges, strict=True)
    draws = [int(torch.randint(lo, hi, (1,), generator=g)) for g, (lo, hi) in pairs]
    return torch.tensor(draws, device=device)


def sample_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Standard normal noise [B, *shape], element b drawn from generators[b] (on CPU, for reproducibility)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def cfg_noise(
    model: Denoiser,
    noisy: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: torch.Tensor,
) -> torch.Tensor:
    """Classifier-free guided noise eps_u + s·(eps_c − eps_u), both branches in one UNet call."""
    b = noisy.shape[0]
    eps = model.predict_noise(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([uncond, cond])).float()
    eps_u, eps_c = eps[:b], eps[b:]
    s = guidance.to(eps).view(-1, *([1] * (eps.dim() - 1)))
    return eps_u + s * (eps_c - eps_u)


@torch.no_grad()
def sds_gradient(
    model: Denoiser,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """SDS gradient w(t)·(eps_cfg(z_t) − eps) with w(t) = 1 − ᾱ_t, as LiveSketch's official code.

    Shapes: latents/noise [B, C, F, h, w], cond/uncond [B, L, D], guidance and t [B]. A non-finite
    gradient raises (the official code asserts it) instead of silently corrupting the optimization.
    """
    noisy = model.add_noise(latents.detach(), noise, t)
    eps = cfg_noise(model, noisy, t, cond, uncond, guidance)
    weight = (1 - model.alphas_cumprod[t]).view(-1, *([1] * (latents.dim() - 1)))
    grad = weight * (eps - noise.float())
    if not torch.isfinite(grad).all():
        raise FloatingPointError("score distillation produced a non-finite gradient")
    return fit_dtype(grad, latents.dtype)


def fit_dtype(delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 delta as `dtype`, clamped to its finite range so that fp16 latents never receive inf.

    The CFG combination and the delta are computed in fp32 (a guidance of 30–40 times a difference
    of fp16 predictions can exceed fp16's 65504); only the result goes back to the latents' dtype.
    """
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        limit = torch.finfo(dtype).max
        delta = delta.clamp(-limit, limit)
    return delta.to(dtype)


def gradient_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to `latents` is `grad` (summed over the batch)."""
    return (latents * grad.detach()).sum()


@torch.no_grad()
def dds_gradient(
    model: Denoiser,
    latents: torch.Tensor,
    source: torch.Tensor,
    target_embeds: torch.Tensor,
    source_embeds: torch.Tensor,
    uncond: torch.Tensor,
    guidance: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Delta denoising score ε_cfg(x_t, t, y) − ε_cfg(x̂_t, t, ŷ), DreamMotion's V-DDS (unweighted, as DDS).

    The edited latents and the source share one timestep and one noise draw, so whatever the model
    predicts alike for both (its bias, the noise itself) cancels. One UNet call runs the batch
    [uncond · edited, uncond · source, cond · edited, cond · source], in that order (attention hooks rely
    on it).
    """
    noisy = model.add_noise(latents.detach(), noise, t)
    noisy_source = model.add_noise(source, noise, t)
    eps = cfg_noise(
        model,
        torch.cat([noisy, noisy_source]),
        torch.cat([t, t]),
        torch.cat([target_embeds, source_embeds]),
        torch.cat([uncond, uncond]),
        torch.cat([guidance, guidance]),
    )
    b = latents.shape[0]
    delta = eps[:b] - eps[b:]
    if not torch.isfinite(delta).all():
        raise FloatingPointError("delta denoising score produced a non-finite gradient")
    return fit_dtype(delta, latents.dtype)

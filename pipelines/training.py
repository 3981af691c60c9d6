"""What adapter training shares across methods: the recipe a method gives and the helpers of its loss.

A method's recipe says how to load its model, which parameters a stage trains, how raw rows become
training examples (`decode`, run by Ray Data CPU tasks) and what the loss of a batch is; the training
loop itself (`actors/train_worker.py`) is the same for every method. The hyperparameters and the
decoding helpers, which need no torch, are in `pipelines/training_data.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipelines.metrics import to_signed
from pipelines.training_data import TrainConfig

TEMPORAL_MARKERS = ("temp_attentions", "temp_convs", "transformer_in")


@dataclass(frozen=True)
class Recipe:
    """One method's training, as the shared loop needs it."""

    config_type: type[TrainConfig]
    stages: tuple[int, ...]
    load: Callable[[dict[str, str | None], str, torch.dtype], nn.Module]
    trainable: Callable[[nn.Module, TrainConfig], dict[str, nn.Parameter]]
    # Examples of a batch of manifest rows for one data source.
    decode: Callable[[pa.Table, TrainConfig, str], pa.Table]
    # Data sources of a configuration: name -> (share of the steps, the media columns its rows use).
    sources: Callable[[TrainConfig], dict[str, tuple[float, tuple[str, ...]]]]
    loss: Callable[[nn.Module, dict[str, Any], TrainConfig, torch.Generator], torch.Tensor]

    def config(self, params: dict[str, Any]) -> TrainConfig:
        config = self.config_type.from_dict(params)
        if config.stage not in self.stages:
            raise ValueError(f"stage must be one of {self.stages}, got {config.stage}")
        return config


def select(named: dict[str, nn.Parameter], keep: Callable[[str], bool]) -> dict[str, nn.Parameter]:
    return {name: p for name, p in named.items() if keep(name)}


def is_temporal(name: str) -> bool:
    return any(marker in name for marker in TEMPORAL_MARKERS)


def freeze_all_but(
    model: nn.Module, unet: nn.Module, chosen: dict[str, nn.Parameter]
) -> dict[str, nn.Parameter]:
    """Set `requires_grad` on exactly the chosen parameters and return them."""
    model.requires_grad_(False)
    unet.requires_grad_(False)
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def noisy_latents(
    backbone: Any, latents: torch.Tensor, generator: torch.Generator, x0_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, noise, x0): each sample noised at a uniform random timestep, drawn from `generator` (CPU).

    `x0_scale` [T] is DynamiCrafter 512/1024's dynamic rescale: the clean latent is scaled by
    x0_scale[t] before noising (official training), and the returned x0 is the scaled one.
    """
    device = backbone.device
    t = torch.randint(0, backbone.num_train_timesteps, (len(latents),), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if x0_scale is not None:
        latents = latents * x0_scale.to(device, latents.dtype)[t].view(-1, *([1] * (latents.dim() - 1)))
    return backbone.add_noise(latents, noise, t), t, noise, latents


def diffusion_loss(
    backbone: Any, output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """MSE between the UNet's raw output and its target (ε, or v for v-prediction backbones).

    The v target is formed directly, never as ε-MSE divided by ᾱ_t, which is infinite at the ᾱ = 0 of a
    zero-terminal-SNR schedule.
    """
    return (output.float() - backbone.target(x0.float(), noise.float(), t)).pow(2).mean()


def to_frames(array: np.ndarray) -> torch.Tensor:
    """uint8 clips [B, F, H, W, 3] -> float [B, F, 3, H, W] in [-1, 1]."""
    b, f = array.shape[:2]
    return to_signed(array.reshape(b * f, *array.shape[2:])).reshape(b, f, 3, *array.shape[2:4])


def contiguous_group_norm_inputs(module: nn.Module) -> None:
    """Feed every GroupNorm a contiguous input.

    The temporal convolutions give GroupNorm a permuted (channels-last-like) tensor, and torch's CPU
    kernel for the backward of such an input with trainable weights crashes the process (segfault,
    torch 2.13); a contiguous copy takes the ordinary kernel.
    """
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))


def checkpoint_unet_blocks(unet: nn.Module) -> None:
    """Recompute each ResNet, temporal conv and (spatial or temporal) transformer of the UNet in backward.

    Only their inputs are kept for backward instead of every intermediate: training memory at video sizes
    (16 frames at 320×512) is dominated by attention and feed-forward activations. diffusers' UNet3D blocks
    have no checkpointing of their own, so each module's forward is wrapped in place (names, and with
    them the saved parameter names, are unchanged). Non-reentrant checkpointing also checkpoints calls
    whose inputs need no grad (a frozen UNet under a trainable adapter).
    """
    from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    kinds = (ResnetBlock2D, TemporalConvLayer, Transformer2DModel, TransformerTemporalModel)
    for module in unet.modules():
        if isinstance(module, kinds):
            module.forward = functools.partial(_checkpointed, module.forward)


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)

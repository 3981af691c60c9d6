"""LiveSketch's neural displacement field: control points of every frame from the initial sketch.

Each control point of each frame is projected by a shared layer (M_shared) and summed with a
positional encoding of (frame, point). The local path, a small MLP applied to every point alike, gives
free-form per-frame offsets; the global path pools over the points of a frame and predicts that frame's
scale, shear, rotation and translation, applied about the sketch centre and damped by λ_s, λ_sh, λ_r,
λ_t. Displacement = local + global (paper §3, official `painter.py`).

Deliberate differences from the official code (notes/livesketch.md §3): the local path is a per-point
MLP, as the paper describes, instead of one 25M-parameter linear layer over all flattened points, so it
works for any number of points and frames; the global path pools over points (mean and max, beside the
frame's encoding) instead of flattening; the hidden layers have no LayerNorm (see `_block`); scale has
its own head (the official code reuses the shear head's output); dropout on the positional encoding is
on while optimizing and off for the saved animation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FieldConfig:
    dim: int = 128
    lambda_scale: float = 0.05
    lambda_shear: float = 0.1
    lambda_rotation: float = 0.01
    lambda_translation: float = 1.0
    dropout: float = 0.1
    use_local: bool = True
    use_global: bool = True


@dataclass
class Displacement:
    """Control points of every frame and the parts they are made of."""

    points: torch.Tensor  # [K, P, 2] absolute canvas coordinates
    local: torch.Tensor  # [K, P, 2] ΔZ_l
    global_: torch.Tensor  # [K, P, 2] ΔZ_g
    translation: torch.Tensor  # [K, 2] (d_x, d_y) after λ_t
    rotation: torch.Tensor  # [K] θ after λ_r
    shear: torch.Tensor  # [K, 2] after λ_sh
    scale: torch.Tensor  # [K, 2] s = 1 + λ_s·out


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal encoding [N, dim] of integer positions (base 10000; sin even, cos odd)."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * freq[None]
    pe = torch.zeros(len(positions), dim)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe


def _block(dim_in: int, dim_out: int) -> list[nn.Module]:
    # No LayerNorm here (the official layers have one): in a network applied per point or per frame,
    # Adam grows the biases until the normalised features are the same for every frame, and all
    # frames move alike (the official network escapes this only through its per-frame output layer).
    return [nn.Linear(dim_in, dim_out), nn.LeakyReLU()]


def _head(dim: int, hidden_blocks: int, out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(hidden_blocks):
        layers += _block(dim, dim)
    return nn.Sequential(*layers, nn.Linear(dim, out))


class DisplacementField(nn.Module):
    def __init__(self, points: torch.Tensor, num_frames: int, config: FieldConfig | None = None):
        """`points` [P, 2]: the initial sketch's control points, in canvas pixels."""
        super().__init__()
        self.config = config = config or FieldConfig()
        self.num_frames = num_frames
        d = config.dim
        self.register_buffer("center", points.mean(0).detach().clone())
        self.register_buffer("base", (points - points.mean(0)).detach().clone())
        p = len(points)
        # Half the channels encode the frame index, half the point's order in the sketch.
        frames = sinusoidal(torch.arange(num_frames), d // 2)[:, None].expand(num_frames, p, d // 2)
        order = sinusoidal(torch.arange(p), d - d // 2)[None].expand(num_frames, p, d - d // 2)
        self.register_buffer("encoding", torch.cat([frames, order], -1))
        self.register_buffer("frame_encoding", frames[:, 0].clone())

        self.project = nn.Sequential(nn.Linear(2, d), nn.LayerNorm(d), nn.LeakyReLU(), nn.Linear(d, d))
        self.local_mlp = _head(d, 3, 2)
        self.global_trunk = nn.Sequential(*_block(2 * d + d // 2, d), *_block(d, d))
        self.translation_head = _head(d, 3, 2)
        self.rotation_head = _head(d, 1, 1)
        self.shear_head = _head(d, 1, 2)
        self.scale_head = _head(d, 1, 2)

    def local_parameters(self) -> list[nn.Parameter]:
        """What the local pass optimizes (shared projection + local path), as the official split."""
        return [*self.project.parameters(), *self.local_mlp.parameters()]

    def global_parameters(self) -> list[nn.Parameter]:
        heads = (self.translation_head, self.rotation_head, self.shear_head, self.scale_head)
        modules = (self.project, self.global_trunk, *heads)
        return [p for m in modules for p in m.parameters()]

    def forward(self, generator: torch.Generator | None = None) -> Displacement:
        """Points of all frames; in training mode the encoding dropout draws from `generator`."""
        cfg = self.config
        k, p = self.num_frames, len(self.base)
        base = self.base[None].expand(k, p, 2)
        encoding = self.encoding
        if self.training and cfg.dropout > 0:
            keep = torch.rand(encoding.shape, generator=generator) >= cfg.dropout
            encoding = encoding * keep.to(encoding.device) / (1 - cfg.dropout)
        features = self.project(base) + encoding

        zeros = torch.zeros_like(base)
        local = self.local_mlp(features) if cfg.use_local else zeros

        # The frame's own encoding goes in beside the pooled features: summed into every point's
        # features it would be diluted by the pooling, and frames would hardly differ.
        pooled = torch.cat([features.mean(1), features.amax(1), self.frame_encoding], -1)
        trunk = self.global_trunk(pooled)
        translation = cfg.lambda_translation * self.translation_head(trunk)
        rotation = cfg.lambda_rotation * self.rotation_head(trunk)[:, 0]
        shear = cfg.lambda_shear * self.shear_head(trunk)
        scale = 1 + cfg.lambda_scale * self.scale_head(trunk)
        if cfg.use_global:
            matrix = _rotation(rotation) @ _shear(shear) @ torch.diag_embed(scale)
            global_ = base @ matrix.transpose(1, 2) + translation[:, None] - base
        else:
            global_ = zeros
        return Displacement(
            points=self.center + base + local + global_,
            local=local,
            global_=global_,
            translation=translation,
            rotation=rotation,
            shear=shear,
            scale=scale,
        )


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _shear(shear: torch.Tensor) -> torch.Tensor:
    """[[1, sh_y], [sh_x, 1]] per frame, as the official code's shear matrix."""
    one = torch.ones_like(shear[:, 0])
    return torch.stack([torch.stack([one, shear[:, 1]], -1), torch.stack([shear[:, 0], one], -1)], -2)

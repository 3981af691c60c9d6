"""LiveSketch's neural displacement field: control points of every frame from the initial sketch.

Every control point of every frame is projected by a shared layer (M_shared) and summed with a
positional encoding; a local path gives free-form per-frame offsets and a global path predicts each
frame's scale, shear, rotation and translation, applied about the sketch centre and damped by λ_s,
λ_sh, λ_r, λ_t. Displacement = local + global (paper §3, official `painter.py`). `FieldConfig.field`
picks the architecture:

- `official` (default): the official code's network (notes/livesketch.md §3). The input is the initial
  points tiled over the frames and flattened (N = points × frames); both paths start with one linear
  layer over all N projected points (≈25M parameters each for 16 strokes × 24 frames); every hidden
  layer has LayerNorm; the local path outputs all N offsets at once and the global path has one head per
  transform with an output per frame. The official learning rates were tuned for this network.
- `pooled`: a redesign that works for any number of points and frames with ~0.2M parameters: the local
  path is one MLP applied to every point alike, the global path pools over each frame's points. Its
  hidden layers have no LayerNorm (see `_block`), and it has learning rates of its own
  (`animate.LEARNING_RATES`).
- `points`: the paper's "no network" ablation: the offsets of every point of every frame are the
  optimized parameters themselves (official `--opt_points_with_mlp False`, painter.py:94-96); there is
  no global path.

Deliberate differences from the official code: scale has its own head (official painter.py:355 reads
the shear head's output for scale, so its scale head gets no gradient); the official dead learned
embedding (looked up, then ignored by `PositionalEncoding.forward`, painter.py:246-249) is left out;
dropout on the positional encoding is on while optimizing and off for the saved animation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

FIELDS = ("official", "pooled", "points")


@dataclass(frozen=True)
class FieldConfig:
    field: str = "official"  # official | pooled | points (see the module docstring)
    dim: int = 128
    lambda_scale: float = 0.05
    lambda_shear: float = 0.1
    lambda_rotation: float = 0.01
    lambda_translation: float = 1.0
    dropout: float = 0.1
    # use_local=False is the official `-predict_only_global`: no local offsets, but the local pass
    # still runs and steps the shared projection (animate.py); use_global=False drops the global path
    # and its pass.
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
    pe[:, 1::2] = torch.cos(angles)[:, : dim // 2]
    return pe


def make_field(points: torch.Tensor, num_frames: int, config: FieldConfig | None = None) -> DisplacementField:
    """The displacement field `config.field` names, for the sketch's control points `points` [P, 2]."""
    config = config or FieldConfig()
    kinds = {"official": OfficialField, "pooled": PooledField, "points": PointOffsets}
    if config.field not in kinds:
        raise ValueError(f"field must be one of {', '.join(FIELDS)}; got {config.field!r}")
    return kinds[config.field](points, num_frames, config)


class DisplacementField(nn.Module):
    """What every field shares: the sketch relative to its centre, the global transform, the output."""

    def __init__(self, points: torch.Tensor, num_frames: int, config: FieldConfig):
        super().__init__()
        self.config = config
        self.num_frames = num_frames
        self.register_buffer("center", points.mean(0).detach().clone())
        self.register_buffer("base", (points - points.mean(0)).detach().clone())

    def local_parameters(self) -> list[nn.Parameter]:
        """What the local pass optimizes (shared projection + local path), as the official split."""
        raise NotImplementedError

    def global_parameters(self) -> list[nn.Parameter]:
        """What the global pass optimizes (shared projection + global path); empty without one."""
        raise NotImplementedError

    def _dropped(self, encoding: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        p = self.config.dropout
        if not self.training or p <= 0:
            return encoding
        keep = torch.rand(encoding.shape, generator=generator) >= p
        return encoding * keep.to(encoding.device) / (1 - p)

    def _output(self, local: torch.Tensor, transform: tuple[torch.Tensor, ...] | None) -> Displacement:
        """Points from local offsets and the raw global outputs (translation, rotation, shear, scale)."""
        cfg = self.config
        k, p = self.num_frames, len(self.base)
        base = self.base[None].expand(k, p, 2)
        if transform is None:
            zeros = torch.zeros(k, 2, device=base.device)
            translation, rotation, shear, scale = zeros, zeros[:, 0], zeros, zeros + 1
        else:
            translation = cfg.lambda_translation * transform[0]
            rotation = cfg.lambda_rotation * transform[1]
            shear = cfg.lambda_shear * transform[2]
            scale = 1 + cfg.lambda_scale * transform[3]
        if transform is not None and cfg.use_global:
            matrix = _rotation(rotation) @ _shear(shear) @ torch.diag_embed(scale)
            global_ = base @ matrix.transpose(1, 2) + translation[:, None] - base
        else:
            global_ = torch.zeros_like(base)
        if not cfg.use_local:
            local = torch.zeros_like(base)
        return Displacement(
            points=self.center + base + local + global_,
            local=local,
            global_=global_,
            translation=translation,
            rotation=rotation,
            shear=shear,
            scale=scale,
        )


def _norm_block(dim_in: int, dim_out: int) -> list[nn.Module]:
    """The official hidden layer: Linear → LayerNorm → LeakyReLU."""
    return [nn.Linear(dim_in, dim_out), nn.LayerNorm(dim_out), nn.LeakyReLU()]


def _projection(dim: int) -> nn.Sequential:
    """M_shared, as the official `project_points`: Linear → LayerNorm → LeakyReLU → Linear, per point."""
    return nn.Sequential(*_norm_block(2, dim), nn.Linear(dim, dim))


class _Network(DisplacementField):
    """A field with a network: a shared projection, a local path, and a global trunk with four heads."""

    project: nn.Module
    local_path: nn.Module
    global_trunk: nn.Module
    translation_head: nn.Module
    rotation_head: nn.Module
    shear_head: nn.Module
    scale_head: nn.Module

    def local_parameters(self) -> list[nn.Parameter]:
        return [*self.project.parameters(), *self.local_path.parameters()]

    def global_parameters(self) -> list[nn.Parameter]:
        heads = (self.translation_head, self.rotation_head, self.shear_head, self.scale_head)
        return [p for m in (self.project, self.global_trunk, *heads) for p in m.parameters()]


class OfficialField(_Network):
    """The official PointMLP (painter.py:252-441), with its own scale head."""

    def __init__(self, points: torch.Tensor, num_frames: int, config: FieldConfig):
        super().__init__(points, num_frames, config)
        d, k = config.dim, num_frames
        n = k * len(points)
        # One position per (frame, point), numbered frame-major: the flattened index j·P + i.
        self.register_buffer("encoding", sinusoidal(torch.arange(n), d))
        self.project = _projection(d)
        self.local_path = nn.Sequential(
            nn.Flatten(0), *_norm_block(n * d, d), *_norm_block(d, d), *_norm_block(d, d), nn.Linear(d, 2 * n)
        )
        self.global_trunk = nn.Sequential(nn.Flatten(0), *_norm_block(n * d, d), *_norm_block(d, d))
        self.translation_head = nn.Sequential(
            *(m for _ in range(3) for m in _norm_block(d, d)), nn.Linear(d, 2 * k)
        )
        self.rotation_head = nn.Sequential(*_norm_block(d, d), nn.Linear(d, k))
        self.shear_head = nn.Sequential(*_norm_block(d, d), nn.Linear(d, 2 * k))
        self.scale_head = nn.Sequential(*_norm_block(d, d), nn.Linear(d, 2 * k))

    def forward(self, generator: torch.Generator | None = None) -> Displacement:
        """Points of all frames; in training mode the encoding dropout draws from `generator`."""
        k, p = self.num_frames, len(self.base)
        tiled = self.base.repeat(k, 1)
        features = self.project(tiled) + self._dropped(self.encoding, generator)
        local = self.local_path(features).reshape(k, p, 2) if self.config.use_local else None
        trunk = self.global_trunk(features)
        transform = (
            self.translation_head(trunk).reshape(k, 2),
            self.rotation_head(trunk),
            self.shear_head(trunk).reshape(k, 2),
            self.scale_head(trunk).reshape(k, 2),
        )
        return self._output(local, transform)


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


class PooledField(_Network):
    """Per-point local MLP and a global path pooled over each frame's points: any P and K."""

    def __init__(self, points: torch.Tensor, num_frames: int, config: FieldConfig):
        super().__init__(points, num_frames, config)
        d, p = config.dim, len(points)
        # Half the channels encode the frame index, half the point's order in the sketch.
        frames = sinusoidal(torch.arange(num_frames), d // 2)[:, None].expand(num_frames, p, d // 2)
        order = sinusoidal(torch.arange(p), d - d // 2)[None].expand(num_frames, p, d - d // 2)
        self.register_buffer("encoding", torch.cat([frames, order], -1))
        self.register_buffer("frame_encoding", frames[:, 0].clone())
        self.project = _projection(d)
        self.local_path = _head(d, 3, 2)
        self.global_trunk = nn.Sequential(*_block(2 * d + d // 2, d), *_block(d, d))
        self.translation_head = _head(d, 3, 2)
        self.rotation_head = _head(d, 1, 1)
        self.shear_head = _head(d, 1, 2)
        self.scale_head = _head(d, 1, 2)

    def forward(self, generator: torch.Generator | None = None) -> Displacement:
        """Points of all frames; in training mode the encoding dropout draws from `generator`."""
        k, p = self.num_frames, len(self.base)
        features = self.project(self.base[None].expand(k, p, 2)) + self._dropped(self.encoding, generator)
        local = self.local_path(features) if self.config.use_local else None
        # The frame's own encoding goes in beside the pooled features: summed into every point's
        # features it would be diluted by the pooling, and frames would hardly differ.
        trunk = self.global_trunk(torch.cat([features.mean(1), features.amax(1), self.frame_encoding], -1))
        transform = (
            self.translation_head(trunk),
            self.rotation_head(trunk)[:, 0],
            self.shear_head(trunk),
            self.scale_head(trunk),
        )
        return self._output(local, transform)


class PointOffsets(DisplacementField):
    """No network: every frame's point offsets are parameters, starting at zero (the input sketch)."""

    def __init__(self, points: torch.Tensor, num_frames: int, config: FieldConfig):
        super().__init__(points, num_frames, config)
        self.offsets = nn.Parameter(torch.zeros(num_frames, len(points), 2))

    def local_parameters(self) -> list[nn.Parameter]:
        return [self.offsets]

    def global_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, generator: torch.Generator | None = None) -> Displacement:
        return self._output(self.offsets, None)


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _shear(shear: torch.Tensor) -> torch.Tensor:
    """[[1, sh_y], [sh_x, 1]] per frame, as the official code's shear matrix."""
    one = torch.ones_like(shear[:, 0])
    return torch.stack([torch.stack([one, shear[:, 1]], -1), torch.stack([shear[:, 0], one], -1)], -2)

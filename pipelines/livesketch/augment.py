"""LiveSketch's augmentation of rendered frames before score distillation.

The official code applies torchvision's RandomPerspective(0.5, fill white) then RandomResizedCrop
(scale 0.4–1, square) to all frames at once, so one random draw is shared by every frame and the
motion between frames is untouched. Both warps are folded into one differentiable `grid_sample`
(torchvision is not a dependency of anima).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high, (1,), generator=generator))


def perspective_corners(size: int, distortion: float, generator: torch.Generator) -> torch.Tensor:
    """Where the image corners move (torchvision's RandomPerspective.get_params draw), [4, 2] as (x, y)."""
    half = size // 2
    d = int(distortion * half) + 1
    return torch.tensor(
        [
            [_randint(0, d, generator), _randint(0, d, generator)],
            [_randint(size - d, size, generator), _randint(0, d, generator)],
            [_randint(size - d, size, generator), _randint(size - d, size, generator)],
            [_randint(0, d, generator), _randint(size - d, size, generator)],
        ],
        dtype=torch.float64,
    )


def homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """3×3 matrix H with H·(src, 1) ∝ (dst, 1) for four point pairs."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist(), strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return torch.cat([h, h.new_ones(1)]).view(3, 3)


def crop_box(size: int, min_scale: float, generator: torch.Generator) -> tuple[int, int, int]:
    """A square crop (top, left, side) covering min_scale–1 of the area (RandomResizedCrop, ratio 1)."""
    area = size * size * (min_scale + (1 - min_scale) * float(torch.rand(1, generator=generator)))
    side = min(size, round(math.sqrt(area)))
    return _randint(0, size - side + 1, generator), _randint(0, size - side + 1, generator), side


def augment(
    frames: torch.Tensor, generator: torch.Generator, distortion: float = 0.5, min_scale: float = 0.4
) -> torch.Tensor:
    """Frames [K, 3, S, S] in [0, 1] over white → perspective-warped and crop-resized frames, one draw."""
    size = frames.shape[-1]
    start = torch.tensor([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], dtype=torch.float64)
    # Output pixel at an end corner shows the input at the matching start corner.
    to_input = homography(perspective_corners(size, distortion, generator), start)
    top, left, side = crop_box(size, min_scale, generator)

    centers = (torch.arange(size, dtype=torch.float64) + 0.5) * side / size - 0.5
    ys, xs = torch.meshgrid(top + centers, left + centers, indexing="ij")
    warped = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ to_input.T
    xy = warped[..., :2] / warped[..., 2:]
    grid = ((xy + 0.5) / size * 2 - 1).to(frames)
    grid = grid[None].expand(len(frames), size, size, 2)
    # Sample (x − 1) with zero padding so the area outside the warped image is white, as fill=1.
    out = F.grid_sample(frames - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + 1

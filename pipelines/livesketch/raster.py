"""Differentiable rasterizer for sketches, in pure PyTorch (DESIGN.md, "The rasterizer").

diffvg is not on PyPI and hard to build, so frames are drawn here: each cubic is flattened into line
segments; a pixel's distance to a path is the minimum over its segments; strokes cover an antialiased
band of the stroke width, fills use the winding number with a one-pixel soft edge; paths are
composited in document order over white. Gradients reach the control points through the distances.
Strokes are always solid with round caps and joins (what LiveSketch's inputs use); other linecap,
linejoin and dash attributes are only written back.

The distance kernel is a custom autograd function: its forward reduces [B, paths, segments, pixels] to
per-path minima chunk by chunk, without keeping the big tensor, and its backward uses the closest
segment only (by the envelope theorem the derivative of a minimum over t is the partial derivative at
the minimizer), so backward memory is [B, paths, pixels]. Tiles of `tile`² pixels are checkpointed,
which bounds the peak to one tile; tiles that a path's bounding box (over all frames) misses skip it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from pipelines.livesketch.svg import Sketch

BACKENDS = ("torch", "diffvg", "auto")
# Elements of one [frames, paths, segments, h, w] temporary of the distance kernel. Below glibc's mmap
# threshold on CPU, so buffers are reused instead of page-faulted in; larger on GPUs for fewer launches.
_CHUNK_ELEMENTS_CPU = 1 << 22
_CHUNK_ELEMENTS = 1 << 26


def render(
    sketch: Sketch,
    points: torch.Tensor,
    size: int | None = None,
    *,
    tile: int = 64,
    curve_segments: int = 16,
    backend: str = "torch",
) -> torch.Tensor:
    """Frames [B, 3, S, S] in [0, 1] of the sketch drawn at control points [B, P, 2] (sketch px)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown rasterizer backend {backend!r}; expected one of {BACKENDS}")
    if points.ndim != 3 or points.shape[1:] != (sketch.num_points, 2):
        raise ValueError(f"points must be [B, {sketch.num_points}, 2], got {list(points.shape)}")
    if tile < 1 or curve_segments < 1:
        raise ValueError(f"tile and curve_segments must be >= 1, got {tile} and {curve_segments}")
    size = int(size or sketch.size)
    if backend != "torch":
        pydiffvg = _import_diffvg(required=backend == "diffvg")
        if pydiffvg is not None:
            return _render_diffvg(pydiffvg, sketch, points, size)
    dtype = points.dtype if points.dtype in (torch.float32, torch.float64) else torch.float32
    scale = size / sketch.size
    pts = points.to(dtype) * scale
    scene = _scene(sketch, curve_segments, scale, pts.device, dtype)
    # Flatten every cubic into line segments, then add the closing line of each filled open subpath.
    cubics = pts[:, scene.cubic_idx]  # [B, C, 4, 2]
    poly = torch.einsum("kc,bncd->bnkd", scene.basis, cubics)  # [B, C, K+1, 2]
    b = pts.shape[0]
    starts = [poly[:, :, :-1].reshape(b, -1, 2), pts[:, scene.closing_idx[:, 0]]]
    ends = [poly[:, :, 1:].reshape(b, -1, 2), pts[:, scene.closing_idx[:, 1]]]
    lines = torch.cat([torch.cat(starts, 1), torch.cat(ends, 1)], dim=-1)  # [B, L, 4]: ax ay bx by

    active = _active_paths(scene, pts.detach(), size, tile)
    use_checkpoint = torch.is_grad_enabled() and lines.requires_grad
    rows = []
    for ty, y0 in enumerate(range(0, size, tile)):
        row = []
        for tx, x0 in enumerate(range(0, size, tile)):
            h, w = min(tile, size - y0), min(tile, size - x0)
            on = active[ty, tx]
            if not on.any():
                row.append(torch.ones(b, 3, h, w, dtype=dtype, device=pts.device))
                continue
            fn = _TileFn(scene, on, x0, y0, w, h)
            if use_checkpoint:  # nothing random inside, so no RNG state to keep
                row.append(checkpoint(fn, lines, use_reentrant=False, preserve_rng_state=False))
            else:
                row.append(fn(lines))
        rows.append(torch.cat(row, dim=-1))
    out = torch.cat(rows, dim=-2)
    if use_checkpoint and not out.requires_grad:
        out = out + lines[..., :0].sum()  # all culled: stay in the graph, so backward gives zeros
    return out.to(points.dtype)


# -- scene --------------------------------------------------------------------------------------------


@dataclass
class _Bucket:
    """Paths padded to the same number of line segments, so their distances are one batched op."""

    paths: list[int]  # path indices, in document order
    ids: torch.Tensor  # the same, on the device
    seg_idx: torch.Tensor  # [n, L] indices into the line array (padding repeats a real segment)
    valid: torch.Tensor  # [n, L] bool: not padding (the winding number must not count duplicates)
    stroke: torch.Tensor  # [n, L] bool: a segment of the path itself, not a fill-closing line
    has_closing: bool


@dataclass
class _Scene:
    cubic_idx: torch.Tensor  # [C, 4]
    closing_idx: torch.Tensor  # [Q, 2] closing lines of filled paths
    basis: torch.Tensor  # [K+1, 4] Bernstein weights at uniform t
    buckets: list[_Bucket]
    bucket_of: list[tuple[int, int]]  # path -> (bucket, row)
    stroke_a: torch.Tensor  # [N]
    fill_a: torch.Tensor
    colours: torch.Tensor  # [2N, 3]: fill colours, then stroke colours
    half_width: torch.Tensor  # [N] canvas px at the output size
    evenodd: torch.Tensor  # [N] bool
    has_stroke: list[bool]
    has_fill: list[bool]
    point_idx: torch.Tensor  # [M] point indices of all paths, for bounding boxes
    point_path: torch.Tensor  # [M] the path each belongs to
    margin: torch.Tensor  # [N] how far (px) a path's ink reaches beyond its control points


def _scene(sketch: Sketch, k: int, scale: float, device: torch.device, dtype: torch.dtype) -> _Scene:
    cubic_idx: list[tuple[int, int, int, int]] = []
    closing: list[tuple[int, int]] = []
    per_path: list[tuple[list[int], int]] = []  # (line indices, how many are the path's own)
    for path in sketch.paths:
        first = len(cubic_idx)
        cubic_idx.extend(path.segments)
        own = [c * k + j for c in range(first, len(cubic_idx)) for j in range(k)]
        extra: list[int] = []
        if path.fill is not None:
            extra = list(range(len(closing), len(closing) + len(path.closing)))
            closing.extend(path.closing)
        per_path.append((own + extra, len(own)))
    num_lines = len(cubic_idx) * k
    per_path = [(own[:n] + [num_lines + q for q in own[n:]], n) for own, n in per_path]

    groups: dict[int, list[int]] = {}
    for i, (segs, _) in enumerate(per_path):
        groups.setdefault(1 << max(len(segs) - 1, 0).bit_length(), []).append(i)
    buckets, bucket_of = [], [(0, 0)] * len(per_path)
    for width, members in sorted(groups.items()):
        idx, valid, stroke = [], [], []
        for row, i in enumerate(members):
            segs, n = per_path[i]
            pad = width - len(segs)
            idx.append(segs + [segs[0]] * pad)
            valid.append([True] * len(segs) + [False] * pad)
            stroke.append([True] * n + [False] * (width - n))
            bucket_of[i] = (len(buckets), row)
        buckets.append(_Bucket(
            paths=members,
            ids=torch.tensor(members, dtype=torch.long, device=device),
            seg_idx=torch.tensor(idx, dtype=torch.long, device=device),
            valid=torch.tensor(valid, device=device),
            stroke=torch.tensor(stroke, device=device),
            has_closing=any(per_path[i][1] < len(per_path[i][0]) for i in members),
        ))  # fmt: skip

    def colour(attr: str) -> tuple[torch.Tensor, torch.Tensor]:
        values = [getattr(p, attr) or (0.0, 0.0, 0.0, 0.0) for p in sketch.paths]
        t = torch.tensor(values, dtype=dtype, device=device).reshape(-1, 4)
        return t[:, :3], t[:, 3]

    half_width = torch.tensor([p.stroke_width * scale / 2 for p in sketch.paths], dtype=dtype, device=device)
    point_idx = [i for p in sketch.paths for s in p.segments for i in s]
    point_path = [n for n, p in enumerate(sketch.paths) for s in p.segments for _ in s]
    stroke_rgb, stroke_a = colour("stroke")
    fill_rgb, fill_a = colour("fill")
    has_stroke = [p.stroke is not None for p in sketch.paths]
    t = torch.linspace(0, 1, k + 1, dtype=torch.float64)
    basis = torch.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], dim=1)
    return _Scene(
        cubic_idx=torch.tensor(cubic_idx, dtype=torch.long, device=device).reshape(-1, 4),
        closing_idx=torch.tensor(closing, dtype=torch.long, device=device).reshape(-1, 2),
        basis=basis.to(device=device, dtype=dtype),
        buckets=buckets,
        bucket_of=bucket_of,
        stroke_a=stroke_a,
        fill_a=fill_a,
        colours=torch.cat([fill_rgb, stroke_rgb]),
        half_width=half_width,
        evenodd=torch.tensor([p.fill_rule == "evenodd" for p in sketch.paths], device=device),
        has_stroke=has_stroke,
        has_fill=[p.fill is not None for p in sketch.paths],
        point_idx=torch.tensor(point_idx, dtype=torch.long, device=device),
        point_path=torch.tensor(point_path, dtype=torch.long, device=device),
        margin=torch.where(torch.tensor(has_stroke, device=device), half_width, 0) + 1.0,
    )


def _active_paths(scene: _Scene, pts: torch.Tensor, size: int, tile: int) -> torch.Tensor:
    """[tiles_y, tiles_x, N] bool on the CPU: which paths can put ink in which tile (one host sync)."""
    n = len(scene.has_stroke)
    sel = pts[:, scene.point_idx]  # [B, M, 2]; a Bézier lies in the hull of its control points
    index = scene.point_path[:, None].expand(-1, 2)
    lo = pts.new_full((n, 2), math.inf).scatter_reduce(0, index, sel.amin(0), "amin", include_self=False)
    hi = pts.new_full((n, 2), -math.inf).scatter_reduce(0, index, sel.amax(0), "amax", include_self=False)
    lo, hi = lo - scene.margin[:, None], hi + scene.margin[:, None]
    starts = torch.arange(0, size, tile, device=pts.device, dtype=pts.dtype)
    first = starts + 0.5  # first and last pixel centre of each tile
    last = torch.clamp(starts + tile, max=size) - 0.5
    # Written as "misses", so NaN points keep every path active and the NaN shows in the image.
    miss_x = (hi[None, :, 0] < first[:, None]) | (lo[None, :, 0] > last[:, None])  # [tiles_x, N]
    miss_y = (hi[None, :, 1] < first[:, None]) | (lo[None, :, 1] > last[:, None])
    return (~(miss_y[:, None] | miss_x[None, :])).cpu()


# -- one tile -----------------------------------------------------------------------------------------


class _TileFn:
    """The image of one tile from the line segments; a callable so checkpoint can rerun it."""

    def __init__(self, scene: _Scene, on: torch.Tensor, x0: int, y0: int, w: int, h: int) -> None:
        self.scene, self.on, self.x0, self.y0, self.w, self.h = scene, on, x0, y0, w, h

    def __call__(self, lines: torch.Tensor) -> torch.Tensor:
        s = self.scene
        device, dtype = lines.device, lines.dtype
        px = torch.arange(self.w, device=device, dtype=dtype) + (self.x0 + 0.5)
        py = torch.arange(self.h, device=device, dtype=dtype) + (self.y0 + 0.5)
        alphas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # path -> (fill, stroke) [B, h, w]
        for bucket in s.buckets:
            rows = [r for r, i in enumerate(bucket.paths) if self.on[i]]
            if not rows:
                continue
            paths = [bucket.paths[r] for r in rows]
            ids, seg_idx, valid, stroke = bucket.ids, bucket.seg_idx, bucket.valid, bucket.stroke
            if len(rows) < len(bucket.paths):
                sel = torch.tensor(rows, device=device)
                ids, seg_idx, valid, stroke = ids[sel], seg_idx[sel], valid[sel], stroke[sel]
            segs = lines[:, seg_idx]  # [B, n, L, 4]
            want_fill = any(s.has_fill[i] for i in paths)
            d2_stroke, d2_fill, winding = _MinDist2.apply(
                segs, px, py, stroke if bucket.has_closing else None, valid if want_fill else None
            )
            tiny = torch.finfo(dtype).tiny ** 0.5
            d_stroke = d2_stroke.clamp_min(tiny).sqrt()
            stroke_alpha = (s.half_width[ids, None, None] + 0.5 - d_stroke).clamp(0, 1)
            stroke_alpha = stroke_alpha * s.stroke_a[ids, None, None]
            if want_fill:
                d_fill = d2_fill.clamp_min(tiny).sqrt() if d2_fill is not None else d_stroke
                odd = winding.remainder(2) == 1
                inside = torch.where(s.evenodd[ids, None, None], odd, winding != 0)
                fill_alpha = (torch.where(inside, d_fill, -d_fill) + 0.5).clamp(0, 1)
                fill_alpha = fill_alpha * s.fill_a[ids, None, None]
            else:
                fill_alpha = stroke_alpha
            for n, i in enumerate(paths):
                alphas[i] = (fill_alpha[:, n], stroke_alpha[:, n])
        # Layers in document order, each path's fill under its stroke.
        layers, colours = [], []
        for i in sorted(alphas):
            fill_alpha, stroke_alpha = alphas[i]
            if s.has_fill[i]:
                layers.append(fill_alpha)
                colours.append(i)
            if s.has_stroke[i]:
                layers.append(stroke_alpha)
                colours.append(len(s.has_fill) + i)
        alpha = torch.stack(layers, 1)  # [B, M, h, w]
        rgb = s.colours[torch.tensor(colours, device=device)]  # [M, 3]
        # "over" onto white in closed form (a fixed number of kernels, whatever the number of paths):
        # each layer's colour is dimmed by the layers above it, and white by all of them.
        through = torch.flip(torch.cumprod(torch.flip(1 - alpha, [1]), 1), [1])  # ∏_{j >= i} (1 - α_j)
        above = torch.cat([through[:, 1:], torch.ones_like(through[:, :1])], 1)
        return torch.einsum("bmhw,mc->bchw", alpha * above, rgb) + through[:, :1]


class _MinDist2(torch.autograd.Function):
    """Squared distance from each pixel centre to the nearest segment of each path, and winding numbers.

    segs [B, n, L, 4] (ax, ay, bx, by); px [w], py [h] pixel centres. Returns d2 over the `stroke`
    segments and d2 over all of them, both [B, n, h, w] (the second None when `stroke` is None: every
    segment is the path's own), and the winding number over the `valid` ones (int; None if valid is).
    """

    @staticmethod
    def forward(ctx: Any, segs, px, py, stroke, valid):  # type: ignore[override]
        b, n, num, _ = segs.shape
        shape, device = (b, n, len(py), len(px)), segs.device
        d2_stroke = segs.new_empty(shape)
        idx_stroke = torch.empty(shape, dtype=torch.long, device=device)
        d2_fill, idx_fill = None, idx_stroke
        if stroke is not None:
            d2_fill, idx_fill = segs.new_empty(shape), torch.empty_like(idx_stroke)
        winding = None if valid is None else torch.empty(shape, dtype=torch.int32, device=device)
        # Chunks of frames (and paths) bound the [frames, paths, segments, h, w] temporaries.
        per_path = num * len(py) * len(px)
        budget = _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS
        step_n = n if n * per_path <= budget else max(1, budget // per_path)
        step_b = max(1, budget // (step_n * per_path))
        for b0 in range(0, b, step_b):
            for n0 in range(0, n, step_n):
                bs, ns = slice(b0, b0 + step_b), slice(n0, n0 + step_n)
                d2 = _dist2(segs[bs, ns], px, py, None if winding is None else winding[bs, ns], valid, ns)
                if d2_fill is not None:
                    d2_fill[bs, ns], idx_fill[bs, ns] = d2.min(dim=2)
                    d2.masked_fill_(~stroke[None, ns, :, None, None], math.inf)
                d2_stroke[bs, ns], idx_stroke[bs, ns] = d2.min(dim=2)
        ctx.save_for_backward(segs, px, py, idx_stroke, idx_fill)
        if winding is not None:
            ctx.mark_non_differentiable(winding)
        return d2_stroke, d2_fill, winding

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_stroke, g_fill, _g_winding):  # type: ignore[override]
        segs, px, py, idx_stroke, idx_fill = ctx.saved_tensors
        grad = torch.zeros_like(segs)
        tiny = torch.finfo(segs.dtype).tiny
        b, n, h, w = idx_fill.shape
        for idx, g in ((idx_stroke, g_stroke), (idx_fill, g_fill)):
            if g is None:
                continue
            index = idx.reshape(b, n, h * w, 1).expand(-1, -1, -1, 4)
            ax, ay, bx, by = segs.gather(2, index).unbind(-1)  # [B, n, h*w]
            ex, ey = bx - ax, by - ay
            dx = px[None, :].expand(h, w).reshape(-1) - ax
            dy = py[:, None].expand(h, w).reshape(-1) - ay
            t = ((dx * ex + dy * ey) / (ex * ex + ey * ey).clamp_min(tiny)).clamp(0, 1)
            # d2 = |p - a - t (b - a)|², t optimal: d/da = -2 q (1 - t), d/db = -2 q t.
            gq = -2 * g.reshape(b, n, h * w)
            qx, qy = (dx - t * ex) * gq, (dy - t * ey) * gq
            part = torch.stack([qx * (1 - t), qy * (1 - t), qx * t, qy * t], dim=-1)
            grad.scatter_add_(2, index, part)
        return grad, None, None, None, None


def _dist2(segs, px, py, winding, valid, ns) -> torch.Tensor:
    """[b, n, L, h, w] squared distances of one chunk; its winding numbers go into `winding` if given."""
    ax, ay, bx, by = (segs[..., j, None, None] for j in range(4))  # [b, n, L, 1, 1]
    ex, ey = bx - ax, by - ay
    inv_len2 = 1.0 / (ex * ex + ey * ey).clamp_min(torch.finfo(segs.dtype).tiny)
    dx = px[None, :] - ax  # [b, n, L, 1, w]
    dy = py[:, None] - ay  # [b, n, L, h, 1]
    if winding is not None:
        # Crossing count: +1 for an upward edge with the pixel on its left, -1 downward on its right.
        vmask = valid[None, ns, :, None, None]
        up = ((ay <= py[:, None]) & (by > py[:, None]) & vmask).to(segs.dtype)  # [b, n, L, h, 1]
        down = ((by <= py[:, None]) & (ay > py[:, None]) & vmask).to(segs.dtype)
        left = ex * dy - dx * ey  # [b, n, L, h, w]
        winding.copy_((up * (left > 0) - down * (left < 0)).sum(2).round())
        del left
    t = dx * ex + dy * ey
    t.mul_(inv_len2).clamp_(0, 1)
    qx = torch.addcmul(dx, t, ex, value=-1)
    qy = torch.addcmul(dy, t, ey, value=-1)
    del t
    return qx.mul_(qx).addcmul_(qy, qy)


# -- diffvg -------------------------------------------------------------------------------------------


def _import_diffvg(required: bool) -> Any:
    try:
        import pydiffvg
    except ImportError as exc:
        if required:
            raise ImportError(
                "backend='diffvg' needs pydiffvg, which is not installed (it is not on PyPI; build it from "
                "source, see README) — use backend='torch' or 'auto'"
            ) from exc
        return None
    return pydiffvg


def _render_diffvg(pydiffvg: Any, sketch: Sketch, points: torch.Tensor, size: int) -> torch.Tensor:
    """The official renderer call (notes §2.3): per frame, 2×2 samples, seed 0, over white."""
    scale = size / sketch.size
    frames = []
    for frame in points.float() * scale:
        shapes, groups = [], []
        for path in sketch.paths:
            ids = []
            for segments, closed in path.subpaths():
                idx = [segments[0][0]] + [i for seg in segments for i in seg[1:]]
                ids.append(len(shapes))
                shapes.append(pydiffvg.Path(
                    num_control_points=torch.full((len(segments),), 2, dtype=torch.int32),
                    points=frame[idx[:-1] if closed else idx],
                    is_closed=closed,
                    stroke_width=torch.tensor(path.stroke_width * scale / 2),  # diffvg: half-width
                ))  # fmt: skip
            groups.append(pydiffvg.ShapeGroup(
                shape_ids=torch.tensor(ids),
                fill_color=torch.tensor(path.fill) if path.fill is not None else None,
                stroke_color=torch.tensor(path.stroke) if path.stroke is not None else None,
                use_even_odd_rule=path.fill_rule == "evenodd",
            ))  # fmt: skip
        args = pydiffvg.RenderFunction.serialize_scene(size, size, shapes, groups)
        img = pydiffvg.RenderFunction.apply(size, size, 2, 2, 0, None, *args)  # [H, W, 4]
        alpha = img[..., 3:]
        frames.append((img[..., :3] * alpha + (1 - alpha)).permute(2, 0, 1))
    return torch.stack(frames).to(device=points.device, dtype=points.dtype)

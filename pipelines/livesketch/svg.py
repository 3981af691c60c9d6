"""Sketches as cubic Bézier control points: read any reasonable SVG, write frames and animations back.

Every drawable shape (path, line, polyline, polygon, rect, circle, ellipse) becomes one `Path` whose
segments are all cubics, because the displacement field moves control points and the rasterizer draws
cubics: lines and quadratics are degree-elevated, arcs use svgelements' arc→cubic conversion.
svgelements resolves transforms, viewBox, `style=""` and `<style>` CSS. The result is normalized like
the official preprocessing (notes/livesketch.md §2.2) onto a square canvas of `size` px.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import svgelements as se
import torch

from pipelines import media

# Presentation attributes written back as they were; the rasterizer itself always draws round caps.
_KEPT_ATTRS = (
    "stroke-linecap",
    "stroke-linejoin",
    "stroke-miterlimit",
    "stroke-dasharray",
    "stroke-dashoffset",
)
# Points closer than this (document px) are the same point when deciding whether a subpath is closed.
_SAME_POINT = 1e-6

RGBA = tuple[float, float, float, float]

# How strokes enter LiveSketch (LiveSketchParams.stroke_width): "official" as the official pipeline
# draws them, "keep" as the SVG has them.
STROKE_WIDTHS = ("official", "keep")
# The official preprocessing sets every stroke's diffvg half-width to 1.5 on the 256 canvas
# (preprocess_sketch.py:14, :43), i.e. 3 px wide lines, and renders every stroke opaque black
# (painter.py:150).
OFFICIAL_STROKE_WIDTH = 3.0
OFFICIAL_STROKE: RGBA = (0.0, 0.0, 0.0, 1.0)


class SketchError(ValueError):
    """An SVG that cannot be animated; the message names the source so row errors say which input."""


@dataclass(frozen=True)
class Path:
    """One SVG shape element: its cubic segments and paint."""

    segments: tuple[tuple[int, int, int, int], ...]  # 4 indices into Sketch.points per cubic
    closing: tuple[tuple[int, int], ...]  # (last, first) of each open subpath: SVG fills them as if closed
    stroke: RGBA | None  # opacity and stroke-opacity folded into A; None = no stroke
    fill: RGBA | None  # None = not filled
    stroke_width: float  # full width in canvas px
    fill_rule: str  # "nonzero" | "evenodd"
    attrs: dict[str, str] = field(default_factory=dict, hash=False)  # written back verbatim

    def subpaths(self) -> list[tuple[list[tuple[int, int, int, int]], bool]]:
        """(segments, closed) per subpath, recovered from shared indices (for writers and diffvg)."""
        out: list[tuple[list[tuple[int, int, int, int]], bool]] = []
        closed = True
        for seg in self.segments:
            if closed or seg[0] != out[-1][0][-1][3]:
                out.append(([], False))
            out[-1][0].append(seg)
            closed = seg[3] == out[-1][0][0][0]
            if closed:
                out[-1] = (out[-1][0], True)
        return out


@dataclass
class Sketch:
    points: torch.Tensor  # [P, 2] float32 control points in canvas px (x right, y down)
    paths: list[Path]
    size: int = 256  # square canvas side

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    def center(self) -> torch.Tensor:
        """Mean of all control points [2]: the official code animates about this point."""
        return self.points.mean(0)


def official_strokes(sketch: Sketch) -> Sketch:
    """The sketch with every stroke opaque black and 3 px wide per 256 px of canvas, as the official code.

    Widths otherwise scale with the drawing: a 1000-px SVG with 1-px strokes would render 0.26-px lines
    on the 256 canvas, too faint for the VAE to see. Fill-only shapes keep having no stroke.
    """
    width = OFFICIAL_STROKE_WIDTH * sketch.size / 256
    paths = [
        replace(p, stroke=OFFICIAL_STROKE, stroke_width=width) if p.stroke is not None else p
        for p in sketch.paths
    ]
    return Sketch(points=sketch.points, paths=paths, size=sketch.size)


# -- reading --------------------------------------------------------------------------------------


def load_sketch(uri: str, size: int = 256) -> Sketch:
    """Read and parse; a missing file or non-SVG raises media.MediaError, a non-drawable one SketchError."""
    return parse_svg(media.read_svg(uri), size=size, source=uri)


def _length(value: str | None) -> float | None:
    """An absolute length in px, or None for missing or relative (%) ones."""
    if value is None or value.strip().endswith("%"):
        return None
    try:
        return float(se.Length(value).value(ppi=se.DEFAULT_PPI))
    except (ValueError, TypeError):
        return None


def _rgba(color: Any, opacity: float) -> RGBA | None:
    if color is None or getattr(color, "value", None) is None:
        return None
    alpha = color.alpha / 255.0 * opacity
    if alpha <= 0:
        return None
    return (color.red / 255.0, color.green / 255.0, color.blue / 255.0, alpha)


def _opacity(values: dict[str, Any]) -> float:
    try:
        return min(max(float(values.get("opacity", 1.0)), 0.0), 1.0)
    except (TypeError, ValueError):
        return 1.0


def _cubics(segment: Any) -> list[tuple[complex, complex, complex, complex]]:
    """The segment as cubics (complex points): lines and quadratics exactly, arcs as svgelements splits."""
    if isinstance(segment, se.CubicBezier):
        return [(complex(segment.start), complex(segment.control1), complex(segment.control2),
                 complex(segment.end))]  # fmt: skip
    if isinstance(segment, se.QuadraticBezier):
        p0, q, p1 = complex(segment.start), complex(segment.control), complex(segment.end)
        return [(p0, p0 + 2 / 3 * (q - p0), p1 + 2 / 3 * (q - p1), p1)]
    if isinstance(segment, se.Arc):
        curves = list(segment.as_cubic_curves())
        if curves:
            return [c for curve in curves for c in _cubics(curve)]
    # Line, Close, or a degenerate arc: a straight line.
    p0, p1 = complex(segment.start), complex(segment.end)
    return [(p0, p0 + (p1 - p0) / 3, p0 + 2 * (p1 - p0) / 3, p1)]


def _subpaths(shape: Any) -> list[tuple[list[tuple[complex, complex, complex, complex]], bool]]:
    """(cubics, closed) per subpath, zero-length closing lines dropped."""
    out: list[tuple[list[tuple[complex, complex, complex, complex]], bool]] = []
    current: list[tuple[complex, complex, complex, complex]] = []
    closed = False

    def flush() -> None:
        nonlocal current, closed
        if current:
            out.append((current, closed))
        current, closed = [], False

    for segment in shape.segments():
        if isinstance(segment, se.Move):
            flush()
            continue
        if segment.start is None or segment.end is None:
            continue
        if closed or (current and abs(complex(segment.start) - current[-1][3]) > _SAME_POINT):
            flush()  # drawing on after Z (or a jump without M) starts a new subpath
        if isinstance(segment, se.Close):
            if current:
                start = current[0][0]
                if abs(current[-1][3] - start) > _SAME_POINT:
                    current.extend(_cubics(segment))
                closed = True
            continue
        current.extend(_cubics(segment))
    flush()
    return out


@dataclass
class _RawPath:
    subpaths: list[tuple[list[tuple[complex, complex, complex, complex]], bool]]
    stroke: RGBA | None
    fill: RGBA | None
    stroke_width: float
    fill_rule: str
    attrs: dict[str, str]


def _raw_path(shape: Any) -> _RawPath | None:
    values = shape.values
    if values.get("display") == "none" or values.get("visibility") in ("hidden", "collapse"):
        return None
    opacity = _opacity(values)
    stroke = _rgba(shape.stroke, opacity)
    width = float(shape.stroke_width) if shape.stroke_width is not None else 1.0
    if not math.isfinite(width) or width <= 0:
        stroke = None
    # SVG never fills a <line>; svgelements gives it the default black fill.
    fill = None if isinstance(shape, se.SimpleLine) else _rgba(shape.fill, opacity)
    if stroke is None and fill is None:
        return None
    subpaths = _subpaths(shape)
    if not subpaths:
        return None
    rule = str(values.get("fill-rule", "nonzero")).strip().lower()
    attrs = {k: str(values[k]) for k in _KEPT_ATTRS if values.get(k) not in (None, "")}
    return _RawPath(subpaths, stroke, fill, width, "evenodd" if rule == "evenodd" else "nonzero", attrs)


def parse_svg(text: str, size: int = 256, source: str = "<svg>") -> Sketch:
    """Parse SVG text into a sketch on a size×size canvas, normalized as the official preprocessing."""
    try:
        root = media.svg_root(text.lstrip("\ufeff").encode("utf-8"), source)
    except media.MediaError as exc:
        raise SketchError(str(exc)) from None
    width, height = _length(root.get("width")), _length(root.get("height"))
    viewbox = root.get("viewBox")
    kwargs: dict[str, float] = {}
    if viewbox is not None and (width is None or height is None):
        # Relative or missing sizes are relative to the viewBox, not to svgelements' 1000 px default.
        try:
            vb = [float(v) for v in viewbox.replace(",", " ").split()]
            kwargs = {"width": vb[2], "height": vb[3]}
        except (ValueError, IndexError):
            raise SketchError(f"{source}: invalid viewBox {viewbox!r}") from None
    try:
        document = se.SVG.parse(io.StringIO(text.lstrip("\ufeff")), reify=True, **kwargs)
        raw = [r for e in document.elements() if isinstance(e, se.Shape) and (r := _raw_path(e)) is not None]
    except SketchError:
        raise
    except Exception as exc:  # svgelements raises many kinds on malformed attributes
        raise SketchError(f"{source}: cannot parse SVG: {type(exc).__name__}: {exc}") from exc
    if not raw:
        raise SketchError(f"{source}: no drawable paths (every shape lacks a visible stroke and fill)")

    coords: list[complex] = []
    paths: list[tuple[list[tuple[int, int, int, int]], list[tuple[int, int]], _RawPath]] = []
    for r in raw:
        segments: list[tuple[int, int, int, int]] = []
        closing: list[tuple[int, int]] = []
        for cubics, closed in r.subpaths:
            first = len(coords)
            coords.append(cubics[0][0])
            for k, (_, c1, c2, end) in enumerate(cubics):
                base = len(coords)
                coords.extend((c1, c2))
                if closed and k == len(cubics) - 1:
                    segments.append((base - 1, base, base + 1, first))
                else:
                    coords.append(end)
                    segments.append((base - 1, base, base + 1, base + 2))
            if not closed:
                closing.append((len(coords) - 1, first))
        paths.append((segments, closing, r))

    pts = np.array([[c.real, c.imag] for c in coords], dtype=np.float64)
    if not np.isfinite(pts).all():
        raise SketchError(f"{source}: non-finite coordinates")
    if kwargs or (width is not None and height is not None):
        doc_w, doc_h = float(document.width), float(document.height)
    else:
        # No size at all: the drawing's own bounding box is the canvas.
        lo = pts.min(0)
        pts = pts - lo
        doc_w, doc_h = (float(v) for v in pts.max(0))
    if not (doc_w > 0 or doc_h > 0):
        raise SketchError(f"{source}: the drawing has zero size")
    doc_w, doc_h = (doc_w if doc_w > 0 else doc_h), (doc_h if doc_h > 0 else doc_w)
    # notes §2.2: p' = (p − c)/f + c', f = max(W, H)/size, c' = (c_x·size/W, c_y·size/H).
    center = pts.mean(0)
    f = max(doc_w, doc_h) / size
    new_center = np.array([center[0] * size / doc_w, center[1] * size / doc_h])
    pts = (pts - center) / f + new_center

    out = [
        Path(
            segments=tuple(segments),
            closing=tuple(closing),
            stroke=r.stroke,
            fill=r.fill,
            stroke_width=r.stroke_width / f if r.stroke is not None else 0.0,
            fill_rule=r.fill_rule,
            attrs=r.attrs,
        )
        for segments, closing, r in paths
    ]
    return Sketch(points=torch.from_numpy(pts.astype(np.float32)), paths=out, size=size)


# -- writing --------------------------------------------------------------------------------------


def _num(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _as_numpy(points: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    if isinstance(points, torch.Tensor):
        return points.detach().float().cpu().numpy()
    return np.asarray(points, dtype=np.float32)


def _path_d(path: Path, pts: np.ndarray) -> str:
    parts: list[str] = []
    for segments, closed in path.subpaths():
        x, y = pts[segments[0][0]]
        parts.append(f"M {_num(x)} {_num(y)}")
        for seg in segments:
            parts.append("C " + " ".join(f"{_num(pts[i][0])} {_num(pts[i][1])}" for i in seg[1:]))
        if closed:
            parts.append("Z")
    return " ".join(parts)


def _rgb(color: RGBA) -> str:
    r, g, b = (round(min(max(c, 0.0), 1.0) * 255) for c in color[:3])
    return f"rgb({r},{g},{b})"


def _style(path: Path) -> str:
    if path.stroke is None:
        attrs = ['stroke="none"']
    else:
        attrs = [f'stroke="{_rgb(path.stroke)}"', f'stroke-opacity="{path.stroke[3]:.4g}"',
                 f'stroke-width="{_num(path.stroke_width)}"']  # fmt: skip
    if path.fill is None:
        attrs.append('fill="none"')
    else:
        attrs += [f'fill="{_rgb(path.fill)}"', f'fill-opacity="{path.fill[3]:.4g}"',
                  f'fill-rule="{path.fill_rule}"']  # fmt: skip
    for key, value in path.attrs.items():
        attrs.append(f'{key}="{_escape(value)}"')
    return " ".join(attrs)


def _escape(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _header(size: int) -> str:
    return (f'<svg xmlns="{media.SVG_NAMESPACE}" width="{size}" height="{size}" '
            f'viewBox="0 0 {size} {size}">')  # fmt: skip


def sketch_to_svg(sketch: Sketch, points: torch.Tensor | np.ndarray) -> str:
    """One frame as a standalone SVG: the sketch's paths and paint at new control points [P, 2]."""
    pts = _as_numpy(points)
    if pts.shape != (sketch.num_points, 2):
        raise ValueError(f"points must be [{sketch.num_points}, 2], got {list(pts.shape)}")
    if not np.isfinite(pts).all():
        raise ValueError("points are not all finite (did the optimization diverge?)")
    lines = [_header(sketch.size)]
    lines += [f'  <path d="{_path_d(p, pts)}" {_style(p)}/>' for p in sketch.paths]
    lines.append("</svg>")
    return "\n".join(lines) + "\n"


def animated_svg(sketch: Sketch, frames: torch.Tensor | np.ndarray, fps: float) -> str:
    """All frames [F, P, 2] in one SVG that loops in a browser: a discrete SMIL animation of each `d`."""
    pts = _as_numpy(frames)
    if pts.ndim != 3 or pts.shape[1:] != (sketch.num_points, 2) or len(pts) == 0:
        raise ValueError(f"frames must be [F, {sketch.num_points}, 2], got {list(pts.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not np.isfinite(pts).all():
        raise ValueError("frames are not all finite (did the optimization diverge?)")
    duration = len(pts) / fps
    lines = [_header(sketch.size)]
    for path in sketch.paths:
        ds = [_path_d(path, frame) for frame in pts]
        lines.append(f'  <path d="{ds[0]}" {_style(path)}>')
        lines.append(f'    <animate attributeName="d" values="{";".join(ds)}" dur="{duration:.6g}s" '
                     'repeatCount="indefinite" calcMode="discrete"/>')  # fmt: skip
        lines.append("  </path>")
    lines.append("</svg>")
    return "\n".join(lines) + "\n"

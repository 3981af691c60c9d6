"""LiveSketch sketches: SVG parsing and writing; the differentiable rasterizer's geometry and gradients."""

from __future__ import annotations

import math
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import media
from pipelines.livesketch.raster import render
from pipelines.livesketch.svg import (
    SketchError,
    animated_svg,
    load_sketch,
    official_strokes,
    parse_svg,
    sketch_to_svg,
)

SVG_NS = "http://www.w3.org/2000/svg"


def _svg(body: str, size: int = 256, extra: str = "") -> str:
    return f'<svg xmlns="{SVG_NS}" width="{size}" height="{size}" {extra}>{body}</svg>'


def _strokes_svg(seed: int = 0) -> str:
    """16 open single-cubic black strokes, shaped like the official inputs (fallback without shared data)."""
    rng = np.random.default_rng(seed)
    paths = []
    for _ in range(16):
        p = rng.uniform(60, 190, size=(4, 2))
        d = f"M {p[0, 0]} {p[0, 1]} C " + " ".join(f"{x} {y}" for x, y in p[1:])
        paths.append(f'<path d="{d}" fill="none" stroke="rgb(0, 0, 0)" stroke-linecap="round" '
                     'stroke-linejoin="round" stroke-opacity="1.0" stroke-width="3.0"/>')  # fmt: skip
    return _svg("".join(paths))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These renders are small: with 2 threads on a busy 2-core machine, thread hand-offs cost 5× more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sketch_files(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    files = sorted((data_dir / "sketches").glob("*.svg"))
    if not files:
        path = tmp_path_factory.mktemp("sketches") / "strokes.svg"
        path.write_text(_strokes_svg())
        files = [path]
    return files


@pytest.fixture(scope="module")
def sketch(sketch_files: list[Path]):
    named = [f for f in sketch_files if f.name == "surfer0_scaled1.svg"]
    return load_sketch(str((named or sketch_files)[0]))


def _ink(img: torch.Tensor) -> float:
    """Covered pixels of a black drawing on white."""
    return float((1 - img.double()).mean(dim=-3).sum())


# -- SVG ----------------------------------------------------------------------------------------------


def test_shared_sketches_parse_render_and_round_trip(sketch_files: list[Path]) -> None:
    for file in sketch_files:
        s = load_sketch(str(file))
        assert s.num_points == 64 and len(s.paths) == 16 and s.size == 256, file.name
        assert all(len(p.segments) == 1 and len(p.closing) == 1 for p in s.paths)
        assert all(p.stroke == (0, 0, 0, 1) and p.fill is None and p.stroke_width == 3 for p in s.paths)
        assert s.paths[0].attrs == {"stroke-linecap": "round", "stroke-linejoin": "round"}
        # Normalization is the identity for 256×256 inputs: the points are the file's numbers.
        text = file.read_text()
        ds = re.findall(r'\sd="([^"]+)"', text)
        numbers = [float(v) for d in ds for v in re.findall(r"-?[\d.]+(?:e-?\d+)?", d)]
        torch.testing.assert_close(s.points, torch.tensor(numbers, dtype=torch.float32).view(-1, 2))
        torch.testing.assert_close(s.center(), s.points.mean(0))

        img = render(s, s.points[None], 64)
        assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
        assert img.min() >= 0 and img.max() <= 1 and _ink(img) > 20

        again = parse_svg(sketch_to_svg(s, s.points), source=file.name)
        assert (again.points - s.points).abs().max() < 1e-3
        assert [(p.stroke, p.fill, p.stroke_width, p.attrs) for p in again.paths] == [
            (p.stroke, p.fill, p.stroke_width, p.attrs) for p in s.paths
        ]


FEATURES = f"""<?xml version="1.0"?>
<svg xmlns="{SVG_NS}" width="100" height="100" viewBox="0 0 512 512">
  <style>.a {{ stroke: red; }}</style>
  <g transform="translate(10,20) scale(2)">
    <path class="a" stroke-width="3" fill="none"
          d="m 10 10 h 20 v 20 L 100 100 q 10 10 20 0 a 10 10 0 0 1 20 0 z"/>
  </g>
  <rect x="100" y="300" width="100" height="50" fill="blue"/>
  <circle cx="400" cy="400" r="40" stroke="#00ff00" stroke-opacity="0.5" fill="none"/>
  <polyline points="300,20 340,60 380,20" style="fill: none; stroke: black; stroke-width: 8"/>
  <g style="display:none"><path d="M 0 0 L 50 50" stroke="black"/></g>
  <path d="M 0 0 L 50 50" stroke="none" fill="none"/>
</svg>"""


def test_svg_features_transforms_viewbox_css_and_shapes() -> None:
    s = parse_svg(FEATURES, source="features.svg")
    assert len(s.paths) == 4
    path, rect, circle, polyline = s.paths
    pts = s.points.double()

    def at(x: float, y: float) -> torch.Tensor:
        """User units of the viewBox (after the group transform) -> 256 canvas: ×0.5."""
        return torch.tensor([x * 0.5, y * 0.5], dtype=torch.float64)

    # h, v, L, q, the arc (as cubics) and the non-zero closing line; closed, so 3 points per segment.
    assert path.stroke == (1.0, 0.0, 0.0, 1.0) and path.fill is None
    assert path.stroke_width == pytest.approx(3 * 2 * 0.5)
    assert len(path.segments) >= 6 and path.closing == ()
    assert path.segments[-1][3] == path.segments[0][0]
    used = sorted({i for seg in path.segments for i in seg})
    assert used == list(range(3 * len(path.segments)))
    ends = [pts[seg[3]] for seg in path.segments]
    torch.testing.assert_close(pts[path.segments[0][0]], at(30, 40))  # m 10 10 → translate + scale(2)
    torch.testing.assert_close(ends[0], at(70, 40))  # h 20
    torch.testing.assert_close(ends[1], at(70, 80))  # v 20
    torch.testing.assert_close(ends[2], at(210, 220))  # L 100 100
    # Line → cubic: control points at thirds.
    torch.testing.assert_close(pts[path.segments[1][1]], at(70, 40 + 40 / 3))
    # Quadratic (100,100)-(110,110)-(120,100) → degree-elevated cubic.
    q = path.segments[3]
    torch.testing.assert_close(pts[q[1]], at(10 + 2 * (100 + 20 / 3), 20 + 2 * (100 + 20 / 3)))
    torch.testing.assert_close(pts[q[3]], at(250, 220))
    # The arc: a half circle of radius 10 (user) about (130, 100), i.e. 10 canvas px about (135, 110).
    arc = path.segments[4:-1]
    torch.testing.assert_close(pts[arc[-1][3]], at(290, 220))
    for seg in arc:
        for i in (seg[0], seg[3]):
            assert float((pts[i] - at(270, 220)).norm()) == pytest.approx(10.0, abs=1e-4)

    assert rect.fill == (0.0, 0.0, 1.0, 1.0) and rect.stroke is None
    assert len(rect.segments) == 4 and rect.closing == ()
    corners = pts[[seg[0] for seg in rect.segments]]
    torch.testing.assert_close(corners, torch.tensor([[50, 150], [100, 150], [100, 175], [50, 175]]).double())

    assert circle.fill is None and circle.stroke is not None
    assert circle.stroke[:3] == (0.0, 1.0, 0.0) and circle.stroke[3] == pytest.approx(0.5, abs=1 / 255)
    assert circle.stroke_width == pytest.approx(0.5)  # default 1, scaled like the coordinates
    assert circle.closing == () and circle.segments[-1][3] == circle.segments[0][0]
    on_curve = pts[[seg[0] for seg in circle.segments]]
    radii = (on_curve - 200).norm(dim=1)
    torch.testing.assert_close(radii, torch.full_like(radii, 20.0), atol=1e-4, rtol=0)

    assert polyline.stroke == (0.0, 0.0, 0.0, 1.0) and polyline.stroke_width == pytest.approx(4.0)
    assert len(polyline.segments) == 2
    assert polyline.closing == ((polyline.segments[-1][3], polyline.segments[0][0]),)
    assert s.num_points == sum(3 * len(p.segments) + len(p.closing) for p in s.paths)

    again = parse_svg(sketch_to_svg(s, s.points))
    assert (again.points - s.points).abs().max() < 1e-3
    assert [(p.segments, p.closing) for p in again.paths] == [(p.segments, p.closing) for p in s.paths]
    for a, b in zip(again.paths, s.paths, strict=True):
        assert a.stroke_width == pytest.approx(b.stroke_width, abs=1e-3) and a.fill_rule == b.fill_rule
        for x, y in ((a.stroke, b.stroke), (a.fill, b.fill)):
            assert (x is None) == (y is None) and (x is None or np.allclose(x, y, atol=1 / 255))


def test_normalization_of_non_square_documents() -> None:
    """notes §2.2: uniform scale max(W, H)/size about the centre of mass, centre mapped per axis."""
    body = '<path d="M 100 50 L 300 150" stroke="black" stroke-width="4"/>'
    s = parse_svg(f'<svg xmlns="{SVG_NS}" width="400" height="200">{body}</svg>', size=256)
    c, f = np.array([200.0, 100.0]), 400 / 256
    new_c = np.array([200 * 256 / 400, 100 * 256 / 200])
    expected = (np.array([[100, 50], [300, 150]]) - c) / f + new_c
    np.testing.assert_allclose(s.points[[0, 3]].numpy(), expected, atol=1e-4)
    assert s.paths[0].stroke_width == pytest.approx(4 / f)
    # No size at all: the drawing's bounding box is the document.
    s = parse_svg(f'<svg xmlns="{SVG_NS}">{body}</svg>', size=256)
    # The box is 200×100 with its centre of mass at (100, 50): f = 200/256, c' = (128, 128).
    np.testing.assert_allclose(s.points[[0, 3]].numpy(), [[0, 64], [256, 192]], atol=1e-4)


@pytest.mark.parametrize(
    "text",
    [
        "hello, not svg",
        "<html><body/></html>",
        _svg(""),
        _svg('<path d="M 0 0 L 10 10" fill="none" stroke="none"/><rect width="5" height="5" fill="none"/>'),
        _svg('<g style="display:none"><path d="M 0 0 L 10 10" stroke="black"/></g>'),
    ],
)
def test_undrawable_input_raises_sketch_error_naming_the_source(text: str) -> None:
    with pytest.raises(SketchError, match=r"bad-input\.svg"):
        parse_svg(text, source="bad-input.svg")


def test_load_sketch_errors(tmp_path: Path) -> None:
    with pytest.raises(media.MediaError):
        load_sketch(str(tmp_path / "missing.svg"))
    empty = tmp_path / "empty.svg"
    empty.write_text(_svg('<path d="M 0 0 L 10 10" fill="none"/>'))
    with pytest.raises(SketchError, match=r"empty\.svg"):
        load_sketch(str(empty))


def test_animated_svg_plays_every_frame(sketch) -> None:
    frames = sketch.points[None] + torch.arange(5.0)[:, None, None]
    text = animated_svg(sketch, frames, fps=8)
    root = ElementTree.fromstring(text)
    paths = root.findall(f"{{{SVG_NS}}}path")
    animates = root.findall(f".//{{{SVG_NS}}}animate")
    assert len(paths) == len(animates) == len(sketch.paths)
    first = ElementTree.fromstring(sketch_to_svg(sketch, frames[0])).findall(f"{{{SVG_NS}}}path")
    for path, still, anim in zip(paths, first, animates, strict=True):
        values = anim.get("values").split(";")
        assert len(values) == 5 and values[0] == path.get("d") == still.get("d")
        assert anim.get("attributeName") == "d" and anim.get("repeatCount") == "indefinite"
        assert anim.get("calcMode") == "discrete" and anim.get("dur") == "0.625s"
    last = parse_svg(sketch_to_svg(sketch, frames[-1].numpy()))
    assert (last.points - frames[-1]).abs().max() < 1e-3


# -- rasterizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 0.3, 0.71])
def test_straight_stroke_covers_width_times_length_plus_round_caps(offset: float) -> None:
    w, length = 4.0, 100.0
    x0, y = 70.2 + offset, 128.0 + offset
    d = f"M {x0} {y} C {x0 + 30} {y} {x0 + 60} {y} {x0 + length} {y}"
    s = parse_svg(_svg(f'<path d="{d}" stroke="black" stroke-width="{w}" fill="none"/>'))
    expected = w * length + math.pi * (w / 2) ** 2
    assert _ink(render(s, s.points[None])) == pytest.approx(expected, rel=0.03)
    # At half the resolution, lengths and widths halve.
    assert _ink(render(s, s.points[None], 128)) == pytest.approx(expected / 4, rel=0.03)


def test_official_stroke_width_makes_a_1000px_drawing_render_3px_black_lines() -> None:
    # A 1000-px drawing with 1-px red strokes: kept as drawn it renders 0.256-px lines on the 256 canvas.
    length = 400.0
    d = f"M 300 500 C 400 500 500 500 {300 + length} 500"
    body = f'<path d="{d}" stroke="red" stroke-width="1" fill="none"/>'
    body += '<rect x="10" y="10" width="40" height="40"/>'
    kept = parse_svg(_svg(body, size=1000))
    assert kept.paths[0].stroke_width == pytest.approx(0.256)
    official = official_strokes(kept)
    line, rect = official.paths
    assert line.stroke == (0, 0, 0, 1) and line.stroke_width == 3.0  # diffvg half-width 1.5, as official
    assert rect.stroke is None and rect.fill == kept.paths[1].fill  # a fill-only shape gets no stroke
    only_line = type(official)(official.points, [line], official.size)
    w, canvas_length = 3.0, length * 256 / 1000
    expected = w * canvas_length + math.pi * (w / 2) ** 2
    assert _ink(render(only_line, official.points[None])) == pytest.approx(expected, rel=0.03)
    assert _ink(render(type(kept)(kept.points, [kept.paths[0]], 256), kept.points[None])) < expected / 5


@pytest.mark.parametrize("offset", [0.0, 0.37])
def test_fill_area_and_evenodd_hole(offset: float) -> None:
    o = offset
    square = parse_svg(_svg(f'<rect x="{30 + o}" y="{40 + o}" width="40" height="40" fill="black"/>'))
    assert _ink(render(square, square.points[None])) == pytest.approx(1600, rel=0.02)
    rings = f"M {20 + o} {20 + o} h 80 v 80 h -80 z M {40 + o} {40 + o} h 40 v 40 h -40 z"
    evenodd = parse_svg(_svg(f'<path d="{rings}" fill="black" fill-rule="evenodd"/>'))
    assert _ink(render(evenodd, evenodd.points[None])) == pytest.approx(6400 - 1600, rel=0.02)
    nonzero = parse_svg(_svg(f'<path d="{rings}" fill="black"/>'))  # same winding: the hole is filled
    assert _ink(render(nonzero, nonzero.points[None])) == pytest.approx(6400, rel=0.02)
    # An open subpath is filled as if closed: a triangle of area 800.
    triangle = parse_svg(_svg('<path d="M 10.3 10.3 L 50.3 10.3 L 10.3 50.3" fill="black"/>'))
    assert triangle.paths[0].closing
    assert _ink(render(triangle, triangle.points[None])) == pytest.approx(800, rel=0.03)


def test_colours_and_compositing_order() -> None:
    body = ('<circle cx="100" cy="100" r="30" fill="red" stroke="blue" stroke-width="4"/>'
            '<rect x="150" y="150" width="20" height="20" fill="lime" fill-opacity="0.5"/>')  # fmt: skip
    s = parse_svg(_svg(body))
    img = render(s, s.points[None])[0].double()
    # Red channel is dark only under the blue stroke (an annulus of radii 28 and 32).
    assert float((1 - img[0, :140, :140]).sum()) == pytest.approx(math.pi * (32**2 - 28**2), rel=0.02)
    # Blue channel is dark only where the red fill shows (inside radius 28).
    assert float((1 - img[2, :140, :140]).sum()) == pytest.approx(math.pi * 28**2, rel=0.02)
    torch.testing.assert_close(img[:, 160, 160], torch.tensor([0.5, 1.0, 0.5]).double(), atol=1 / 255, rtol=0)


def test_gradient_matches_finite_differences() -> None:
    body = (
        '<path d="M 2.37 3.13 C 6 1 9 9 13.7 5.2" stroke="rgb(200,0,0)" stroke-width="3" fill="none"/>'
        '<path d="M 3.2 8.3 L 12.6 9.1 L 8.1 14.4 Z" fill="rgb(0,0,255)" fill-opacity="0.7"/>'
        '<path d="M 1.5 12.2 Q 5 7 7.4 13.9" stroke="green" stroke-width="2.5" fill="rgb(255,200,0)"/>'
    )
    s = parse_svg(_svg(body, size=16), size=16)
    pts = s.points.double()[None].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: render(s, p, tile=8, curve_segments=8), (pts,), eps=1e-6, atol=1e-5, rtol=1e-3,
        fast_mode=True,
    )  # fmt: skip


def test_gradient_of_a_real_sketch_matches_finite_differences(sketch) -> None:
    weight = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pts = sketch.points.double()[None].clone().requires_grad_(True)

    def loss(p: torch.Tensor) -> torch.Tensor:
        return (render(sketch, p, 64, tile=32) * weight).sum()

    (grad,) = torch.autograd.grad(loss(pts), pts)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    eps = 1e-4
    with torch.no_grad():
        for i in (0, 5, 17, 42, 63):
            for j in (0, 1):
                step = torch.zeros_like(pts)
                step[0, i, j] = eps
                numeric = float(loss(pts + step) - loss(pts - step)) / (2 * eps)
                assert float(grad[0, i, j]) == pytest.approx(numeric, rel=0.05, abs=1e-3), (i, j)


def test_tiling_and_batching_do_not_change_the_result(sketch) -> None:
    gen = torch.Generator().manual_seed(1)
    pts = sketch.points[None] + 3 * torch.randn(3, sketch.num_points, 2, generator=gen)
    weight = torch.rand(3, 3, 64, 64, generator=gen)
    images, grads = [], []
    for tile in (16, 64, 23):
        p = pts.clone().requires_grad_(True)
        img = render(sketch, p, 64, tile=tile)
        (img * weight).sum().backward()
        images.append(img.detach())
        grads.append(p.grad)
    for img, grad in zip(images[1:], grads[1:], strict=True):
        torch.testing.assert_close(img, images[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, grads[0], atol=1e-4, rtol=1e-4)
    alone = torch.cat([render(sketch, pts[k : k + 1], 64) for k in range(3)])
    torch.testing.assert_close(images[1], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(images[1][0], images[1][1])


def test_dtypes_culling_and_backends(sketch) -> None:
    ref = render(sketch, sketch.points[None], 64)
    low = sketch.points[None].bfloat16()
    half = render(sketch, low, 64)
    assert half.dtype == torch.bfloat16  # computed in float32: only the inputs and outputs are rounded
    assert (half.float() - render(sketch, low.float(), 64)).abs().max() < 0.01
    # Points far off the canvas leave it white, with zero (not NaN) gradient.
    far = (sketch.points[None] + 1000).requires_grad_(True)
    img = render(sketch, far, 32)
    assert torch.equal(img, torch.ones_like(img))
    img.sum().backward()
    assert far.grad is not None and torch.equal(far.grad, torch.zeros_like(far.grad))
    torch.testing.assert_close(render(sketch, sketch.points[None], 64, backend="auto"), ref)
    with pytest.raises(ValueError, match="points"):
        render(sketch, sketch.points, 64)
    try:
        import pydiffvg  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pydiffvg"):
            render(sketch, sketch.points[None], 64, backend="diffvg")


def test_diffvg_backend_builds_the_official_scene(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydiffvg is not installed here: a stand-in records the scene that the diffvg backend builds."""
    calls: dict[str, object] = {}

    class RenderFunction:
        @staticmethod
        def serialize_scene(width, height, shapes, groups):
            calls["scene"] = (width, height, shapes, groups)
            return ["args"]

        @staticmethod
        def apply(width, height, nx, ny, seed, background, *args):
            calls["render"] = (width, height, nx, ny, seed, background, args)
            return torch.zeros(height, width, 4)

    fake = type(sys)("pydiffvg")
    fake.Path = lambda **kw: kw
    fake.ShapeGroup = lambda **kw: kw
    fake.RenderFunction = RenderFunction
    monkeypatch.setitem(sys.modules, "pydiffvg", fake)
    body = ('<path d="M 10 10 C 20 20 30 20 40 10 L 50 50" stroke="black" stroke-width="3" fill="none"/>'
            '<rect x="5" y="5" width="10" height="10" fill="blue"/>')  # fmt: skip
    s = parse_svg(_svg(body))
    frames = s.points[None].repeat(2, 1, 1)
    img = render(s, frames, 128, backend="auto")
    assert img.shape == (2, 3, 128, 128) and torch.equal(img, torch.ones_like(img))  # alpha 0: white
    assert calls["render"][:6] == (128, 128, 2, 2, 0, None)
    _, _, shapes, groups = calls["scene"]
    assert [len(shape["points"]) for shape in shapes] == [7, 12]  # open: 3n + 1, closed: 3n
    assert [shape["is_closed"] for shape in shapes] == [False, True]
    torch.testing.assert_close(shapes[0]["points"], s.points[:7] / 2)
    assert float(shapes[0]["stroke_width"]) == pytest.approx(3 / 2 / 2)  # half-width, at half the size
    assert groups[0]["fill_color"] is None and groups[1]["stroke_color"] is None

"""LiveSketch: displacement field, augmentation, SDS, and the optimization against an oracle prior."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pipelines.backbone import load_backbone
from pipelines.distill import gradient_loss, sds_gradient
from pipelines.livesketch.animate import LEARNING_RATES, LiveSketchParams, SketchJob, animate
from pipelines.livesketch.augment import augment
from pipelines.livesketch.field import FieldConfig, make_field
from pipelines.livesketch.raster import render
from pipelines.livesketch.svg import load_sketch

SKETCHES = ("surfer0_scaled1.svg", "butterfly_3_scaled1.svg", "fish_scaled1.svg")


@pytest.fixture(scope="module")
def sketches(data_dir):
    return [load_sketch(str(data_dir / "sketches" / name)) for name in SKETCHES]


# -- displacement field -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["official", "pooled"])
@pytest.mark.parametrize(("points", "frames"), [(64, 24), (7, 3), (200, 1)])
def test_field_works_for_any_number_of_points_and_frames(field, points, frames):
    torch.manual_seed(points)  # the bound below is about typical initial weights, not unlucky ones
    base = 64 + torch.rand(points, 2) * 128  # a sketch-sized spread about the canvas centre
    config = FieldConfig(field=field, dim=32 if field == "official" else 128)
    out = make_field(base, frames, config)(torch.Generator().manual_seed(0))
    assert out.points.shape == (frames, points, 2)
    assert out.translation.shape == (frames, 2) and out.rotation.shape == (frames,)
    # Small motion at initialization, as the official network's (a pixel or two, not tens).
    assert 0 < (out.points - base).norm(dim=-1).mean() < 5


def official_parameter_count(points: int, frames: int, dim: int = 128) -> int:
    """The official PointMLP's trainable parameters (painter.py:268-426) from its layer shapes, minus the
    dead embedding, with the scale head counted (ours is used, the official one is not)."""
    n = points * frames

    def linear(i: int, o: int) -> int:
        return i * o + o

    norm = 2 * dim
    hidden = linear(dim, dim) + norm
    project = linear(2, dim) + norm + linear(dim, dim)
    local = linear(n * dim, dim) + norm + 2 * hidden + linear(dim, 2 * n)
    trunk = linear(n * dim, dim) + norm + hidden
    heads = 3 * hidden + linear(dim, 2 * frames)  # translation
    heads += hidden + linear(dim, frames)  # rotation
    heads += 2 * (hidden + linear(dim, 2 * frames))  # shear, scale
    return project + local + trunk + heads


def test_official_field_has_the_official_parameter_count_for_16_strokes(sketches):
    sketch = sketches[0]  # surfer: 16 one-cubic strokes, 64 control points
    assert (sketch.num_points, len(sketch.paths)) == (64, 16)
    with torch.device("meta"):
        net = make_field(sketch.points.to("meta"), 24, FieldConfig())
    count = sum(p.numel() for p in net.parameters())
    assert count == official_parameter_count(64, 24) == 50_918_440
    # With the official dead embedding, nn.Embedding(2N, 128), it is notes/livesketch.md's ≈51.3M.
    assert count + 2 * 64 * 24 * 128 == pytest.approx(51.3e6, rel=1e-3)


@pytest.mark.parametrize("field", ["official", "pooled"])
def test_field_is_local_plus_global_about_the_centre(field):
    torch.manual_seed(0)
    base = torch.rand(20, 2) * 256
    net = make_field(base, 4, FieldConfig(field=field, dim=32)).eval()
    with torch.no_grad():
        out = net()
    torch.testing.assert_close(out.points, base + out.local + out.global_)
    # The global part is exactly A·(p − c) + d − (p − c) with A = R(θ)·Sh·S per frame.
    rel = base - base.mean(0)
    for k in range(4):
        theta, (shx, shy), (sx, sy) = out.rotation[k], out.shear[k], out.scale[k]
        r = torch.stack([torch.stack([theta.cos(), -theta.sin()]), torch.stack([theta.sin(), theta.cos()])])
        a = r @ torch.tensor([[1.0, shy], [shx, 1.0]]) @ torch.diag(torch.stack([sx, sy]))
        torch.testing.assert_close(out.global_[k], rel @ a.T + out.translation[k] - rel, atol=1e-4, rtol=1e-5)
    # Scale has its own head: it differs from what the shear head would give it (official quirk).
    assert not torch.allclose(
        out.scale - 1, (out.shear / FieldConfig().lambda_shear) * FieldConfig().lambda_scale
    )


@pytest.mark.parametrize("field", ["official", "pooled"])
def test_field_lambdas_and_ablations(field):
    base = torch.rand(16, 2) * 256
    config = FieldConfig(field=field, dim=32)
    still = make_field(base, 3, replace(config, lambda_translation=0.0)).eval()()
    assert still.translation.abs().max() == 0
    no_global = make_field(base, 3, replace(config, use_global=False)).eval()()
    assert no_global.global_.abs().max() == 0 and no_global.local.abs().max() > 0
    no_local = make_field(base, 3, replace(config, use_local=False)).eval()()
    assert no_local.local.abs().max() == 0 and no_local.global_.abs().max() > 0


@pytest.mark.parametrize("field", ["official", "pooled"])
def test_field_parameter_split_matches_the_two_passes(field):
    net = make_field(torch.rand(8, 2), 2, FieldConfig(field=field, dim=16))
    local = {id(p) for p in net.local_parameters()}
    global_ = {id(p) for p in net.global_parameters()}
    shared = {id(p) for p in net.project.parameters()}
    assert local & global_ == shared
    assert local | global_ == {id(p) for p in net.parameters()}


def test_no_network_field_optimizes_the_points_themselves(sketches):
    net = make_field(sketches[0].points, 3, FieldConfig(field="points"))
    assert [p.shape for p in net.parameters()] == [(3, 64, 2)] and net.global_parameters() == []
    torch.testing.assert_close(net().points, sketches[0].points.expand(3, -1, -1))
    assert LiveSketchParams(field="points").passes() == ("local",)
    with pytest.raises(ValueError, match="use_local"):
        LiveSketchParams.from_dict({"field": "points", "use_local": False})
    with pytest.raises(ValueError, match="field must be"):
        LiveSketchParams.from_dict({"field": "mlp"})


def test_use_local_false_still_steps_the_shared_projection_in_the_local_pass(sketches):
    # The official -predict_only_global keeps both passes; the local optimizer then reaches only the
    # shared projection (the local path gets no gradient), as painter.py:390-395 and :431-432 imply.
    backbone = load_backbone("tiny")
    params = LiveSketchParams(steps=2, num_frames=2, size=32, dim=16, seed=3, use_local=False)
    assert params.passes() == ("local", "global")
    saved = []
    [anim] = animate(
        backbone, [SketchJob(sketches[2], "x", params)], on_checkpoint=saved.append, checkpoint_every=1
    )
    assert anim.local.abs().max() == 0 and anim.global_.abs().max() > 0
    local_state = saved[0][0]["optimizers"]["local"]["state"]
    net = make_field(sketches[2].points, 2, params.field_config())
    assert len(local_state) == len(list(net.project.parameters())) == 6


@pytest.mark.parametrize("field", ["official", "pooled"])
def test_field_dropout_only_while_training_and_reproducible(field):
    net = make_field(torch.rand(8, 2) * 256, 2, FieldConfig(field=field, dim=16))
    a = net(torch.Generator().manual_seed(1)).points
    b = net(torch.Generator().manual_seed(1)).points
    c = net(torch.Generator().manual_seed(2)).points
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    net.eval()
    torch.testing.assert_close(net(torch.Generator().manual_seed(1)).points, net().points)


# -- augmentation -------------------------------------------------------------------------------


def test_augment_identity_without_distortion_or_crop():
    frames = torch.rand(3, 3, 32, 32)
    out = augment(frames, torch.Generator().manual_seed(0), distortion=0.0, min_scale=1.0)
    torch.testing.assert_close(out, frames, atol=1e-5, rtol=0)


def test_augment_shares_one_draw_across_frames_fills_white_and_is_differentiable():
    frame = torch.ones(3, 48, 48)
    frame[:, 10:30, 14:34] = 0
    frames = torch.stack([frame, frame, frame]).requires_grad_()
    out = augment(frames, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])
    assert out.max() <= 1 + 1e-6 and out.min() >= -1e-6
    assert not torch.allclose(out[0], frame)  # it did warp
    assert out[0].mean() > 0.5  # the area outside the warped image is white, not black
    out.sum().backward()
    assert frames.grad.abs().sum() > 0


# -- SDS ----------------------------------------------------------------------------------------


class OracleDenoiser:
    """A denoiser whose prediction is the exact noise for known target latents (DESIGN.md's oracle prior).

    Its "VAE" is a 4× average pooling and a blur: it keeps where the ink is, which is what the test
    checks, and the blur lets thin strokes feel a target a few pixels away.
    """

    def __init__(self, targets: torch.Tensor, num_train: int = 1000):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.targets = targets

    def encode_prompt(self, prompts):
        return torch.zeros(len(prompts), 4, 8)

    def encode_frames(self, frames, sample=False, generators=None):
        b, f = frames.shape[:2]
        pooled = F.avg_pool2d(frames.flatten(0, 1), 4)
        for _ in range(2):
            pooled = F.avg_pool2d(pooled, 5, stride=1, padding=2, count_include_pad=False)
        return pooled.reshape(b, f, *pooled.shape[1:]).permute(0, 2, 1, 3, 4)

    def add_noise(self, x0, noise, t):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_noise(self, latents, t, text_embeds):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        target = self.targets.repeat(latents.shape[0] // len(self.targets), 1, 1, 1, 1)
        return (latents - abar.sqrt() * target) / (1 - abar).sqrt()


def test_sds_gradient_points_from_the_current_latent_to_the_oracle_target():
    target = torch.randn(2, 3, 2, 4, 4)
    oracle = OracleDenoiser(target)
    latents = torch.randn_like(target).requires_grad_()
    t = torch.tensor([100, 700])
    grad = sds_gradient(
        oracle,
        latents,
        torch.zeros(2, 4, 8),
        torch.zeros(2, 4, 8),
        torch.tensor([30.0, 40.0]),
        t,
        torch.randn_like(target),
    )
    abar = oracle.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    expected = (1 - abar) * abar.sqrt() / (1 - abar).sqrt() * (latents - target)
    torch.testing.assert_close(grad, expected.detach(), atol=1e-5, rtol=1e-4)
    gradient_loss(latents, grad).backward()
    torch.testing.assert_close(latents.grad, grad)


# -- optimization -------------------------------------------------------------------------------

SHIFT = 8.0  # canvas pixels per frame


def _oracle_run(sketch, **changes):
    """Distill the oracle for a sketch moving SHIFT px right per frame, at the field's default lrs."""
    params = LiveSketchParams(
        steps=60,
        num_frames=4,
        size=64,
        augment=False,
        lr_warmup_steps=0,  # the schedule's shape is for 1000 steps; a 60-step run uses its peak
        lr_final_ratio=1.0,
        dim=32,
        seed=0,
    )
    params = replace(params, **changes)
    shifts = torch.arange(params.num_frames, dtype=torch.float32) * SHIFT
    target_points = sketch.points[None] + torch.stack([shifts, torch.zeros_like(shifts)], -1)[:, None]
    with torch.no_grad():
        target_video = render(sketch, target_points, params.size)
    oracle = OracleDenoiser(OracleDenoiser(torch.zeros(1)).encode_frames(target_video[None] * 2 - 1))
    [anim] = animate(oracle, [SketchJob(sketch, "moves right", params)])
    with torch.no_grad():
        start = render(sketch, sketch.points[None].expand(params.num_frames, -1, -1), params.size)
        final = render(sketch, anim.points, params.size)
    return anim, start, final, target_video, shifts


def _ink_centroid_x(frames):
    ink = (1 - frames.mean(1)).clamp(min=0)
    xs = torch.arange(frames.shape[-1], dtype=torch.float32)
    return (ink.sum(1) * xs).sum(-1) / ink.sum((1, 2))


def global_share(anim, shifts) -> float:
    """How much of the learned motion along the target's translation the global path carries."""
    along = lambda part: float((part.mean(1)[:, 0] * shifts).sum())  # noqa: E731
    return along(anim.global_) / along(anim.local + anim.global_)


# Measured at the default learning rates (README, LiveSketch, "Fields side by side"): the pooled
# field's global path carries nearly all of the translation (0.97). The official network at the official
# rates learns the oracle slowly (≈3 of the 8–24 px in 60 steps), mostly through its local path (lr 5e-3);
# its global path (lr 1e-4 behind LayerNorms) moves the right way but little (share 0.08). These
# minimums guard those measurements; the official field does NOT reach a global majority here.
MIN_GLOBAL_SHARE = {"pooled": 0.8, "official": 0.0}


@pytest.mark.parametrize("field", ["pooled", "official"])
def test_oracle_prior_teaches_the_translation_it_encodes(sketches, field):
    anim, start, final, target, shifts = _oracle_run(sketches[0], field=field)
    # Distance as the oracle sees it (its encoding); raw pixels barely overlap for thin strokes.
    encode = OracleDenoiser(torch.zeros(1)).encode_frames
    before, after = (
        (encode(v[None] * 2 - 1) - encode(target[None] * 2 - 1)).abs().mean() for v in (start, final)
    )
    assert after < before, (before, after)
    x = _ink_centroid_x(final)
    assert x[-1] > x[0] + 1, f"the ink should move right, got {x.tolist()}"
    share = global_share(anim, shifts)
    assert share > MIN_GLOBAL_SHARE[field], share
    # The local path stays bounded: no point moves more than the whole target shift.
    assert anim.local.norm(dim=-1).max() < SHIFT * len(shifts), anim.local.norm(dim=-1).max()
    if field == "pooled":
        assert after < 0.4 * before and (x.diff() > 0).all(), x.tolist()
        dx = anim.translation[:, 0] - anim.translation[0, 0]
        assert (dx.diff() > 0).all(), dx


def test_oracle_prior_with_lambda_t_zero_learns_no_global_translation(sketches):
    anim, *_ = _oracle_run(sketches[0], lambda_translation=0.0, steps=10)
    assert anim.translation.abs().max() < 1e-6


def test_default_learning_rates_follow_the_field():
    assert LiveSketchParams().learning_rates() == (5e-3, 1e-4)  # official: animate_svg.py:53, :71
    assert LiveSketchParams(field="pooled").learning_rates() == LEARNING_RATES["pooled"]
    assert LiveSketchParams(field="pooled", lr_global=0.5).learning_rates()[1] == 0.5
    assert LiveSketchParams.from_dict({"field": "pooled", "lr_local": 1}).lr_local == 1.0
    with pytest.raises(ValueError, match="lr_local must be a number"):
        LiveSketchParams.from_dict({"lr_local": "fast"})


def test_sds_gradient_of_fp16_latents_is_computed_in_fp32_and_stays_finite():
    class Loud(OracleDenoiser):
        """Predictions whose guided difference (40 × 3000) is far beyond fp16's 65504."""

        def predict_noise(self, latents, t, text_embeds):
            b = latents.shape[0] // 2
            return torch.cat([torch.zeros_like(latents[:b]), torch.full_like(latents[b:], 3000.0)])

    model = Loud(torch.zeros(1))
    latents = torch.zeros(1, 2, 2, 2, 2, dtype=torch.float16)
    t = torch.tensor([900])
    grad = sds_gradient(
        model, latents, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.tensor([40.0]), t, latents
    )
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    assert float(grad.max()) == torch.finfo(torch.float16).max  # 0.99 × 120000 in fp32, clamped


def test_batched_sketches_match_separate_runs(sketches):
    backbone = load_backbone("tiny")
    params = [
        LiveSketchParams(steps=3, num_frames=3, size=32, dim=16, seed=s, guidance_local=g)
        for s, g in ((1, 30.0), (2, 7.5), (3, 30.0))
    ]
    jobs = [SketchJob(s, prompt, p) for s, prompt, p in zip(sketches, ["a", "b c", "d"], params, strict=True)]
    together = animate(backbone, jobs)
    for job, batched in zip(jobs, together, strict=True):
        [alone] = animate(backbone, [job])
        moved = (alone.points - job.sketch.points).norm(dim=-1).mean()
        error = (batched.points - alone.points).norm(dim=-1).max()
        assert error < 1e-3 * max(1.0, float(moved)) + 1e-3, (error, moved)
    # Different seeds really give different animations (the comparison above is not vacuous).
    assert not torch.allclose(
        together[0].points - sketches[0].points, together[1].points - sketches[1].points
    )


def test_lr_schedule_matches_the_official_multiplier():
    p = LiveSketchParams()
    expected = {0: 0.100, 50: 0.703, 100: 0.912, 500: 0.632, 1000: 0.400}
    for step, m in expected.items():
        assert math.isclose(p.lr_multiplier(step), m, abs_tol=1e-3), step


def test_params_from_row_values_are_type_checked():
    assert LiveSketchParams.from_dict({"steps": 5.0, "augment": False, "other": 1}).steps == 5
    for bad in ({"steps": 2.5}, {"augment": "yes"}, {"t_min": 900, "t_max": 100}, {"steps": 0}):
        with pytest.raises(ValueError):
            LiveSketchParams.from_dict(bad)


def test_resuming_from_a_checkpoint_continues_exactly(sketches):
    backbone = load_backbone("tiny")
    job = SketchJob(sketches[1], "flying", LiveSketchParams(steps=4, num_frames=2, size=32, dim=16, seed=5))
    saved = []
    [whole] = animate(backbone, [job], on_checkpoint=saved.append, checkpoint_every=2)
    assert [s[0]["step"] for s in saved] == [2]
    [resumed] = animate(backbone, [job], states=saved[0])
    torch.testing.assert_close(resumed.points, whole.points)

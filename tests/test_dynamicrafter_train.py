"""DynamiCrafter training on Ray Train (2 CPU workers, gloo) over a synthetic dataset of moving squares."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.train import TrainSpec, run_training
from pipelines import media
from pipelines.dynamicrafter.model import load_dynamicrafter
from pipelines.dynamicrafter.sample import Request, SampleParams, sample
from pipelines.dynamicrafter.train import trainable_parameters, training_loss
from pipelines.dynamicrafter.training_data import DynamiCrafterTrainConfig
from pipelines.training_data import clip_indices

SIZE, FRAMES = 32, 4
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40)]
PARAMS = {
    "num_frames": FRAMES,
    "height": SIZE,
    "width": SIZE,
    "batch_size": 2,
    "lr": 2e-3,
    "checkpoint_every": 10,
}


def moving_square(colour, start: int) -> np.ndarray:
    """A square of `colour` moving right on gray; the condition image (any frame) tells its colour."""
    video = np.full((8, SIZE, SIZE, 3), 128, np.uint8)
    for f in range(8):
        x = (start + 2 * f) % (SIZE - 12)
        video[f, 10:22, x : x + 12] = colour
    return video


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    rows = []
    for i in range(8):
        path = str(root / f"sq{i}.gif")
        media.write_video(moving_square(COLOURS[i % 4], 2 * i), path)
        rows.append((f"sq{i}", path, "a square moving right"))
    # An unreadable row is skipped; its decoding batch's other examples still reach the workers.
    rows.insert(3, ("gone", str(root / "gone.gif"), "a square moving right"))
    manifest = root / "train.parquet"
    pq.write_table(
        pa.table({k: [r[j] for r in rows] for j, k in enumerate(["id", "video", "prompt"])}), manifest
    )
    return str(manifest)


def _fixed_batch() -> np.ndarray:
    return np.stack([moving_square(c, 3)[:FRAMES] for c in COLOURS])


def _mean_loss(model, stage: int) -> float:
    config = DynamiCrafterTrainConfig(stage=stage, num_frames=FRAMES, height=SIZE, width=SIZE)
    g = torch.Generator().manual_seed(0)
    batch = {
        "frames": _fixed_batch(),
        "prompt": ["a square moving right"] * 4,
        "frame_stride": np.full(4, 2),
        "fps": np.full(4, 8.0),
    }
    with torch.no_grad():
        losses = [float(training_loss(model, batch, config, g)) for _ in range(6)]
    return float(np.mean(losses))


def _condition_error(model) -> float:
    """Mean |first frame − condition image| of sampled videos, in the VAE's rendering of the image."""
    params = SampleParams(steps=8, num_frames=FRAMES, height=SIZE, width=SIZE, cfg_scale=1.0)
    images = torch.from_numpy(_fixed_batch()[:, 0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    videos, _ = sample(model, [Request(img, "a square moving right", params) for img in images])
    with torch.no_grad():
        reference = model.backbone.decode_latents(model.backbone.encode_frames(images[:, None]))[:, 0]
    return float((videos[:, 0] - reference).abs().mean())


def test_clip_indices_follow_the_stride_and_shrink_it_for_short_videos():
    rng = np.random.default_rng(0)
    picked, stride = clip_indices(30, 4, 3, rng)
    assert stride == 3 and np.diff(picked).tolist() == [3, 3, 3] and picked[-1] < 30
    picked, stride = clip_indices(7, 4, 3, rng)
    assert stride == 2 and picked[-1] < 7
    with pytest.raises(media.MediaError):
        clip_indices(3, 4, 1, rng)


def test_stages_train_what_the_paper_trains():
    model = load_dynamicrafter({"backbone": "tiny"}, "cpu", torch.float32)
    one = trainable_parameters(model, DynamiCrafterTrainConfig(stage=1))
    two = trainable_parameters(model, DynamiCrafterTrainConfig(stage=2))
    assert all(n.startswith(("context.", "processors.")) for n in one)
    assert set(one) < set(two)
    unet = [n for n in two if n.startswith("unet.")]
    assert any("attentions" in n for n in unet) and any("conv_in" in n for n in unet)
    assert not any(m in n for n in unet for m in ("temp_attentions", "temp_convs", "transformer_in"))


def test_training_on_ray_resumes_after_a_kill_and_lowers_the_loss_and_follows_the_condition(
    ray_cluster, squares, tmp_path
):
    models = {"backbone": "tiny", "adapter": None}
    before = load_dynamicrafter(models, "cpu", torch.float32)
    loss_before, error_before = _mean_loss(before, 3), _condition_error(before)

    spec = TrainSpec(
        "dynamicrafter",
        3,
        squares,
        str(tmp_path / "out"),
        models,
        {**PARAMS, "steps": 60},
        workers=2,
        max_failures=0,
        runtime_env={"env_vars": {"ANIMA_CHAOS_TRAIN_STEP": "35"}},
    )
    with pytest.raises(Exception, match="chaos"):
        run_training(spec)
    spec.runtime_env = None
    summary = run_training(spec)  # the same command again: on from the step-30 checkpoint
    assert summary["resumed_from"] == 30 and summary["step"] == 60
    assert not (tmp_path / "out" / "_inflight").exists()  # the decoding batches' markers: the run's own
    # Every row is accounted for: the unreadable one is listed once, with why, though every pass met it.
    assert summary["skipped_rows"] == 1
    (listed,) = pq.read_table(summary["skipped"]).to_pylist()
    assert listed["id"] == "gone" and listed["row"] == 3 and "not found" in listed["reason"]
    after = load_dynamicrafter({**models, "adapter": summary["adapter"]}, "cpu", torch.float32)
    loss_after, error_after = _mean_loss(after, 3), _condition_error(after)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert error_after < error_before, (error_before, error_after)

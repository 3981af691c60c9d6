"""StyleCrafter training on Ray Train (2 CPU workers, gloo), synthetic images whose palette is the style."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from jobs.train import TrainSpec, run_training
from pipelines import media
from pipelines.stylecrafter.model import load_stylecrafter
from pipelines.stylecrafter.train import (
    DEFAULT_STYLE_WORDS,
    StyleTrainConfig,
    strip_style_words,
    style_reference,
    trainable_parameters,
    training_loss,
)

H, W = 32, 48
PALETTES = [((220, 40, 40), (250, 200, 60)), ((30, 60, 200), (60, 200, 220)), ((40, 160, 60), (20, 40, 20))]
PARAMS = {"height": H, "width": W, "batch_size": 2, "lr": 2e-3, "checkpoint_every": 10, "num_frames": 3}


def palette_image(palette, seed: int) -> np.ndarray:
    """Random blocks in the two colours of a palette: the palette is the style, the layout the content."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, (6, 8))
    image = np.array(palette, np.uint8)[blocks]
    return np.asarray(image.repeat(12, 0).repeat(12, 1))  # 72×96


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("palettes")
    rows = []
    for i in range(9):
        path = str(root / f"p{i}.png")
        media.write_image(palette_image(PALETTES[i % 3], i), path)
        rows.append({"id": f"p{i}", "image": path, "video": None, "prompt": "an oil painting of a pattern"})
    for i in range(2):
        path = str(root / f"v{i}.gif")
        media.write_video(np.stack([palette_image(PALETTES[i], 10 + f) for f in range(6)]), path)
        rows.append({"id": f"v{i}", "image": None, "video": path, "prompt": "a changing pattern"})
    manifest = root / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return str(manifest)


def test_style_words_are_stripped_and_references_are_larger_crops():
    assert strip_style_words(
        "an oil painting of a cat in the style of Van Gogh, sunset", DEFAULT_STYLE_WORDS
    ) == ("a cat, sunset")
    assert strip_style_words("A chef preparing meals in kitchen.", DEFAULT_STYLE_WORDS) == (
        "A chef preparing meals in kitchen."
    )
    config = StyleTrainConfig(height=H, width=W)
    image = palette_image(PALETTES[0], 0)
    ref = style_reference(image, config, np.random.default_rng(0))
    assert ref.shape == (32, 32, 3)  # a crop of the training size's shorter side, from a 1.5625× resize
    whole = np.asarray(Image.fromarray(image).resize((32, 32)))
    assert np.abs(ref.astype(int) - whole).mean() > 5  # not the whole image shrunk: a crop
    low, high = np.min(PALETTES[0], 0), np.max(PALETTES[0], 0)
    assert ((ref.reshape(-1, 3).mean(0) >= low) & (ref.reshape(-1, 3).mean(0) <= high)).all()


def test_stage_one_trains_the_adapter_and_stage_two_only_temporal_blocks():
    model = load_stylecrafter({"backbone": "tiny"}, "cpu", torch.float32)
    one = trainable_parameters(model, StyleTrainConfig(stage=1))
    assert one and all(n.startswith(("qformer.", "scales.", "processors.")) for n in one)
    two = trainable_parameters(model, StyleTrainConfig(stage=2))
    assert two and all(n.startswith("unet.") and ("temp_" in n or "transformer_in" in n) for n in two)
    assert all(not p.requires_grad for p in model.qformer.parameters())


def _palette_batch(config):
    images = np.stack([palette_image(PALETTES[i % 3], 100 + i) for i in range(3)])
    rng = np.random.default_rng(0)
    frames = np.stack([np.asarray(ImageOps.fit(Image.fromarray(img), (W, H))) for img in images])[:, None]
    styles = np.stack([style_reference(img, config, rng) for img in images])
    return images, {"frames": frames, "style": styles, "prompt": ["a pattern"] * 3}


def _mean_loss(model) -> float:
    config = StyleTrainConfig(stage=1, height=H, width=W)
    _, batch = _palette_batch(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return float(np.mean([float(training_loss(model, batch, config, g)) for _ in range(6)]))


def test_stage_one_training_lowers_the_loss(ray_cluster, data, tmp_path):
    # The sampler's colour agreement with the style is not asserted: on the frozen random tiny UNet it did
    # not improve in 60 steps (see the issue note); the loss, on held-out palette images, does fall.
    models = {"backbone": "tiny", "adapter": None}
    loss_before = _mean_loss(load_stylecrafter(models, "cpu", torch.float32))
    spec = TrainSpec(
        "stylecrafter", 1, data, str(tmp_path / "out"), models, {**PARAMS, "steps": 60}, workers=2
    )
    summary = run_training(spec)
    after = load_stylecrafter({**models, "adapter": summary["adapter"]}, "cpu", torch.float32)
    loss_after = _mean_loss(after)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)


def test_stage_two_mixes_videos_and_images_and_resumes_after_a_kill(ray_cluster, data, tmp_path):
    params = {**PARAMS, "steps": 8, "checkpoint_every": 4, "image_ratio": 0.5}
    spec = TrainSpec(
        "stylecrafter",
        2,
        data,
        str(tmp_path / "out"),
        {"backbone": "tiny"},
        params,
        workers=2,
        max_failures=0,
        runtime_env={"env_vars": {"ANIMA_CHAOS_TRAIN_STEP": "6"}},
    )
    with pytest.raises(Exception, match="chaos"):
        run_training(spec)
    spec.runtime_env = None
    summary = run_training(spec)
    assert summary["resumed_from"] == 4 and summary["step"] == 8

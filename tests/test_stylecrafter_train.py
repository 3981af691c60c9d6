"""StyleCrafter training on Ray Train (2 CPU workers, gloo), synthetic images whose palette is the style.

Whether training teaches the adapter to transfer a style is measured on a backbone that can paint the
palettes at all: the random tiny preset cannot (its VAE's first GroupNorm has one channel per group and
normalises flat colour away, so the three palettes encode to nearly the same latents). The fixture
`palette_backbone` is the tiny v-prediction preset with its VAE and UNet briefly trained on palette
images, text only, so that the base model paints one of the three palettes at random, as a real
text-to-video model paints many styles; the adapter then has to learn to choose the reference's palette.

Why v-prediction: the palette is decided at high noise, where an x0 error δ costs ᾱ_t/(1-ᾱ_t)·δ² in the
ε loss but δ²/(1-ᾱ_t) in the v loss, about 200 times more near t = 1000. On an ε backbone trained the
same way, 120 adapter steps of batch 4 (one process) carried none of the palette into samples (transfer
0.22 before, 0.11 after); on the v backbone the same run carried 0.97 of it.
"""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.train import TrainSpec, run_training
from pipelines import media, training
from pipelines.backbone import load_backbone_uncached, prepare_backbone
from pipelines.stylecrafter.model import load_stylecrafter
from pipelines.stylecrafter.sample import Request, SampleParams, sample
from pipelines.stylecrafter.train import trainable_parameters, training_loss
from pipelines.stylecrafter.training_data import (
    DEFAULT_STYLE_WORDS,
    StyleTrainConfig,
    strip_style_words,
    style_reference,
)
from pipelines.temporal import temporal_layers_skipped

H, W = 32, 48
PALETTES = [((220, 40, 40), (250, 200, 60)), ((30, 60, 200), (60, 200, 220)), ((40, 160, 60), (20, 40, 20))]
STAGE_ONE_STEPS = 160
PARAMS = {"height": H, "width": W, "batch_size": 2, "lr": 2e-3, "checkpoint_every": 10, "num_frames": 3}


def palette_image(palette, seed: int) -> np.ndarray:
    """Random blocks in the two colours of a palette: the palette is the style, the layout the content."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, (6, 8))
    image = np.array(palette, np.uint8)[blocks]
    return np.asarray(image.repeat(12, 0).repeat(12, 1))  # 72×96


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


def _train(parameters, steps: int, lr: float, loss_of) -> None:
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for _ in range(steps):
        loss = loss_of()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def palette_backbone(tmp_path_factory) -> str:
    """The tiny backbone with a VAE that keeps colour and a UNet that paints the three palettes."""
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("backbone") / "palettes"
    shutil.copytree(prepare_backbone("tiny-v"), path)
    images = np.stack([media.fit_frame(palette_image(PALETTES[i % 3], 500 + i), (H, W)) for i in range(120)])
    images, g = training.to_frames(images[:, None]), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # Groups of two channels: flat colour survives the encoder's normalisation.
    vae = AutoencoderKL.from_config({**AutoencoderKL.load_config(path / "vae"), "norm_num_groups": 4})

    def reconstruction():
        batch = images[torch.randint(0, len(images), (16,), generator=g), 0]
        posterior = vae.encode(batch).latent_dist
        return (vae.decode(posterior.sample(g)).sample - batch).abs().mean() + 1e-6 * posterior.kl().mean()

    _train(vae.parameters(), 150, 2e-3, reconstruction)
    with torch.no_grad():
        vae.register_to_config(scaling_factor=1 / float(vae.encode(images[:, 0]).latent_dist.mean.std()))
    vae.save_pretrained(path / "vae")

    bb = load_backbone_uncached(str(path))
    with torch.no_grad():
        latents = bb.encode_frames(images)
    texts = bb.encode_prompt(["a pattern", ""])
    unet = bb.unet.requires_grad_(True).train()
    training.contiguous_group_norm_inputs(unet)

    def denoising():
        x0 = latents[torch.randint(0, len(latents), (16,), generator=g)]
        noisy, t, noise, x0 = training.noisy_latents(bb, x0, g)
        text = texts[(torch.rand(16, generator=g) < 0.1).long()]  # 10% unconditional, for CFG
        return training.diffusion_loss(bb, bb.predict(noisy, t, text), x0, noise, t)

    with temporal_layers_skipped(unet):  # a base that paints images as the image model: no temporal layers
        _train(unet.parameters(), 150, 1e-3, denoising)
    unet.save_pretrained(path / "unet")
    return str(path)


def _palette_batch(config):
    images = np.stack([palette_image(PALETTES[i % 3], 100 + i) for i in range(3)])
    rng = np.random.default_rng(0)
    frames = np.stack([media.fit_frame(img, (H, W)) for img in images])[:, None]
    styles = np.stack([style_reference(img, config, rng) for img in images])
    return {"frames": frames, "style": styles, "prompt": ["a pattern"] * 3}


def _mean_loss(model) -> float:
    config = StyleTrainConfig(stage=1, height=H, width=W)
    batch = _palette_batch(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return float(np.mean([float(training_loss(model, batch, config, g)) for _ in range(16)]))


def _palette_transfer(model, seeds: int = 6) -> float:
    """How much of the palette difference between two references the sampler carries into its samples.

    Each seed is sampled with one held-out reference of each palette; for every two palettes a, b the
    difference of the samples' mean colours is projected on that of the palettes' mean colours:
    1 = the sample's colour follows the reference fully, 0 = the reference does not change it. Pairing
    samples of one seed takes out the palette the base model would paint from that seed's noise.
    """
    config, rng = StyleTrainConfig(height=H, width=W), np.random.default_rng(1)
    references = training.to_frames(
        np.stack([style_reference(palette_image(p, 1000 + k), config, rng) for k, p in enumerate(PALETTES)])[
            :, None
        ]
    )
    requests = [
        Request("a pattern", references[k], SampleParams(steps=20, num_frames=1, image_size=H, seed=seed))
        for seed in range(seeds)
        for k in range(len(PALETTES))
    ]
    video, _ = sample(model, requests)
    colours = ((video.mean((1, 3, 4)) + 1) * 127.5).view(seeds, len(PALETTES), 3)
    palettes = torch.from_numpy(np.mean(PALETTES, 1, dtype=np.float32))
    shares = [
        (colours[:, a] - colours[:, b])
        @ (palettes[a] - palettes[b])
        / (palettes[a] - palettes[b]).square().sum()
        for a, b in itertools.permutations(range(len(PALETTES)), 2)
    ]
    return float(torch.cat(shares).mean())


def test_new_adapters_start_equal_in_every_process():
    # Data-parallel workers average gradients, not weights: they must build the same initial adapter.
    first, second = (load_stylecrafter({"backbone": "tiny"}, "cpu", torch.float32) for _ in range(2))
    a, b = first.adapter_state_dict(), second.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_one_training_transfers_the_palette(ray_cluster, palette_backbone, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for i in range(48):
        path = str(root / f"p{i}.png")
        media.write_image(palette_image(PALETTES[i % 3], i), path)
        rows.append({"id": f"p{i}", "image": path, "prompt": "an oil painting of a pattern"})
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    models = {"backbone": palette_backbone, "image_encoder": "tiny", "adapter": None}
    untrained = load_stylecrafter(models, "cpu", torch.float32)
    loss_before, transfer_before = _mean_loss(untrained), _palette_transfer(untrained)
    spec = TrainSpec(
        "stylecrafter", 1, str(root / "train.parquet"), str(tmp_path / "out"), models,
        {**PARAMS, "steps": STAGE_ONE_STEPS}, workers=2,
    )  # fmt: skip
    summary = run_training(spec)
    trained = load_stylecrafter({**models, "adapter": summary["adapter"]}, "cpu", torch.float32)
    loss_after, transfer_after = _mean_loss(trained), _palette_transfer(trained)
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)  # most of the v loss is the content's
    # How much is carried depends on the CPU's kernels, through the fixture's backbone: 0.84 on one
    # machine, 0.34-0.41 on an AVX-512 one (0.33 after 320 steps); an untrained adapter carries about 0.
    assert transfer_after > max(0.25, transfer_before + 0.2), (transfer_before, transfer_after)

"""Tiny models load through from_pretrained, are identical in every process, and the math is right."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import model_cache
from pipelines.backbone import load_backbone, prepare_backbone
from pipelines.clip import load_clip, prepare_clip

REPO = Path(__file__).resolve().parents[1]


def _weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(directory.rglob("*.safetensors")):
        digest.update(f.relative_to(directory).as_posix().encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def test_tiny_models_are_saved_in_the_standard_layout_and_loaded_from_it():
    path = prepare_backbone("tiny")
    for part in (
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (path / part).exists(), part
    assert (path / "tokenizer" / "tokenizer_config.json").exists()
    backbone = load_backbone("tiny")
    assert load_backbone("tiny") is backbone  # cached per process
    assert type(backbone.unet).__name__ == "UNet3DConditionModel"
    clip_dir = prepare_clip("tiny")
    assert (clip_dir / "preprocessor_config.json").exists()
    assert load_clip("tiny").model.config.projection_dim == 16


def test_tiny_weights_are_identical_when_built_in_another_process(tmp_path):
    code = (
        "from pipelines.backbone import prepare_backbone; from pipelines.clip import prepare_clip; "
        "print(prepare_backbone('tiny')); print(prepare_clip('tiny'))"
    )
    env = {**os.environ, "ANIMA_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    other_backbone, other_clip = (Path(p) for p in out.stdout.split())
    assert str(other_backbone).startswith(str(tmp_path))
    assert _weights_digest(other_backbone) == _weights_digest(prepare_backbone("tiny"))
    assert _weights_digest(other_clip) == _weights_digest(prepare_clip("tiny"))


def test_tokenizer_maps_characters_and_pads_to_max_length():
    backbone = load_backbone("tiny")
    ids = backbone.tokenizer("A cat!").input_ids
    tokens = backbone.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "c", "a", "t</w>", "!</w>", "<|endoftext|>"]
    emb = backbone.encode_prompt(["a cat is playing", ""])
    assert emb.shape == (2, 77, backbone.unet.config.cross_attention_dim)
    assert not torch.allclose(emb[0], emb[1])


def test_encode_decode_and_noise_prediction_shapes():
    backbone = load_backbone("tiny")
    frames = torch.rand(2, 3, 3, 32, 48) * 2 - 1
    latents = backbone.encode_frames(frames)
    assert latents.shape == (2, 4, 3, 4, 6)  # [B, C, F, H/8, W/8]
    assert backbone.vae_scale == 8
    decoded = backbone.decode_latents(latents)
    assert decoded.shape == frames.shape
    assert decoded.abs().max() <= 1
    text = backbone.encode_prompt(["a", "b"])
    eps = backbone.predict_noise(latents, torch.tensor([10, 900]), text)
    assert eps.shape == latents.shape
    # the text condition reaches the prediction
    assert not torch.allclose(eps, backbone.predict_noise(latents, torch.tensor([10, 900]), text.flip(0)))
    # gradients flow from the latents back to the frames (score distillation needs this)
    frames.requires_grad_(True)
    backbone.encode_frames(frames).sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0


def test_v_prediction_output_is_converted_to_epsilon():
    backbone = load_backbone("tiny-v")
    assert backbone.prediction_type == "v_prediction"
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 2, 4, 4)
    text = backbone.encode_prompt(["x"])
    t = torch.tensor([700])
    v = backbone.unet(latents, t, encoder_hidden_states=text).sample
    abar = backbone.alphas_cumprod[700]
    expected = abar.sqrt() * v + (1 - abar).sqrt() * latents
    torch.testing.assert_close(backbone.predict_noise(latents, t, text), expected)
    # and x0 recovered from that epsilon matches the v-parameterisation's x0 = sqrt(abar) x_t - sqrt(1-abar) v
    x0_from_eps = (latents - (1 - abar).sqrt() * expected) / abar.sqrt()
    torch.testing.assert_close(
        x0_from_eps, abar.sqrt() * latents - (1 - abar).sqrt() * v, atol=1e-4, rtol=1e-4
    )


def test_add_noise_matches_the_scheduler():
    backbone = load_backbone("tiny")
    x0, noise, t = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4), torch.tensor([5, 950])
    torch.testing.assert_close(backbone.add_noise(x0, noise, t), backbone.scheduler.add_noise(x0, noise, t))


def test_unloadable_references_raise_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(model_cache.ModelLoadError, match="does not exist"):
        prepare_backbone(str(tmp_path / "missing" / "dir"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(model_cache.ModelLoadError, match="HF_HUB_OFFLINE"):
        prepare_backbone("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(model_cache.ModelLoadError, match="cannot load backbone"):
        load_backbone(str(tmp_path / "empty"))

"""DreamMotion: V-DDS against an oracle prior, space-time self-similarity, and the optimization."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn

from actors.base import RowError
from actors.dreammotion import mask_frames
from pipelines import media
from pipelines.backbone import Backbone, load_backbone
from pipelines.distill import dds_gradient, sample_noise, sample_timesteps
from pipelines.dreammotion.edit import EditParams, edit_video, latent_mask
from pipelines.dreammotion.ssm import KeyRecorder, s_ssm, spatial_key_layers, t_ssm

SOURCE, TARGET = "a red ball", "a blue ball"


class PoolVAE(nn.Module):
    """A lossless "VAE" for block-constant videos: 4× average pooling and nearest upsampling."""

    config = SimpleNamespace(scaling_factor=1.0, block_out_channels=(1, 1, 1))

    def encode(self, x):
        mean = F.avg_pool2d(x, 4)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.zeros_like(mean)))

    def decode(self, z):
        return SimpleNamespace(sample=F.interpolate(z, scale_factor=4, mode="nearest"))


class OracleUNet(nn.Module):
    """The exact noise (or v) for the source latents under the source prompt, for the target otherwise."""

    def __init__(self, source, target, alphas_cumprod, prediction_type):
        super().__init__()
        self.source, self.target, self.abar, self.kind = source, target, alphas_cumprod, prediction_type

    def forward(self, x_t, t, encoder_hidden_states):
        is_source = encoder_hidden_states[:, 0, 0] == 0
        clean = torch.where(is_source.view(-1, 1, 1, 1, 1), self.source, self.target)
        abar = self.abar[t].view(-1, 1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * clean) / (1 - abar).sqrt()
        out = eps if self.kind == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * clean
        return SimpleNamespace(sample=out)


class OracleBackbone(Backbone):
    def encode_prompt(self, prompts):
        return torch.tensor([[[0.0 if p == SOURCE else 1.0]] for p in prompts])


def oracle(source_video, target_video, prediction_type="epsilon"):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.register_to_config(prediction_type=prediction_type)
    vae = PoolVAE()
    encode = lambda v: F.avg_pool2d(v, 4).permute(1, 0, 2, 3)[None]  # noqa: E731
    unet = OracleUNet(encode(source_video), encode(target_video), scheduler.alphas_cumprod, prediction_type)
    return OracleBackbone("oracle", unet, vae, None, None, scheduler, torch.device("cpu"), torch.float32)


def block_video(frames=3, h=16, w=24, seed=0):
    """Random frames that are constant on 4×4 blocks, so the pooling VAE reconstructs them exactly."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(frames, 3, h // 4, w // 4, generator=g) * 1.6 - 0.8
    return F.interpolate(blocks, scale_factor=4, mode="nearest")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vdds_moves_the_masked_region_to_the_target_and_leaves_the_rest(prediction_type):
    source = block_video(seed=0)
    target = block_video(seed=1)  # differs everywhere; only the masked half may follow it
    mask = torch.zeros(3, 16, 24, dtype=torch.bool)
    mask[:, :, :12] = True
    params = EditParams(steps=60, guidance=1.0, lambda_s=0.0, lambda_t=0.0, lr=0.05, loss_scale=24.0, seed=3)
    result = edit_video(oracle(source, target, prediction_type), source, SOURCE, TARGET, params, mask)
    inside, outside = mask[:, None].expand_as(source), ~mask[:, None].expand_as(source)
    before = (source - target)[inside].abs().mean()
    after = (result.frames - target)[inside].abs().mean()
    assert after < 0.2 * before, (before, after)
    assert (result.frames - source)[outside].abs().max() < 1e-5


def test_vdds_is_the_same_for_epsilon_and_v_prediction_backbones():
    source, target = block_video(seed=0), block_video(seed=1)
    params = EditParams(steps=5, guidance=3.0, lambda_s=0.0, lambda_t=0.0, lr=0.05, seed=4)
    eps = edit_video(oracle(source, target, "epsilon"), source, SOURCE, TARGET, params)
    v = edit_video(oracle(source, target, "v_prediction"), source, SOURCE, TARGET, params)
    torch.testing.assert_close(eps.latents, v.latents, atol=1e-4, rtol=1e-4)


def test_latent_mask_marks_every_cell_that_touches_the_mask():
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, 5, 9] = True
    cells = latent_mask(mask, (4, 4))
    assert cells.shape == (1, 1, 2, 4, 4)
    assert cells.sum() == 1 and cells[0, 0, 0, 1, 2] == 1


# -- self-similarity ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def _keys(backbone, layers, latents, stop=False):
    recorder = KeyRecorder(backbone.unet, layers)
    calls = []
    hook = backbone.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), recorder.recording(stop_after_last=stop) as keys:
            backbone.predict_noise(latents, torch.tensor([500]), backbone.encode_prompt(["x"]))
        return dict(keys), bool(calls)
    finally:
        recorder.remove()
        hook.remove()


def test_hooked_keys_have_the_configured_layers_shapes(tiny):
    layers = spatial_key_layers(tiny.unet)
    assert layers == [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn1.to_k" for i in (0, 1)]
    latents = torch.randn(1, 4, 3, 8, 12)
    keys, ran_to_the_end = _keys(tiny, layers, latents)
    assert ran_to_the_end
    for name in layers:
        assert keys[name].shape == (3, 8 * 12, 32)  # (frames, h·w tokens, channels of the block)
    down = spatial_key_layers(tiny.unet, "down_blocks.0")
    assert down == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"]
    keys, ran_to_the_end = _keys(tiny, down, latents, stop=True)
    assert keys[down[0]].shape == (3, 96, 32)
    assert not ran_to_the_end  # the UNet stopped after the last hooked layer
    with pytest.raises(ValueError, match="no spatial self-attention"):
        spatial_key_layers(tiny.unet, "mid_block.nothing")


def test_ssm_terms_are_zero_for_the_source_and_grow_with_shuffles(tiny):
    layers = spatial_key_layers(tiny.unet)
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    keys = _keys(tiny, layers, latents)[0][layers[0]]
    assert s_ssm(keys, keys) == 0 and t_ssm(keys, keys) == 0
    spatial = keys[:, torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    assert s_ssm(spatial, keys) > 1.0
    assert t_ssm(spatial, keys) < 1e-8  # the spatial marginal mean ignores token order
    frames = keys[[1, 0, 3, 2]]
    assert t_ssm(frames, keys) > 1e-3


def test_without_ssm_the_edit_is_plain_masked_vdds(tiny):
    source = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    params = EditParams(steps=3, lambda_s=0.0, lambda_t=0.0, seed=7)
    result = edit_video(tiny, source, SOURCE, TARGET, params, mask)

    # The same optimization written out: SGD on x with the masked, scaled DDS gradient.
    g = torch.Generator().manual_seed(7)
    x_source = tiny.encode_frames(source[None])
    x = x_source.clone()
    m = latent_mask(mask, x.shape[-2:])
    target_e, source_e, uncond = tiny.encode_prompt([TARGET, SOURCE, ""]).split(1)
    for _ in range(3):
        t = sample_timesteps([g], [(50, 949)], x.device)
        noise = sample_noise([g], tuple(x.shape[1:]), x.device)
        delta = dds_gradient(tiny, x, x_source, target_e, source_e, uncond, torch.tensor([7.5]), t, noise)
        x = x - 0.4 * 2000 / (4 * 4) * m * delta
    # fp32 agreement at the latents' scale (~100 after three steps at lr·2000/16 = 50): the two
    # orders of the same sums differ by ~6e-6 of it on some CPUs, a wrong step by far more.
    torch.testing.assert_close(result.latents, x, atol=3e-5 * float(x.abs().max()), rtol=1e-4)
    # Outside the mask the latents did not move at all.
    torch.testing.assert_close(result.latents * (1 - m), x_source * (1 - m))


def test_ssm_terms_start_at_zero_and_change_the_edit(tiny):
    source = torch.rand(2, 3, 32, 32) * 2 - 1
    first = edit_video(tiny, source, SOURCE, TARGET, EditParams(steps=1, lr=0.01, seed=1))
    assert first.losses["s_ssm"] < 1e-6 and first.losses["t_ssm"] < 1e-6  # x = x̂ at the first step
    plain = edit_video(
        tiny, source, SOURCE, TARGET, EditParams(steps=3, lr=0.01, lambda_s=0, lambda_t=0, seed=1)
    )
    ssm = edit_video(
        tiny, source, SOURCE, TARGET, EditParams(steps=3, lr=0.01, lambda_s=100, lambda_t=100, seed=1)
    )
    assert ssm.losses["s_ssm"] > 0
    assert not torch.allclose(plain.latents, ssm.latents)


# -- frame selection ----------------------------------------------------------------------------


def test_frames_are_consecutive_from_start_at_the_stride_and_masks_follow(tmp_path):
    assert EditParams(num_frames=4).frame_indices(100).tolist() == [0, 1, 2, 3]  # not spread over 100
    picked = EditParams(num_frames=4, start_frame=5, frame_stride=3).frame_indices(20)
    assert picked.tolist() == [5, 8, 11, 14]
    with pytest.raises(ValueError, match="needs 16"):
        EditParams(num_frames=4, start_frame=6, frame_stride=3).frame_indices(14)
    with pytest.raises(ValueError, match="frame_stride"):
        EditParams.from_dict({"frame_stride": 0})

    # Frame i of the clip and of its mask is marked by its brightness / by i masked pixels.
    video = (
        np.repeat(np.arange(20, dtype=np.uint8)[:, None, None, None] * 12, 16, 1).repeat(16, 2).repeat(3, 3)
    )
    uri = media.write_video(video, str(tmp_path / "clip.mp4"), fps=8)
    frames = media.read_video(uri, indices=picked)
    assert np.abs(frames.mean((1, 2, 3)) - video[picked].mean((1, 2, 3))).max() < 4
    mask = np.zeros((20, 16, 16), bool)
    for i in range(20):
        mask[i].flat[:i] = True
    folder = str(tmp_path / "mask")
    media.write_png_frames(mask, folder)
    chosen = media.read_mask(folder, select=lambda n: mask_frames(n, folder, 20, picked))
    assert chosen.sum((1, 2)).tolist() == picked.tolist()
    media.write_png_frames(mask[:3], str(tmp_path / "three"))
    with pytest.raises(RowError, match="has 3 frames"):
        media.read_mask(str(tmp_path / "three"), select=lambda n: mask_frames(n, "m", 20, picked))
    single = media.read_mask(str(tmp_path / "three" / "frame_0002.png"), select=lambda n: [0] * len(picked))
    assert single.shape == (len(picked), 16, 16) and (single.sum((1, 2)) == 2).all()

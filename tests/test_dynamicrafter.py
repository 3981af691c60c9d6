"""DynamiCrafter: identity at initialization, the dual cross-attention, conditions, and the sampler."""

from __future__ import annotations

import pytest
import torch

from pipelines.adapters import load_image_encoder
from pipelines.attention import spatial_cross_attention_names
from pipelines.backbone import load_backbone, load_backbone_uncached
from pipelines.dynamicrafter.model import ContextConfig, DynamiCrafter, read_adapter
from pipelines.dynamicrafter.sample import Request, SampleParams, sample


def build(ref: str = "tiny") -> DynamiCrafter:
    backbone = load_backbone_uncached(ref)
    encoder = load_image_encoder("tiny", "cpu", torch.float32)
    return DynamiCrafter(
        backbone, encoder, ContextConfig.small("tiny", backbone.unet.config.cross_attention_dim)
    )


@pytest.fixture(scope="module")
def model():
    return build()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def inputs(model, frames=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, 8, 8, generator=g)
    img = images(2)
    return (
        x,
        torch.tensor([20, 700]),
        load_backbone("tiny").encode_prompt(["a cat", "a dog"]),
        model.image_context(img, frames),
        model.condition_latents(img[:, None], frames, [[0], [1]]),
        torch.tensor([3.0, 5.0]),
    )


@pytest.mark.parametrize("ref", ["tiny", "tiny-v"])
def test_untrained_dynamicrafter_is_exactly_the_base_backbone(ref):
    model = build(ref)
    x, t, text, context, condition, stride = inputs(model)
    base = load_backbone(ref).predict(x, t, text)
    assert torch.equal(model.predict(x, t, text, context, condition, stride), base)
    assert model.backbone.unet.conv_in.in_channels == 8


def test_every_new_part_is_live_once_it_moves(model):
    x, t, text, context, condition, stride = inputs(model)
    before = model.predict(x, t, text, context, condition, stride)
    state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    try:
        for name, change in [
            ("gate", lambda: [p.alpha.data.fill_(0.5) for p in model.processors.values()]),
            ("conv_in", lambda: model.backbone.unet.conv_in.weight.data[:, 4:].normal_()),
            ("stride", lambda: model.fs_embedding.stride_embedding.linear_2.weight.data.normal_()),
        ]:
            change()
            after = model.predict(x, t, text, context, condition, stride)
            assert not torch.allclose(after, before), name
            model.load_adapter_state(state)
            torch.testing.assert_close(model.predict(x, t, text, context, condition, stride), before)
        # A moved stride embedding makes the output depend on the frame stride.
        model.fs_embedding.stride_embedding.linear_2.weight.data.normal_()
        other = model.predict(x, t, text, context, condition, stride + 2)
        assert not torch.allclose(other, model.predict(x, t, text, context, condition, stride))
    finally:
        model.load_adapter_state(state)


def test_image_attention_sits_in_the_spatial_cross_attention_only(model):
    names = spatial_cross_attention_names(model.backbone.unet)
    assert len(names) == len(model.processors) == 4
    assert all(".attentions." in n and "temp_attentions" not in n and n.endswith("attn2") for n in names)
    modules = dict(model.backbone.unet.named_modules())
    temporal = [n for n in modules if "temp_attentions" in n and n.endswith("attn2")]
    assert temporal and all(not hasattr(modules[n].processor, "alpha") for n in temporal)


def test_each_frame_attends_to_its_own_context_tokens(model):
    processor = next(iter(model.processors.values()))
    extra = (
        torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 12, 2).expand(6, -1, -1)
    )  # 3 frames × 4 tokens
    picked = processor._extra_tokens(extra, rows=6)  # rows b·F + f for 2 samples × 3 frames
    assert picked.shape == (6, 4, 2)
    for row in range(6):
        torch.testing.assert_close(picked[row], extra[row, 4 * (row % 3) : 4 * (row % 3 + 1)])


def test_tokens_for_another_clip_length_reach_every_frame_as_in_the_official_unet(model):
    processor = next(iter(model.processors.values()))
    extra = torch.randn(6, 4 * 4, 2)  # 4 frames' tokens, 4 per frame
    try:
        processor.frames = 3  # a 3-frame clip: the official UNet gives every frame the whole context
        assert torch.equal(processor._extra_tokens(extra, rows=6), extra)
        processor.frames = 4
        torch.testing.assert_close(processor._extra_tokens(extra[:4], rows=4)[1], extra[1, 4:8])
    finally:
        processor.frames = None


def test_context_network_serves_any_clip_length(model):
    for frames in (2, 4, 7):
        assert model.image_context(images(1), frames).shape == (1, frames * 4, 32)


def test_adapter_round_trips_through_files(model, tmp_path):
    x, t, text, _, condition, stride = inputs(model)
    state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    try:
        for p in model.processors.values():
            p.alpha.data.fill_(0.3)
        model.backbone.unet.conv_in.weight.data[:, 4:].normal_()
        expected = model.predict(x, t, text, model.image_context(images(2), 3), condition, stride)
        model.save_adapter(str(tmp_path / "adapter"))
    finally:
        model.load_adapter_state(state)
    other = build()
    config, weights = read_adapter(str(tmp_path / "adapter"))
    assert config == other.config
    other.load_adapter_state(weights)
    got = other.predict(x, t, text, other.image_context(images(2), 3), condition, stride)
    torch.testing.assert_close(got, expected)


# -- sampler ------------------------------------------------------------------------------------

PARAMS = SampleParams(steps=3, num_frames=4, height=64, width=64, seed=5)


def test_sampler_is_deterministic_per_video_and_batch_invariant(model):
    img = images(2)
    a, _ = sample(
        model,
        [
            Request(img[0], "a cat", PARAMS),
            Request(img[1], "a dog", SampleParams(**{**PARAMS.__dict__, "seed": 6})),
        ],
    )
    b, _ = sample(model, [Request(img[0], "a cat", PARAMS)])
    c, _ = sample(model, [Request(img[0], "a cat", SampleParams(**{**PARAMS.__dict__, "seed": 7}))])
    assert a.shape == (2, 4, 3, 64, 64)
    torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=0)
    assert not torch.allclose(b[0], c[0], atol=1e-3)


@pytest.mark.parametrize("guidance", ["single", "multi"])
def test_guidance_branches_in_one_call_equal_separate_calls(model, guidance):
    img = images(2)
    params = SampleParams(**{**PARAMS.__dict__, "guidance": guidance})
    requests = [Request(img[0], "a cat", params), Request(img[1], "a dog", params)]
    batched, _ = sample(model, requests)
    separate, _ = sample(model, requests, batched_cfg=False)
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=0)


def _conv_in_inputs(model, requests):
    seen = []
    hook = model.backbone.unet.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0][:, 4:]))
    try:
        sample(model, requests)
    finally:
        hook.remove()
    return seen[0]  # [(3·B)·F, C, h, w]: the condition channels at the first step


@pytest.mark.parametrize(
    ("mode", "index", "expected"), [("loop", 0, {0, 3}), ("interpolate", 0, {0, 3}), ("animate", 2, {2})]
)
def test_modes_place_the_condition_images_at_their_frames(model, mode, index, expected):
    start, end = images(2)
    params = SampleParams(**{**PARAMS.__dict__, "mode": mode, "frame_index": index})
    cond = _conv_in_inputs(model, [Request(start, "x", params, end_image=end)])[:4]  # first branch, 4 frames
    # Posterior samples, as the official code draws them: each placed image its own noise, from the seed.
    placed = {"loop": [start, start], "interpolate": [start, end], "animate": [start]}[mode]
    generator = torch.Generator().manual_seed(params.seed)
    latents = model.backbone.encode_frames(torch.stack(placed)[None], sample=True, generators=[generator])
    latents = latents[0].permute(1, 0, 2, 3)
    for f in range(4):
        if f not in expected:
            assert cond[f].abs().max() == 0, f
    torch.testing.assert_close(cond[min(expected)], latents[0])
    if mode != "animate":
        torch.testing.assert_close(cond[3], latents[1])
    if mode == "loop":
        assert not torch.allclose(cond[0], cond[3])  # the same image, two posterior draws


def test_bad_sampling_parameters_are_refused():
    for bad in (
        {"mode": "zoom"},
        {"height": 60},
        {"frame_index": 16},
        {"steps": 2.5},
        {"repeat_condition": 1},
    ):
        with pytest.raises(ValueError):
            SampleParams.from_dict(bad)
    with pytest.raises(ValueError, match="end image"):
        sample(
            build(), [Request(images(1)[0], "x", SampleParams(**{**PARAMS.__dict__, "mode": "interpolate"}))]
        )

"""StyleCrafter: identity without style, layer mapping of the scale factors, guidance, sampling."""

from __future__ import annotations

import pytest
import torch

from pipelines.adapters import load_image_encoder
from pipelines.backbone import load_backbone, load_backbone_uncached
from pipelines.ddim import ddim_sample
from pipelines.stylecrafter.model import StyleConfig, StyleCrafter, paper_order, read_adapter
from pipelines.stylecrafter.sample import Request, SampleParams, sample


def build() -> StyleCrafter:
    encoder = load_image_encoder("tiny", "cpu", torch.float32)
    return StyleCrafter(load_backbone_uncached("tiny"), encoder, StyleConfig.small("tiny"))


@pytest.fixture(scope="module")
def model():
    return build()


def refs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_without_style_the_model_is_the_base_backbone(model):
    x, t = torch.randn(2, 4, 3, 8, 8), torch.tensor([30, 800])
    text = load_backbone("tiny").encode_prompt(["a", "b"])
    base = load_backbone("tiny").predict(x, t, text)
    assert torch.equal(model.predict(x, t, text), base)
    style, scales = model.style([refs(1), refs(2, 1)], text)
    assert torch.equal(model.predict(x, t, text, style, torch.zeros_like(scales)), base)
    assert not torch.allclose(model.predict(x, t, text, style, scales), base)


def test_style_keys_and_values_start_from_the_text_ones(model):
    modules = dict(model.backbone.unet.named_modules())
    for name in model.layers:
        processor = model.processors[name.replace(".", "__")]
        assert torch.equal(processor.to_k_extra.weight, modules[name].to_k.weight)
        assert torch.equal(processor.to_v_extra.weight, modules[name].to_v.weight)


def test_scale_factors_map_to_layers_by_name_in_the_papers_order(model):
    # ModelScope/VideoCrafter names, in diffusers' registration order (down, up, mid).
    down = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
    up = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in (1, 2, 3) for a in range(3)]
    mid = ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    ordered = paper_order(down + up + mid)
    assert len(ordered) == 16 and ordered[:6] == down and ordered[6] == mid[0] and ordered[7:] == up
    assert ordered[7] == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    # On the model, factor i reaches exactly layer i of that order.
    assert model.layers == paper_order(model.layers) and model.layers[1].startswith("mid_block")
    scales = torch.arange(len(model.layers), dtype=torch.float32)[None].repeat(2, 1)
    model.set_scales(scales)
    for i, name in enumerate(model.layers):
        assert torch.equal(model.processors[name.replace(".", "__")].scale, torch.full((2,), float(i)))
    model.set_scales(None)
    assert all(p.scale is None for p in model.processors.values())


def test_scales_lie_in_zero_two_and_several_references_pool_into_the_same_tokens(model):
    text = load_backbone("tiny").encode_prompt(["a", "b"])
    assert model.image_tokens(refs(3)).shape[1] == 3 * model.image_tokens(refs(1)).shape[1]
    style, scales = model.style([refs(1), refs(3, 1)], text)
    assert style.shape == (2, 4, 32) and scales.shape == (2, len(model.layers))
    assert ((scales > 0) & (scales < 2)).all()


PARAMS = SampleParams(steps=3, num_frames=3, height=32, width=32, seed=4)


def test_guidance_is_the_official_formula_and_its_empty_branch_has_no_style(model):
    params = SampleParams(**{**PARAMS.__dict__, "cfg_style": 2.0, "cfg_text": 5.0})
    references = refs(1)
    got, _ = sample(model, [Request("a house", references, params)])
    bb = model.backbone
    text, empty = bb.encode_prompt(["a house", ""]).split(1)
    style, scales = model.style([references], text)

    def official(x, t):
        styled = model.predict(x, t, text, style, scales)
        text_only = model.predict(x, t, text)
        uncond = model.predict(x, t, empty)  # no style tokens at all
        return styled + 2.0 * (styled - text_only) + 5.0 * (text_only - uncond)

    x, _ = ddim_sample(bb, (4, 3, 4, 4), [torch.Generator().manual_seed(4)], 3, 1.0, official)
    torch.testing.assert_close(got, bb.decode_latents(x), atol=1e-4, rtol=0)


def test_sampler_batches_guidance_and_videos_and_has_an_image_mode(model):
    requests = [Request("a house", refs(1), PARAMS), Request("a boat", refs(2, 1), PARAMS)]
    batched, _ = sample(model, requests)
    separate, _ = sample(model, requests, batched_cfg=False)
    alone, _ = sample(model, requests[1:])
    assert batched.shape == (2, 3, 3, 32, 32)
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-4, rtol=0)
    image_params = SampleParams(**{**PARAMS.__dict__, "num_frames": 1, "image_size": 40})
    image, _ = sample(model, [Request("a house", refs(1), image_params)])
    assert image.shape == (1, 1, 3, 40, 40)


def test_image_mode_skips_every_temporal_layer(model):
    unet = model.backbone.unet
    temporal = [m for n, m in unet.named_modules() if n.endswith(("temp_attentions.0", "temp_convs.0"))]
    temporal.append(unet.transformer_in)
    fired = []
    hooks = [m.register_forward_hook(lambda *_: fired.append(1)) for m in temporal]
    try:
        image_params = SampleParams(**{**PARAMS.__dict__, "num_frames": 1, "image_size": 32})
        sample(model, [Request("a house", refs(1), image_params)])
        assert fired == []  # not one temporal layer ran
        sample(model, [Request("a house", refs(1), PARAMS)])
        assert fired  # and video sampling runs them again
    finally:
        for h in hooks:
            h.remove()


def test_adapter_round_trips_through_files(model, tmp_path):
    with torch.no_grad():
        model.scales.head[2].bias.fill_(0.4)
    model.save_adapter(str(tmp_path / "adapter"))
    other = build()
    config, weights = read_adapter(str(tmp_path / "adapter"))
    other.load_adapter_state(weights)
    text = load_backbone("tiny").encode_prompt(["a"])
    torch.testing.assert_close(other.style([refs(1)], text)[1], model.style([refs(1)], text)[1])
    assert config == model.config

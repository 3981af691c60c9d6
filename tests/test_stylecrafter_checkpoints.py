"""The released StyleCrafter on VideoCrafter1: relative-position temporal attention, check-oracle on the
official code's outputs, full-size manifests, an official-layout conversion that generates, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from jobs import resume
from jobs.cli import main
from pipelines import media, tiny
from pipelines.backbone import load_backbone, prepare_backbone
from pipelines.checkpoints import lvdm
from pipelines.checkpoints import stylecrafter as sc
from pipelines.checkpoints.keymap import ConversionError, meta_tensors, prefixed, remap
from pipelines.checkpoints.oracle import check_oracle
from pipelines.temporal import RelativePositionProcessor
from tests.official_layout import FIXTURES, small_stylecrafter_files, small_vc1_config, small_videocrafter1


def test_relative_position_attention_equals_a_hand_written_reference():
    torch.manual_seed(0)
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, heads=2, dim_head=8, out_bias=True).eval()
    processor = RelativePositionProcessor(head_dim=8, max_distance=3)
    x = torch.randn(5, 6, 16)  # (batch·pixels, frames, channels)
    got = processor(attn, x)

    q, k, v = (p(x).view(5, 6, 2, 8).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    out = torch.zeros(5, 2, 6, 8)
    for i in range(6):
        r = [min(max(j - i, -3), 3) + 3 for j in range(6)]
        rel_k, rel_v = processor.relative_k[r], processor.relative_v[r]  # [6 keys, 8]
        qi = q[:, :, i : i + 1]  # [5, 2, 1, 8]
        logits = (qi @ k.transpose(-1, -2) + (qi * rel_k[None, None]).sum(-1)[:, :, None]) / 8**0.5
        p = logits.softmax(-1)  # [5, 2, 1, 6]
        out[:, :, i] = (p @ v)[:, :, 0] + (p[:, :, 0, :, None] * rel_v).sum(-2)
    expected = attn.to_out[0](out.transpose(1, 2).reshape(5, 6, 16))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_modelscope_backbones_compute_what_they_did_before_videocrafter1():
    reference = load_file(str(FIXTURES.parent / "tiny_unet_reference.safetensors"))
    bb = load_backbone("tiny")
    with torch.no_grad():
        out = bb.predict(
            reference["input.x"], reference["input.t"], bb.encode_prompt(["a red fox", "a boat at sea"])
        )
    # Outputs of size ~0.3: 1e-5 is fp32 agreement across CPUs (this AMD EPYC host differs from the
    # reference's by 1.3e-6 in 8 of 1536 values, with the same packages); any change of the model is larger.
    torch.testing.assert_close(out, reference["output"], atol=1e-5, rtol=0)
    # ... and keep diffusers' own processors and temporal convolutions.
    processors = {type(p).__name__ for p in bb.unet.attn_processors.values()}
    assert "RelativePositionProcessor" not in processors
    assert all(type(c).__name__ == "TemporalConvLayer" for c in bb.unet.down_blocks[0].temp_convs)


# -- check-oracle ---------------------------------------------------------------------------------


def test_check_oracle_matches_both_official_code_paths(tmp_path, capsys):
    spec = json.loads((FIXTURES / "vc1_small_unet.json").read_text())
    results = check_oracle(str(FIXTURES / "vc1_small_unet.safetensors"))  # the xformers twin lies beside it
    assert {r.name for r in results} == set(spec["outputs"]) and all(r.ok for r in results), results
    assert main(["convert", "check-oracle", str(FIXTURES / "vc1_small_unet.safetensors")]) == 0
    assert capsys.readouterr().out.strip().startswith("max_abs_diff=")
    # The outputs-only twin checks through the oracle it belongs to.
    assert main(["convert", "check-oracle", str(FIXTURES / "vc1_small_unet_xformers_path.safetensors")]) == 0
    for name in ("vc1_small_unet.safetensors", "vc1_small_unet.json"):  # alone: the official CPU path
        shutil.copy(FIXTURES / name, tmp_path / name)
    assert all(r.ok for r in check_oracle(str(tmp_path / "vc1_small_unet.safetensors")))


# -- full-size manifests --------------------------------------------------------------------------


def test_full_size_videocrafter1_adapter_and_temporal_keys_map_once():
    base = json.loads((FIXTURES / "videocrafter1_unet.json").read_text())
    unet = lvdm.build_unet(sc.RELEASED_UNET, "meta")
    rules = prefixed(lvdm.unet_rules(sc.RELEASED_UNET, target="unet."), source=sc.UNET_PREFIX)
    expected = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    converted = remap(meta_tensors({e["key"]: e["shape"] for e in base}), rules, expected)
    assert len(converted) == len(base) == len(expected) == 1196
    assert sum("relative_" in k for k in converted) == 17 * 2 * 2
    assert not any("temp_convs" in k for k in expected)

    adapter = json.loads((FIXTURES / "stylecrafter_adapter.json").read_text())
    temporal = json.loads((FIXTURES / "stylecrafter_temporal.json").read_text())
    style = sc.style_config_of(sc.RELEASED_ADAPTER, "laion")
    parts = sc.build_adapter_parts(sc.RELEASED_UNET, style, 1280, "meta")
    converted = sc.convert_adapter(
        meta_tensors({e["key"]: e["shape"] for e in adapter}),
        meta_tensors({e["key"]: e["shape"] for e in temporal}),
        parts,
        style,
    )
    assert len(converted) == len(adapter) + len(temporal) == 139 + 510
    assert len(parts.modules.processors) == 16 and parts.modules.scales.queries.shape[1] == 16
    # layer_idx i of the official processors is the scale factor of anima's layer i.
    order = {e["layer_idx"]: e["unet_attn_module"] for e in adapter if "layer_idx" in e}
    names = lvdm.spatial_cross_attentions(sc.RELEASED_UNET)
    assert [names[order[i]] for i in range(16)] == parts.modules.layers


# -- an official-layout VideoCrafter1 and adapter, converted and run -------------------------------


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("stylecrafter")
    vocab = len(CLIPTokenizer.from_pretrained(prepare_backbone("tiny") / "tokenizer"))
    torch.save({"state_dict": small_videocrafter1(vocab), "global_step": 3}, root / "model.ckpt")
    adapter, temporal = small_stylecrafter_files()
    torch.save(adapter, root / "adapter_v1.pth")
    torch.save(temporal, root / "temporal_v1_1.pth")
    (root / "config.yaml").write_text(yaml.safe_dump(small_vc1_config()))
    tiny.build_clip(root / "clip-80", width=80)  # the small adapter's 80-wide image tower
    return root


def _convert(root: Path, out: Path) -> tuple[int, int]:
    config = ["--config", str(root / "config.yaml")]
    base = ["convert", "videocrafter1", "--checkpoint", str(root / "model.ckpt"), "--output", str(out)]
    style = ["convert", "stylecrafter", "--adapter", str(root / "adapter_v1.pth")]
    style += ["--temporal", str(root / "temporal_v1_1.pth"), "--output", str(out)]
    return (
        main([*base, *config, "--tokenizer", "tiny"]),
        main([*style, *config, "--image-encoder", str(root / "clip-80")]),
    )


def test_converted_stylecrafter_generates_videos_and_images(ray_cluster, official_files, tmp_path, data_dir):
    out = tmp_path / "converted"
    assert _convert(official_files, out) == (0, 0)
    unet_config = json.loads((out / "backbone" / "unet" / "config.json").read_text())
    assert unet_config["_anima_temporal"] == {"temporal_conv": False, "relative_position": 16}
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    assert adapter["variant"] == "official" and adapter["sample_defaults"]["cfg_text"] == 15.0

    styles = data_dir / "styles" if (data_dir / "styles").exists() else data_dir
    ink = str(sorted(styles.glob("*.jp*g"))[0])
    table = pa.table(
        {
            "id": ["video", "image", "two_refs"],
            "prompt": ["a bird on a branch"] * 3,
            "style": [[ink], [ink], [ink, ink]],
            "num_frames": [4, 1, 4],
        }
    )
    pq.write_table(table, tmp_path / "styles.parquet")
    job = tmp_path / "job"
    args = ["generate", "stylecrafter", "--manifest", str(tmp_path / "styles.parquet"), "--output", str(job)]
    args += ["--backbone", str(out / "backbone"), "--adapter", str(out / "adapter"), "--clip", "tiny"]
    for s in ("steps=2", "height=32", "width=32", "image_size=32", "style_size=64"):
        args += ["--set", s]
    assert main(args) == 0
    rows = {r["id"]: r for r in resume.latest(resume.read_results(str(job / "results"))).to_pylist()}
    for row_id, row in rows.items():
        assert row["status"] == "ok", row["error"]
        outputs = dict(row["outputs"])
        if row_id == "image":
            assert media.read_image(outputs["image"]).shape == (32, 32, 3)
        else:
            assert media.video_info(outputs["mp4"]).num_frames == 4
        params = json.loads(row["params"])
        assert params["cfg_text"] == 15.0 and params["cfg_style"] == 7.5 and params["fps"] == 10


def test_adapter_files_for_another_base_or_truncated_are_refused(official_files, tmp_path, capsys):
    root = official_files
    style = [
        "convert",
        "stylecrafter",
        "--temporal",
        str(root / "temporal_v1_1.pth"),
        "--output",
        str(tmp_path),
    ]
    # The small adapter against the released (full-size) base: every mis-shaped key is named.
    assert main([*style, "--adapter", str(root / "adapter_v1.pth"), "--image-encoder", "x"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "shape mismatch" in err and "image_context_model.style_emb" in err
    truncated = tmp_path / "adapter_v1.pth"
    truncated.write_bytes((root / "adapter_v1.pth").read_bytes()[:1000])
    assert main([*style, "--adapter", str(truncated), "--config", str(root / "config.yaml")]) == 2
    assert "corrupt or truncated" in " ".join(capsys.readouterr().err.split())
    # A DynamiCrafter file is not a VideoCrafter1 one, nor the temporal file an adapter.
    assert (
        main([*style, "--adapter", str(root / "temporal_v1_1.pth"), "--config", str(root / "config.yaml")])
        == 2
    )
    assert "entries that are not tensors" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(ConversionError, match="temporal transformer path"):
        sc.flatten_temporal({"a": torch.ones(1)})
    assert not (tmp_path / "adapter").exists()


def test_videocrafter1_temporal_layers_load_back_strictly(official_files, tmp_path):
    out = tmp_path / "converted"
    assert _convert(official_files, out)[0] == 0
    bb = load_backbone(str(out / "backbone"))
    processors = [type(p).__name__ for n, p in bb.unet.attn_processors.items() if "temp_attentions" in n]
    assert processors and set(processors) == {"RelativePositionProcessor"}
    assert all(type(c).__name__ == "NoTemporalConv" for c in bb.unet.down_blocks[0].temp_convs)
    fresh = lvdm.build_unet(small_vc1_config()["model"]["params"]["unet_config"]["params"])
    assert set(bb.unet.state_dict()) == set(fresh.state_dict())


def test_both_training_stages_run_on_a_converted_videocrafter1(ray_cluster, official_files, tmp_path):
    """Stage 1 (the style adapter) takes a step on the converted model in this process; stage 2 (the
    temporal layers, videos and images mixed) runs on Ray from the released adapter, as a user would
    fine-tune it, is killed and resumes."""
    from actors.train_worker import recipe_of
    from jobs.train import TrainSpec, run_training
    from pipelines import training
    from pipelines.stylecrafter.model import load_stylecrafter
    from tests.test_stylecrafter_train import PALETTES, palette_image

    out = tmp_path / "converted"
    assert _convert(official_files, out) == (0, 0)
    models = {"backbone": str(out / "backbone"), "adapter": str(out / "adapter")}
    params = {"height": 32, "width": 32, "batch_size": 2, "lr": 1e-2, "num_frames": 4}

    recipe = recipe_of("stylecrafter")
    config = recipe.config({**params, "stage": 1})
    model = recipe.load(models, "cpu", torch.float32)
    training.contiguous_group_norm_inputs(model.backbone.unet)
    trainable = recipe.trainable(model, config)
    images = np.stack([palette_image(PALETTES[i], i) for i in range(2)])
    batch = {"frames": images[:, None], "style": images, "prompt": ["an oil painting of a pattern"] * 2,
             "frame_stride": np.array([1, 1]), "fps": np.array([0.0, 0.0]), "source": "images"}  # fmt: skip
    loss = recipe.loss(model, batch, config, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert {n.split(".")[0] for n in trainable} == {"qformer", "scales", "processors"}
    moved = [n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(moved) > 0.5 * len(trainable)  # the adapter's layers learn (some see no gradient at step 0)
    assert all(p.grad is None for n, p in model.backbone.unet.named_parameters() if "processor" not in n)

    rows = []
    for i in range(4):
        image = str(tmp_path / f"p{i}.png")
        media.write_image(palette_image(PALETTES[i % 3], i), image)
        video = str(tmp_path / f"v{i}.gif")
        media.write_video(np.stack([palette_image(PALETTES[i % 3], 10 + f) for f in range(6)]), video)
        rows += [{"id": f"p{i}", "image": image, "video": None, "prompt": "an oil painting of a pattern"}]
        rows += [{"id": f"v{i}", "image": None, "video": video, "prompt": "a changing pattern"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    # Killed at step 3, it resumes from its step-2 checkpoint: the temporal layers it trains come back
    # from the checkpoint with the optimizer.
    spec = TrainSpec(
        "stylecrafter", 2, str(tmp_path / "train.parquet"), str(tmp_path / "s2"), models,
        {**params, "image_ratio": 0.5, "steps": 4, "checkpoint_every": 2},
        workers=2, max_failures=0, runtime_env={"env_vars": {"ANIMA_CHAOS_TRAIN_STEP": "3"}},
    )  # fmt: skip
    with pytest.raises(Exception, match="chaos"):
        run_training(spec)
    spec.runtime_env = None
    second = run_training(spec)
    assert second["step"] == 4 and second["resumed_from"] == 2
    assert np.isfinite(second["loss"])
    converted = load_stylecrafter(models, "cpu", torch.float32)
    tuned = load_stylecrafter({**models, "adapter": second["adapter"]}, "cpu", torch.float32)
    before = dict(converted.backbone.unet.named_parameters())
    moved = [n for n, p in tuned.backbone.unet.named_parameters() if not torch.equal(p, before[n])]
    assert any("relative_k" in n for n in moved)  # stage 2 trains the relative-position tables too
    unet_layers = [n for n in moved if ".attn2.processor." not in n]  # the style processors: stage 1
    assert unet_layers and all("temp_attentions" in n or n.startswith("transformer_in") for n in unet_layers)


def test_released_hub_ids_convert_once_and_are_the_defaults(official_files, tmp_path, monkeypatch, capsys):
    from pipelines.checkpoints.ldm_parts import OPENCLIP_TOKENIZER
    from pipelines.stylecrafter.model import load_stylecrafter
    from tests.test_dynamicrafter_checkpoints import _hub_snapshot

    hub = tmp_path / "hub"
    root = official_files
    _hub_snapshot(hub, "VideoCrafter/Text2Video-512", {"model.ckpt": (root / "model.ckpt").read_bytes()})
    files = {n: (root / n).read_bytes() for n in ("adapter_v1.pth", "temporal_v1_1.pth")}
    _hub_snapshot(hub, "liuhuohuo/StyleCrafter", files)
    # The public ViT-H-14 repository holds both the tokenizer and the image tower; here the small ones.
    _hub_snapshot(hub, OPENCLIP_TOKENIZER, {p.name: p.read_bytes() for p in (root / "clip-80").iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANIMA_HF_CACHE", str(hub))
    monkeypatch.setenv("ANIMA_CACHE", str(tmp_path / "node-cache"))
    small = small_vc1_config()["model"]["params"]
    monkeypatch.setattr(sc, "RELEASED_UNET", small["unet_config"]["params"])
    monkeypatch.setattr(sc, "RELEASED_ADAPTER", small["adapter_config"]["params"])

    models = {"backbone": "VideoCrafter/Text2Video-512", "adapter": "liuhuohuo/StyleCrafter"}
    model = load_stylecrafter(models, "cpu", torch.float32)
    assert model.config.variant == "official" and model.backbone.prediction_type == "epsilon"
    kinds = {type(p).__name__ for n, p in model.backbone.unet.attn_processors.items() if "temp_" in n}
    assert kinds == {"RelativePositionProcessor"}
    converted = sorted(p.name for p in (tmp_path / "node-cache").glob("converted-*") if p.is_dir())
    assert converted == ["converted-VideoCrafter--Text2Video-512-v1", "converted-liuhuohuo--StyleCrafter-v1"]


def test_generate_stylecrafter_defaults_to_the_released_models(ray_cluster, tmp_path, data_dir, capsys):
    styles = data_dir / "styles" if (data_dir / "styles").exists() else data_dir
    ink = str(sorted(styles.glob("*.jp*g"))[0])
    pq.write_table(pa.table({"id": ["a"], "prompt": ["a bird"], "style": [[ink]]}), tmp_path / "s.parquet")
    args = [
        "generate",
        "stylecrafter",
        "--manifest",
        str(tmp_path / "s.parquet"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--clip", "tiny"]) == 3  # offline, nothing cached: no silent random model
    err = " ".join(capsys.readouterr().err.split())
    assert "VideoCrafter/Text2Video-512" in err and "huggingface-cli download" in err

"""Released DynamiCrafter checkpoints: the strict key mapping, check-oracle against the official code's
outputs, full-size key manifests, conversion of an official-layout file, and files that must be refused."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from jobs import resume
from jobs.cli import main
from pipelines import media
from pipelines.backbone import prepare_backbone
from pipelines.checkpoints import dynamicrafter as dc
from pipelines.checkpoints.keymap import ConversionError, Rule, meta_tensors, remap
from pipelines.checkpoints.ldm_parts import OPENCLIP_TOKENIZER
from pipelines.checkpoints.oracle import check_oracle
from pipelines.checkpoints.reader import read_checkpoint
from pipelines.ddim import ddim_sample, ddim_schedule, dynamic_rescale_table
from tests.official_layout import FIXTURES, small_config, small_dynamicrafter

ORACLES = ["dc_small_unet", "dc_small_unet_gated", "dc_small_resampler"]


# -- the key mapping ------------------------------------------------------------------------------


def test_remap_names_every_unused_missing_doubled_and_misshaped_key():
    expected = {"a.w": torch.zeros(2), "b.w": torch.zeros(3), "c.w": torch.zeros(1)}
    checkpoint = {"x.w": torch.ones(2), "y.w": torch.ones(4), "z.w": torch.ones(3), "junk": torch.ones(1)}
    rules = [Rule("x.", "a."), Rule("y.", "b."), Rule("z.", "b."), Rule("dropped", None, reason="unused")]
    with pytest.raises(ConversionError) as info:
        remap(checkpoint, rules, expected)
    text = str(info.value)
    assert "1 checkpoint key(s) no rule uses" in text and "junk" in text
    assert "model key(s) the checkpoint does not fill: c.w" in text
    assert "filled twice: b.w (from y.w and z.w)" in text
    assert "y.w [4] -> b.w expects [3]" in text
    fine = remap({"x.w": torch.ones(2), "dropped": torch.ones(1)}, rules, {"a.w": torch.zeros(2)})
    assert list(fine) == ["a.w"] and torch.equal(fine["a.w"], torch.ones(2))


# -- check-oracle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORACLES)
def test_check_oracle_matches_the_official_outputs_and_intermediates(name, capsys):
    spec = json.loads((FIXTURES / f"{name}.json").read_text())
    results = check_oracle(str(FIXTURES / f"{name}.safetensors"))
    compared = {r.name for r in results}
    assert compared == set(spec["outputs"]) | set(spec.get("intermediates", {}))  # none skipped
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert main(["convert", "check-oracle", str(FIXTURES / f"{name}.safetensors")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("max_abs_diff=") and " tolerance=" in line


def test_check_oracle_fails_when_a_weight_is_off(tmp_path, capsys):
    tensors = load_file(str(FIXTURES / "dc_small_unet.safetensors"))
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight"
    tensors[key] = tensors[key] * 1.01  # one image key projection, 1% off
    save_file(tensors, str(tmp_path / "off.safetensors"))
    shutil.copy(FIXTURES / "dc_small_unet.json", tmp_path / "off.json")
    assert main(["convert", "check-oracle", str(tmp_path / "off.safetensors")]) == 1
    assert "DIFFERS" in capsys.readouterr().err
    (tmp_path / "off.json").unlink()
    assert main(["convert", "check-oracle", str(tmp_path / "off.safetensors")]) == 2


# -- full-size manifests --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["256", "512", "1024"])
def test_full_size_modules_take_every_released_key_with_its_shape(variant):
    manifest = json.loads((FIXTURES / f"dynamicrafter_{variant}_unet.json").read_text())
    manifest += json.loads((FIXTURES / "dynamicrafter_image_proj.json").read_text())
    checkpoint = meta_tensors({e["key"]: e["shape"] for e in manifest})
    v = dc.VARIANTS[variant]
    context = dc.context_config_of(dc.RELEASED_RESAMPLER, **v.context_fields())
    parts = dc.build_parts(v.unet_config(), context, dc.RELEASED_RESAMPLER["embedding_dim"], device="meta")
    converted = dc.convert(checkpoint, v.unet_config(), parts, dc.RELEASED_RESAMPLER)
    expected = parts.expected()
    assert set(converted) == set(expected) and len(converted) == len(checkpoint)
    assert all(tuple(converted[k].shape) == tuple(expected[k].shape) for k in expected)
    assert len(parts.modules.processors) == 16
    assert sum(k.endswith(".alpha") for k in converted) == (16 if variant == "256" else 0)


# -- sampler facts --------------------------------------------------------------------------------

FACTS = json.loads((FIXTURES / "sampler_facts.json").read_text())


def _official_alphas_cumprod(zero_snr: bool) -> np.ndarray:
    """The facts' schedule: LDM 'linear' betas (float64), then Lin et al.'s zero-terminal-SNR rescale."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar_sqrt = np.sqrt(np.cumprod(1 - betas))
    if zero_snr:
        first, last = abar_sqrt[0], abar_sqrt[-1]
        abar_sqrt = (abar_sqrt - last) * first / (first - last)
    return abar_sqrt**2


@pytest.mark.parametrize("variant", ["256", "512", "1024"])
def test_schedule_timesteps_and_ddim_coefficients_match_the_official_facts(variant):
    facts = FACTS[f"dynamicrafter_{variant}"]
    v = dc.VARIANTS[variant]
    assert v.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[facts["parameterization"]["value"]]
    assert v.zero_snr is facts["rescale_betas_zero_snr"]["value"]
    assert v.guidance_rescale == facts["guidance_rescale_default"]["value"]
    assert v.default_fs == facts["fs_semantics"]["value"]["default_fs_in_unet"]
    schedule = ddim_schedule(v.scheduler_config(), 50, eta=1.0)
    spacing = facts["timestep_spacing"]["value"]
    official = np.arange(0, 1000, 20) + 1 if spacing == "uniform" else np.round(np.arange(1000, 0, -20)) - 1
    assert schedule.timesteps.tolist() == sorted(official.astype(int).tolist(), reverse=True)
    abar = _official_alphas_cumprod(v.zero_snr)
    ts = schedule.timesteps.numpy()
    np.testing.assert_allclose(schedule.alphas.numpy(), abar[ts], atol=2e-6)
    prev = np.concatenate([abar[ts[1:]], abar[:1]])  # the last step goes to alphas_cumprod[0], not 1
    np.testing.assert_allclose(schedule.alphas_prev.numpy(), prev, atol=2e-6)
    a, ap = abar[ts], prev
    sigma = np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    np.testing.assert_allclose(schedule.sigmas.numpy(), sigma, atol=1e-5)
    rescale = facts["dynamic_rescale"]["value"]
    assert v.dynamic_rescale == rescale.get("base_scale", 0.0)
    if rescale["use_dynamic_rescale"]:
        official = np.concatenate(
            [np.linspace(1.0, v.dynamic_rescale, 400), np.full(1000, v.dynamic_rescale)]
        )
        np.testing.assert_allclose(dynamic_rescale_table(v.dynamic_rescale, 400).numpy(), official[:1000])


def test_ddim_steps_v_outputs_as_the_official_sampler_with_dynamic_rescale():
    """One video of the official 512 loop on a fixed v output, against the facts' step written in numpy."""
    v = dc.VARIANTS["512"]
    backbone = SimpleNamespace(
        device=torch.device("cpu"), scheduler=SimpleNamespace(config=v.scheduler_config()),
        prediction_type="v_prediction",
    )  # fmt: skip
    out = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    table = dynamic_rescale_table(0.7, 400)
    got, _ = ddim_sample(
        backbone, (4, 2, 3, 3), [torch.Generator().manual_seed(0)], 50, 1.0, lambda x, t: out, table
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 3, generator=g).double().numpy()
    s = ddim_schedule(v.scheduler_config(), 50, 1.0)
    ts, o = s.timesteps.tolist(), out[0].double().numpy()
    for i, t in enumerate(ts):
        a, ap, sigma = (float(c[i]) for c in (s.alphas, s.alphas_prev, s.sigmas))
        x0 = np.sqrt(a) * x - np.sqrt(1 - a) * o  # from v directly: exact at alphas_cumprod = 0
        eps = np.sqrt(a) * o + np.sqrt(1 - a) * x
        x0 = x0 * float(table[ts[i + 1]] / table[t] if i + 1 < len(ts) else 1.0)
        noise = torch.randn(4, 2, 3, 3, generator=g).double().numpy()  # noise on every step, the last too
        x = np.sqrt(ap) * x0 + np.sqrt(max(0.0, 1 - ap - sigma**2)) * eps + sigma * noise
    np.testing.assert_allclose(got[0].double().numpy(), x, atol=1e-4)


def test_a_full_512_style_sampling_loop_on_a_zero_snr_v_model_is_finite():
    from diffusers import DDIMScheduler

    from pipelines.adapters import load_image_encoder
    from pipelines.backbone import load_backbone_uncached
    from pipelines.dynamicrafter.model import ContextConfig, DynamiCrafter
    from pipelines.dynamicrafter.sample import Request, SampleParams, sample

    v = dc.VARIANTS["512"]
    backbone = load_backbone_uncached("tiny-v")
    backbone.scheduler = DDIMScheduler.from_config(v.scheduler_config())
    assert float(backbone.alphas_cumprod[-1]) == 0.0
    width = backbone.unet.config.cross_attention_dim
    config = dataclasses.replace(ContextConfig.small("tiny", width), gate="one")
    model = DynamiCrafter(backbone, load_image_encoder("tiny", "cpu", torch.float32), config)
    seen = []
    backbone.unet.register_forward_hook(lambda _m, _a, o: seen.append(bool(torch.isfinite(o.sample).all())))
    params = SampleParams.from_dict({**v.sample_defaults(), "height": 32, "width": 32, "num_frames": 4})
    video, _ = sample(model, [Request(torch.rand(3, 32, 32) * 2 - 1, "a cat", params)])
    assert params.steps == 50 and len(seen) == 50 and all(seen)
    assert torch.isfinite(video).all()


# -- converting a checkpoint in the official layout ----------------------------------------------


def _vocab() -> int:
    from transformers import CLIPTokenizer

    return len(CLIPTokenizer.from_pretrained(prepare_backbone("tiny") / "tokenizer"))


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Lightning-style model.ckpt files of a small 512-mode and a small 256-mode (gated) model."""
    root = tmp_path_factory.mktemp("official")
    files = {}
    for name, gated in (("512", False), ("256", True)):
        torch.save({"state_dict": small_dynamicrafter(_vocab(), gated), "epoch": 4}, root / f"{name}.ckpt")
        (root / f"{name}.yaml").write_text(yaml.safe_dump(small_config(gated)))
        files[name] = (root / f"{name}.ckpt", root / f"{name}.yaml")
    return files


def test_variant_detection_from_keys_and_scale_arr(official_files):
    state = read_checkpoint(official_files["512"][0])
    assert dc.detect_variant(state).name == "512"
    assert dc.detect_variant(read_checkpoint(official_files["256"][0])).name == "256"
    state["scale_arr"] = state["scale_arr"] / 0.7 * 0.3 + (1 - 1 / 0.7 * 0.3) * (state["scale_arr"] == 1)
    state["scale_arr"][-1] = 0.3
    assert dc.detect_variant(state).name == "1024"
    del state["scale_arr"]
    with pytest.raises(ConversionError, match="pass --variant"):
        dc.detect_variant(state)
    assert dc.detect_variant(state, "512_interp").name == "512_interp"
    with pytest.raises(ConversionError, match="learnable image gates"):
        dc.detect_variant(state, "256")


def _convert(files, out: Path, *extra: str) -> int:
    ckpt, config = files
    args = ["convert", "dynamicrafter", "--checkpoint", str(ckpt), "--output", str(out)]
    return main([*args, "--config", str(config), "--tokenizer", "tiny", *extra])


@pytest.mark.parametrize("variant", ["512", "256"])
def test_converted_checkpoint_generates_in_every_mode(
    ray_cluster, official_files, tmp_path, data_dir, variant
):
    converted = tmp_path / "converted"
    assert _convert(official_files[variant], converted) == 0
    adapter = json.loads((converted / "adapter" / "adapter.json").read_text())
    assert adapter["variant"] == variant and adapter["sample_defaults"]["repeat_condition"] is True
    assert adapter["gate"] == ("one_plus_tanh" if variant == "256" else "one")
    assert adapter["fs_kind"] == ("frame_stride" if variant == "256" else "fps")
    scheduler = json.loads((converted / "backbone" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("epsilon" if variant == "256" else "v_prediction")
    assert scheduler["rescale_betas_zero_snr"] is (variant == "512")
    assert scheduler["timestep_spacing"] == ("leading" if variant == "256" else "trailing")
    assert json.loads((converted / "backbone" / "unet" / "config.json").read_text())["in_channels"] == 8

    folder = data_dir / "images" if (data_dir / "images").exists() else data_dir
    dance, guitar = str(folder / "dance1.jpeg"), str(folder / "guitar0.jpeg")
    rows = {"animate": (dance, None), "loop": (guitar, None), "interpolate": (dance, guitar)}
    table = pa.table(
        {
            "id": list(rows),
            "image": [r[0] for r in rows.values()],
            "end_image": [r[1] for r in rows.values()],
            "prompt": ["a person dancing"] * 3,
            "mode": list(rows),
        }
    )
    pq.write_table(table, tmp_path / "images.parquet")
    out = tmp_path / "out"
    args = ["generate", "dynamicrafter", "--manifest", str(tmp_path / "images.parquet"), "--output", str(out)]
    args += [
        "--backbone",
        str(converted / "backbone"),
        "--adapter",
        str(converted / "adapter"),
        "--clip",
        "tiny",
    ]
    for s in ("steps=3", "num_frames=4", "height=32", "width=32"):
        args += ["--set", s]
    assert main(args) == 0
    results = {r["id"]: r for r in resume.latest(resume.read_results(str(out / "results"))).to_pylist()}
    for mode, row in results.items():
        assert row["status"] == "ok", row["error"]
        assert media.video_info(dict(row["outputs"])["mp4"]).num_frames == (3 if mode == "loop" else 4)
        params = json.loads(row["params"])
        assert params["guidance"] == "single" and params["repeat_condition"] is True
        assert params["fs"] == (3 if variant == "256" else 24)
        assert params["guidance_rescale"] == (0.0 if variant == "256" else 0.7)


def test_bad_checkpoints_are_refused_with_a_clear_error(official_files, tmp_path, capsys):
    ckpt, config = official_files["512"]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    other = tmp_path / "other.safetensors"  # a checkpoint of another model: only a VAE
    save_file(
        {k: v for k, v in read_checkpoint(ckpt).items() if k.startswith("first_stage_model.")}, str(other)
    )

    class Code:
        def __reduce__(self):
            return (print, ("this ran while loading",))

    hostile = tmp_path / "hostile.ckpt"
    with hostile.open("wb") as f:
        pickle.dump({"state_dict": {"x": Code()}}, f)
    hostile_zip = tmp_path / "hostile_zip.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "callback": Code()}, hostile_zip)
    for path, message in [
        (truncated, "corrupt or truncated"),
        (garbage, "unknown format"),
        (other, "not a DynamiCrafter checkpoint"),
        (hostile, "objects other than tensors"),
        (hostile_zip, "objects other than tensors"),
        (tmp_path / "absent.ckpt", "does not exist"),
    ]:
        assert _convert((path, config), tmp_path / "never") == 2, path
        err = capsys.readouterr()
        assert message in " ".join(err.err.split()), (path, err.err)
        assert "this ran while loading" not in err.out + err.err
    assert not (tmp_path / "never").exists()
    # The right model with a key missing or extra is refused, naming the key.
    state = read_checkpoint(ckpt)
    missing = {k: v for k, v in state.items() if not k.endswith("input_blocks.1.1.proj_in.weight")}
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    assert _convert((tmp_path / "missing.ckpt", config), tmp_path / "never") == 2
    assert "down_blocks.0.attentions.0.proj_in.weight" in capsys.readouterr().err
    torch.save(
        {"state_dict": {**state, "model.diffusion_model.extra.weight": torch.ones(1)}}, tmp_path / "x.ckpt"
    )
    assert _convert((tmp_path / "x.ckpt", config), tmp_path / "never") == 2
    assert "model.diffusion_model.extra.weight" in capsys.readouterr().err


# -- hub ids of the releases ----------------------------------------------------------------------


def _hub_snapshot(hub: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache entry for `repo` (what `huggingface-cli download` leaves), offline-readable."""
    revision = "0" * 40
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def test_a_released_hub_id_is_converted_once_per_node_and_loads(official_files, tmp_path, monkeypatch):
    from pipelines.dynamicrafter.model import load_dynamicrafter
    from pipelines.model_cache import ModelLoadError

    tokenizer = prepare_backbone("tiny") / "tokenizer"
    hub = tmp_path / "hub"
    _hub_snapshot(hub, "Doubiiu/DynamiCrafter_512", {"model.ckpt": official_files["512"][0].read_bytes()})
    _hub_snapshot(hub, OPENCLIP_TOKENIZER, {p.name: p.read_bytes() for p in tokenizer.iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANIMA_HF_CACHE", str(hub))
    monkeypatch.setenv("ANIMA_CACHE", str(tmp_path / "node-cache"))
    # The small file has the oracles' architecture, not the released sizes.
    small = small_config()["model"]["params"]
    monkeypatch.setattr(dc, "RELEASED_UNET", small["unet_config"]["params"])
    monkeypatch.setattr(dc, "RELEASED_RESAMPLER", small["image_proj_stage_config"]["params"])
    calls = []
    convert = dc.convert_checkpoint
    monkeypatch.setattr(dc, "convert_checkpoint", lambda *a, **k: calls.append(a) or convert(*a, **k))

    model = load_dynamicrafter({"backbone": "Doubiiu/DynamiCrafter_512"}, "cpu", torch.float32)
    assert model.config.variant == "512" and model.backbone.prediction_type == "v_prediction"
    assert model.backbone.unet.config.in_channels == 8
    load_dynamicrafter({"backbone": "Doubiiu/DynamiCrafter_512"}, "cpu", torch.float32)
    assert len(calls) == 1  # converted once into the node's cache, then loaded from there
    monkeypatch.setenv("ANIMA_HF_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelLoadError, match="Doubiiu/DynamiCrafter_1024"):
        load_dynamicrafter({"backbone": "Doubiiu/DynamiCrafter_1024"}, "cpu", torch.float32)


def test_generate_without_backbone_runs_the_released_512_model_or_says_how_to_get_it(
    ray_cluster, tmp_path, data_dir, capsys
):
    folder = data_dir / "images" if (data_dir / "images").exists() else data_dir
    manifest = tmp_path / "images.parquet"
    pq.write_table(pa.table({"id": ["a"], "image": [str(folder / "dance1.jpeg")], "prompt": ["x"]}), manifest)
    args = ["generate", "dynamicrafter", "--manifest", str(manifest), "--output", str(tmp_path / "out")]
    assert main([*args, "--clip", "tiny"]) == 3  # offline, nothing cached: no silent random model
    err = " ".join(capsys.readouterr().err.split())
    assert "Doubiiu/DynamiCrafter_512" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out" / "results").exists()


def test_a_converted_model_fine_tunes_with_train_adapter(ray_cluster, official_files, tmp_path):
    from jobs.train import TrainSpec, run_training
    from pipelines.dynamicrafter.model import load_dynamicrafter
    from tests.test_dynamicrafter_train import moving_square

    converted = tmp_path / "converted"
    assert _convert(official_files["512"], converted) == 0
    rows = []
    for i in range(4):
        path = str(tmp_path / f"sq{i}.mp4")
        media.write_video(moving_square((200, 40 * i, 40), i), path, fps=24)
        rows.append({"id": f"sq{i}", "video": path, "prompt": "a square moving right"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "clips.parquet")
    models = {"backbone": str(converted / "backbone"), "adapter": str(converted / "adapter")}
    params = {"steps": 4, "batch_size": 2, "num_frames": 4, "height": 32, "width": 32, "checkpoint_every": 2}
    spec = TrainSpec(
        "dynamicrafter", 3, str(tmp_path / "clips.parquet"), str(tmp_path / "run"), models, params
    )
    summary = run_training(spec)
    assert summary["step"] == 4 and np.isfinite(summary["loss"])
    tuned = load_dynamicrafter({**models, "adapter": summary["adapter"]}, "cpu", torch.float32)
    base = load_dynamicrafter(models, "cpu", torch.float32)
    assert tuned.config.variant == "512" and tuned.config.gate == "one"
    changed = [
        k for k, v in tuned.adapter_state_dict().items() if not torch.equal(v, base.adapter_state_dict()[k])
    ]
    assert changed  # the fine-tuned adapter moved and loads back with the converted image encoder


def test_a_checkpoint_uri_is_fetched_into_the_cache_first(official_files, monkeypatch, tmp_path):
    import fsspec

    monkeypatch.setenv("ANIMA_CACHE", str(tmp_path / "cache"))
    with fsspec.open("memory://bucket/dc/model.ckpt", "wb") as f:
        f.write(official_files["512"][0].read_bytes())
    state = read_checkpoint("memory://bucket/dc/model.ckpt")
    assert dc.detect_variant(state).name == "512"
    assert list((tmp_path / "cache" / "downloads").glob("*/model.ckpt"))
    with pytest.raises(ConversionError, match="does not exist"):
        read_checkpoint("memory://bucket/dc/absent.ckpt")

"""X-CLIP text-to-video alignment: the tiny model loads like a real one and the score behaves."""

import numpy as np
import pytest
import torch

from pipelines import metrics, model_cache
from pipelines.xclip import DEFAULT_XCLIP, cached_default, load_xclip, prepare_xclip, sample_indices


def _video(seed: int, frames: int = 12, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, size, size + 8, 3))
    drift = rng.integers(-40, 40, (frames, 1, 1, 3))
    return np.clip(base + drift, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def xclip():
    return load_xclip("tiny")


def test_tiny_xclip_is_saved_in_the_standard_layout_and_loaded_from_it(xclip):
    path = prepare_xclip("tiny")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):
        assert (path / name).exists(), name
    assert type(xclip.model).__name__ == "XCLIPModel"
    assert xclip.num_frames == 8
    assert load_xclip("tiny") is xclip  # cached per process


def test_score_is_a_deterministic_cosine(xclip):
    video = _video(0)
    score = xclip.score(video, "a red fox")
    assert isinstance(score, float)
    assert -1.0 <= score <= 1.0
    assert xclip.score(video, "a red fox") == score


def test_score_is_logits_per_video_without_the_logit_scale(xclip):
    video = _video(1)
    clip = video[sample_indices(len(video), xclip.num_frames)]
    inputs = xclip.tokenizer(["a red fox"], return_tensors="pt")
    pixels = xclip.processor(list(clip), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = xclip.model(**inputs, pixel_values=pixels)
        expected = float(out.logits_per_video[0, 0] / xclip.model.logit_scale.exp())
    assert xclip.score(video, "a red fox") == pytest.approx(expected, abs=1e-5)


def test_score_depends_on_prompt_and_video(xclip):
    video = _video(2)
    assert xclip.score(video, "a red fox") != pytest.approx(
        xclip.score(video, "two people dancing"), abs=1e-4
    )
    assert xclip.score(video, "a red fox") != pytest.approx(xclip.score(_video(3), "a red fox"), abs=1e-4)


def test_short_and_long_videos_are_sampled_to_the_model_frame_count(xclip):
    assert sample_indices(20, 8).tolist() == [0, 3, 5, 8, 11, 14, 16, 19]
    assert sample_indices(3, 8).tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert sample_indices(1, 8).tolist() == [0] * 8
    for frames in (1, 3, 20):
        assert -1.0 <= xclip.score(_video(4, frames=frames), "a bird") <= 1.0
    with pytest.raises(ValueError, match="at least one frame"):
        sample_indices(0, 8)


def test_scorer_reports_xclip_text_only_with_a_prompt(xclip):
    scorer = metrics.load_scorer(None, xclip="tiny")
    assert scorer.xclip is not None and scorer.xclip.ref == "tiny"
    video = _video(5)
    values, notes = scorer.score(video, prompt="a bird")
    assert values["xclip_text"] == pytest.approx(xclip.score(video, "a bird"), abs=1e-6)
    assert not any(n.startswith("xclip_text") for n in notes)
    values, notes = scorer.score(video)
    assert values["xclip_text"] is None and "xclip_text: no prompt" in notes
    values, notes = metrics.load_scorer(None).score(video, prompt="a bird")
    assert values["xclip_text"] is None
    assert "xclip_text: no X-CLIP model given (--xclip REF)" in notes


def test_missing_model_directory_fails_loudly(tmp_path):
    with pytest.raises(model_cache.ModelLoadError, match="does not exist"):
        load_xclip(str(tmp_path / "nowhere"))
    with pytest.raises(model_cache.ModelLoadError, match="cannot load X-CLIP"):
        load_xclip(str(tmp_path))  # exists but holds no weights


def test_livesketch_scores_with_the_default_xclip_only_when_it_is_cached(tmp_path, monkeypatch):
    from actors.livesketch import _xclip_ref
    from tests.test_dynamicrafter_checkpoints import _hub_snapshot

    monkeypatch.setenv("ANIMA_HF_CACHE", str(tmp_path / "hub"))
    assert cached_default() is None and _xclip_ref({}) is None  # never a surprise download
    files = {p.name: p.read_bytes() for p in prepare_xclip("tiny").iterdir() if p.is_file()}
    _hub_snapshot(tmp_path / "hub", DEFAULT_XCLIP, files)
    assert cached_default() == DEFAULT_XCLIP == _xclip_ref({})
    assert _xclip_ref({"xclip": "none"}) is None and _xclip_ref({"xclip": "tiny"}) == "tiny"

"""Metric invariants and agreement with reference implementations."""

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.multimodal import clip_score
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from pipelines import metrics
from pipelines.clip import Clip, load_clip, pixel_table, prepare_clip
from pipelines.clip_crop import ClipCrop
from pipelines.lpips import LPIPS


def _video(seed: int, frames: int = 6, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, size, size, 3))
    drift = rng.integers(-40, 40, (frames, 1, 1, 3))
    return np.clip(base + drift, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny")


@pytest.mark.parametrize(
    "settings",
    [
        {},  # CLIP's own: shortest edge 224, 224 x 224 crop
        {"size": {"shortest_edge": 20}, "crop_size": {"height": 25, "width": 31}},  # crop past the edge
        {"size": {"height": 48, "width": 40}, "resample": 2, "do_normalize": False},
        {"do_resize": False, "do_center_crop": False},
    ],
)
def test_the_split_clip_preprocessing_gives_the_processors_pixels_exactly(settings, data_dir):
    """Crop on uint8 (the decode stage's half) then a lookup table (the actor's half) equals transformers'
    CLIPImageProcessorPil bit for bit, on real frames and images of several shapes."""
    from pipelines.media import read_image, read_video

    processor = CLIPImageProcessorPil(**settings)
    videos = sorted(data_dir.glob("**/*.mp4"))
    video = read_video(str(videos[0]), num_frames=2)
    images = [*video, *(read_image(str(p)) for p in sorted(data_dir.glob("**/*.jp*g"))[:3])]
    images += [np.asarray(Image.fromarray(images[-1]).resize((37, 19)))]  # odd sizes, smaller than the crop
    if not settings.get("do_resize", True):
        images = [image[:19, :37] for image in images]  # one shape: uncropped, unresized images must stack
    crop = ClipCrop.from_config(processor.to_dict())
    clip = Clip(
        "x",
        model=None,
        tokenizer=None,
        crop=crop,
        pixel_table=pixel_table(processor),
        device=torch.device("cpu"),
    )
    ours = clip.pixels(np.concatenate([crop(images[i : i + 1]) for i in range(len(images))]))
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    # The crops travel between processes as a plain dict of settings.
    assert ClipCrop.from_dict(crop.to_dict()) == crop


def test_the_decode_stage_and_the_actors_read_a_checkpoints_crop_from_the_same_place(tmp_path):
    """transformers 5 saves a CLIPProcessor's settings in processor_config.json alone; the stage's settings
    come from where the actor's processor finds them, so the two never crop differently."""
    from pipelines.clip import clip_crop

    checkpoint = tmp_path / "clip"
    shutil.copytree(prepare_clip("tiny"), checkpoint)
    (checkpoint / "preprocessor_config.json").unlink()
    processor = CLIPProcessor.from_pretrained(prepare_clip("tiny"))
    processor.image_processor = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size=36)
    processor.save_pretrained(checkpoint)
    assert not (checkpoint / "preprocessor_config.json").exists()
    expected = ClipCrop(shortest_edge=40, size=None, crop=(36, 36))
    assert clip_crop(str(checkpoint)) == load_clip(str(checkpoint)).crop == expected


def test_a_clip_processor_that_resizes_otherwise_is_refused():
    with pytest.raises(ValueError, match="unsupported image processor size"):
        ClipCrop.from_config({"size": {"longest_edge": 224}})


def test_identical_frames_have_temporal_consistency_one(clip):
    still = np.repeat(_video(0, frames=1), 5, axis=0)
    emb = clip.embed_images(still)
    assert metrics.clip_temporal(emb) == pytest.approx(1.0, abs=1e-5)
    moving = clip.embed_images(_video(1))
    assert metrics.clip_temporal(moving) < 1 - 1e-4
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.clip_temporal(emb[:1])


class _TensorFeatures(CLIPModel):
    """torchmetrics 1.9 expects bare tensors from get_*_features; transformers 5 wraps them."""

    def get_image_features(self, *args, **kwargs):
        return super().get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return super().get_text_features(*args, **kwargs).pooler_output


def test_clip_text_score_agrees_with_torchmetrics_clipscore(clip):
    """torchmetrics reports 100 * max(cos, 0) for one image-text pair; ours is the mean cosine over frames."""
    path = prepare_clip("tiny")
    reference = lambda: (_TensorFeatures.from_pretrained(path), CLIPProcessor.from_pretrained(path))  # noqa: E731
    frames = np.concatenate([_video(s, frames=2) for s in range(4)])
    prompts = ["a red fox", "two people dancing", "zzz", "ink painting of a bird", "a locomotive"]
    compared = 0
    for prompt in prompts:
        emb = clip.embed_images(frames)
        cos = (emb @ clip.embed_text([prompt])[0]).numpy()
        for frame, c in zip(frames, cos, strict=True):
            theirs = float(
                clip_score(torch.from_numpy(frame).permute(2, 0, 1), prompt, model_name_or_path=reference)
            )
            assert theirs == pytest.approx(100 * max(float(c), 0.0), abs=1e-3)
            compared += c > 0
        assert metrics.clip_text(emb, clip.embed_text([prompt])[0]) == pytest.approx(
            float(cos.mean()), abs=1e-6
        )
    assert compared >= 3, "the comparison must include frames with a positive score"


def test_clip_image_and_style_scores(clip):
    video = _video(2)
    emb = clip.embed_images(video)
    assert metrics.clip_image(emb, emb[0]) <= 1.0
    same = clip.embed_images(np.repeat(video[:1], 3, axis=0))
    assert metrics.clip_image(same, same[0]) == pytest.approx(1.0, abs=1e-5)
    styles = clip.embed_images([video[0], _video(5, frames=1, size=64)[0]])
    score = metrics.clip_style(same, styles)
    assert score == pytest.approx((1.0 + float(same[0] @ styles[1])) / 2, abs=1e-5)


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LPIPS()
    for lin in model.lins:  # the published heads are non-negative
        lin.weight.data.abs_()
    directory = tmp_path_factory.mktemp("lpips")
    model.save_dir(directory)
    return directory


def test_lpips_of_a_video_with_itself_is_zero(lpips_dir):
    model = LPIPS.from_dir(lpips_dir)
    video, other = _video(3), _video(4)
    assert metrics.lpips_video(model, video, video) == pytest.approx(0.0, abs=1e-7)
    assert metrics.lpips_video(model, video, other) > 1e-3
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.lpips_video(model, video, other[:-1])


def test_lpips_weights_round_trip_in_the_published_layout(lpips_dir, tmp_path):
    model = LPIPS.from_dir(lpips_dir)
    assert {p.name for p in lpips_dir.iterdir()} == {"alex.pth", "alexnet-owt-7be5be79.pth"}
    heads = torch.load(lpips_dir / "alex.pth", weights_only=True)
    assert sorted(heads) == [f"lin{i}.model.1.weight" for i in range(5)]
    torch.testing.assert_close(model.lins[2].weight, heads["lin2.model.1.weight"])
    with pytest.raises(FileNotFoundError, match=r"alex\.pth"):
        LPIPS.from_dir(tmp_path)


def test_pic_is_one_minus_mean_distance():
    frames = _video(6, frames=4)
    image = frames[0]
    mean_abs = lambda a, b: float(np.abs(a.astype(float) - b.astype(float)).mean() / 255)  # noqa: E731
    expected = 1 - np.mean([mean_abs(image, f) for f in frames])
    assert metrics.pic(image, frames, mean_abs) == pytest.approx(expected)
    assert metrics.pic(image, np.repeat(image[None], 3, axis=0), mean_abs) == 1.0


def test_outside_mask_psnr():
    source = _video(7)
    edited = source.copy()
    mask = np.zeros(source.shape[:3], bool)
    mask[:, 10:20, 10:20] = True
    edited[mask] = 255 - edited[mask]
    assert metrics.outside_mask_psnr(source, edited, mask) == float("inf")
    edited[:, 0, 0] = 0
    assert 20 < metrics.outside_mask_psnr(source, edited, mask) < 60
    with pytest.raises(ValueError, match="covers every pixel"):
        metrics.outside_mask_psnr(source, edited, np.ones_like(mask))


def test_scorer_names_why_each_missing_metric_is_null(clip, lpips_dir):
    scorer = metrics.load_scorer("tiny", lpips=str(lpips_dir))
    video = _video(8)
    values, notes = scorer.score(video, prompt="a bird", source=video)
    assert values["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert values["clip_text"] is not None and values["clip_temporal"] is not None
    assert values["pic"] is None and values["clip_image"] is None and values["clip_style"] is None
    assert "pic: no image" in notes and "clip_image: no image" in notes
    values, notes = scorer.score(video, image=video[0])
    assert values["pic"] is None
    assert "pic: no DreamSim model given (--dreamsim DIR)" in notes
    assert "clip_text: no prompt" in notes
    bare = metrics.load_scorer(None)
    values, notes = bare.score(video, prompt="x", source=video)
    assert values["clip_text"] is None and values["lpips"] is None
    assert "clip_text: no CLIP model given (--clip REF)" in notes
    assert "lpips: no LPIPS weights given (--lpips DIR)" in notes


def test_asking_for_an_absent_dreamsim_backend_fails_loudly(tmp_path):
    """dreamsim cannot be installed on CPU machines (it needs torchvision); asking for it must say so."""
    installed = importlib.util.find_spec("dreamsim") is not None
    # Installed (GPU machines) it still cannot load weights from an empty directory without network.
    with pytest.raises(
        Exception if installed else ImportError, match=None if installed else r"anima\[metrics\]"
    ):
        metrics.load_scorer(None, dreamsim=str(tmp_path))


def test_scoring_rows_together_matches_scoring_each_alone(clip):
    """CLIP runs over every row's frames, references and prompts at once; each row's numbers are unchanged."""
    scorer = metrics.load_scorer("tiny")
    a, b, c = _video(8), _video(9)[:3], _video(10)[:5]
    samples = [
        metrics.Sample(a, prompt="a bird", image=b[0], styles=[c[0], c[1]]),
        metrics.Sample(b, prompt="a red car"),
        metrics.Sample(c, prompt="a bird", styles=[a[2]]),
        metrics.Sample(a[:1]),
    ]
    together = scorer.score_many(samples)
    for sample, (values, notes) in zip(samples, together, strict=True):
        alone, alone_notes = scorer.score(sample.frames, sample.prompt, sample.image, styles=sample.styles)
        assert notes == alone_notes
        assert values.keys() == alone.keys()
        for name, value in alone.items():
            assert (value is None) == (values[name] is None), name
            if value is not None:
                assert values[name] == pytest.approx(value, abs=1e-5), name
    assert together[0][0]["clip_style"] is not None and together[1][0]["clip_style"] is None
    assert together[3][0]["clip_temporal"] is None and together[3][0]["clip_text"] is None

"""Quality metrics of a generated video: CLIP text/image/style/temporal, X-CLIP text, PIC, LPIPS.

Each metric is computed when its inputs and its model are present, and is otherwise None with a note
saying why, so a result table never mixes "bad" with "not measured".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.clip import Clip
from pipelines.lpips import LPIPS
from pipelines.xclip import XClip


def clip_text(frames: torch.Tensor, text: torch.Tensor) -> float:
    """Mean over frames of cos(frame, prompt); embeddings are unit-norm, [F, D] and [D]."""
    return float((frames @ text).mean())


def clip_temporal(frames: torch.Tensor) -> float:
    """Mean cosine of consecutive frames' embeddings (1 for a still video)."""
    if frames.shape[0] < 2:
        raise ValueError("temporal consistency needs at least 2 frames")
    return float((frames[1:] * frames[:-1]).sum(-1).mean())


def clip_image(frames: torch.Tensor, image: torch.Tensor) -> float:
    """Mean over frames of cos(frame, reference image)."""
    return float((frames @ image).mean())


def clip_style(frames: torch.Tensor, styles: torch.Tensor) -> float:
    """Mean over frames and style references of cos(frame, style image)."""
    return float((frames @ styles.T).mean())


def pic(image: np.ndarray, frames: np.ndarray, distance: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """Perceptual Input Conformity (DynamiCrafter): mean over frames of 1 - d(image, frame)."""
    return float(np.mean([1.0 - distance(image, frame) for frame in frames]))


def to_signed(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    # A decoded video may be a read-only view, which torch.from_numpy warns about: copy those only.
    frames = np.require(frames, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    return torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]; the inverse of `to_signed`."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def lpips_video(model: LPIPS, a: np.ndarray, b: np.ndarray, chunk: int = 16) -> float:
    """Mean frame-wise LPIPS between two videos of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    device = next(model.parameters()).device
    values = [
        model(to_signed(x, device), to_signed(y, device))
        for x, y in zip(
            np.split(a, range(chunk, len(a), chunk)), np.split(b, range(chunk, len(b), chunk)), strict=True
        )
    ]
    return float(torch.cat(values).mean())


class DreamSimDistance:
    """DreamSim (Fu et al. 2023) from the optional `dreamsim` package, weights in a local directory."""

    def __init__(self, directory: str, device: str = "cpu"):
        from dreamsim import dreamsim  # optional: needs torchvision, see pyproject's `metrics` extra
        from PIL import Image

        self._image = Image.fromarray
        self.model, self.preprocess = dreamsim(pretrained=True, device=device, cache_dir=directory)
        self.device = device

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        x = self.preprocess(self._image(a)).to(self.device)
        y = self.preprocess(self._image(b)).to(self.device)
        return float(self.model(x, y))


@dataclass
class Sample:
    """One video to score (uint8 [F, H, W, 3]) and whichever references it has."""

    frames: np.ndarray
    prompt: str | None = None
    image: np.ndarray | None = None
    source: np.ndarray | None = None
    styles: list[np.ndarray] = field(default_factory=list)
    # The frames, then the image, then the styles, through the CLIP crop (`Clip.crop`) already: the
    # decode stage's work. None: cropped here.
    clip_crops: np.ndarray | None = None


@dataclass
class _ClipEmbeddings:
    frames: torch.Tensor
    text: torch.Tensor | None
    image: torch.Tensor | None
    styles: torch.Tensor


@dataclass
class Scorer:
    """The metric models a job loaded, and why the others are absent."""

    clip: Clip | None = None
    lpips: LPIPS | None = None
    dreamsim: Callable[[np.ndarray, np.ndarray], float] | None = None
    xclip: XClip | None = None
    absent: dict[str, str] = field(default_factory=dict)

    def score(
        self,
        frames: np.ndarray,
        prompt: str | None = None,
        image: np.ndarray | None = None,
        source: np.ndarray | None = None,
        styles: list[np.ndarray] | None = None,
    ) -> tuple[dict[str, float | None], list[str]]:
        """Metrics of `frames` (uint8 [F, H, W, 3]) against whichever references are given, and notes."""
        return self.score_many([Sample(frames, prompt, image, source, list(styles or []))])[0]

    def score_many(self, samples: list[Sample]) -> list[tuple[dict[str, float | None], list[str]]]:
        """Metrics and notes of several videos. CLIP embeds every video's frames, references and prompts
        in shared forward passes, so a batch of short rows still fills the accelerator's batches."""
        embeddings = self._clip_embeddings(samples) if self.clip is not None else [None] * len(samples)
        return [self._score(s, e) for s, e in zip(samples, embeddings, strict=True)]

    def _clip_embeddings(self, samples: list[Sample]) -> list[_ClipEmbeddings]:
        assert self.clip is not None
        crops: list[np.ndarray] = []
        spans, start = [], 0
        for s in samples:
            refs = ([] if s.image is None else [s.image]) + list(s.styles)
            spans.append((start, len(s.frames), len(refs)))
            start += len(s.frames) + len(refs)
            crops.append(self.clip.crop([*s.frames, *refs]) if s.clip_crops is None else s.clip_crops)
            expected = (len(s.frames) + len(refs), *(self.clip.crop.crop or crops[-1].shape[1:3]), 3)
            assert crops[-1].shape == expected, f"CLIP crops {crops[-1].shape}, expected {expected}"
        embedded = self.clip.embed_images(np.concatenate(crops), cropped=True)
        prompts = sorted({s.prompt for s in samples if s.prompt})
        texts = dict(zip(prompts, self.clip.embed_text(prompts), strict=True)) if prompts else {}
        out = []
        for s, (start, count, refs) in zip(samples, spans, strict=True):
            frames, references = (
                embedded[start : start + count],
                embedded[start + count : start + count + refs],
            )
            image = None if s.image is None else references[0]
            styles = references if s.image is None else references[1:]
            out.append(_ClipEmbeddings(frames, texts.get(s.prompt or ""), image, styles))
        return out

    def _score(self, s: Sample, emb: _ClipEmbeddings | None) -> tuple[dict[str, float | None], list[str]]:
        metrics: dict[str, float | None] = {}
        notes: list[str] = []

        def unavailable(name: str, backend: str, reason: str | None) -> None:
            metrics[name] = None
            notes.append(f"{name}: {reason or self.absent.get(backend, f'no {backend} model loaded')}")

        if emb is None:
            for name in ("clip_text", "clip_temporal", "clip_image", "clip_style"):
                unavailable(name, "clip", None)
        else:
            if emb.text is not None:
                metrics["clip_text"] = clip_text(emb.frames, emb.text)
            else:
                unavailable("clip_text", "clip", "no prompt")
            if len(s.frames) >= 2:
                metrics["clip_temporal"] = clip_temporal(emb.frames)
            else:
                unavailable("clip_temporal", "clip", "fewer than 2 frames")
            if emb.image is not None:
                metrics["clip_image"] = clip_image(emb.frames, emb.image)
            else:
                unavailable("clip_image", "clip", "no image")
            if len(emb.styles):
                metrics["clip_style"] = clip_style(emb.frames, emb.styles)
            else:
                unavailable("clip_style", "clip", "no style images")

        if self.xclip is None:
            unavailable("xclip_text", "xclip", None)
        elif s.prompt:
            metrics["xclip_text"] = self.xclip.score(s.frames, s.prompt)
        else:
            unavailable("xclip_text", "xclip", "no prompt")

        if s.image is None:
            unavailable("pic", "dreamsim", "no image")
        elif self.dreamsim is None:
            unavailable("pic", "dreamsim", None)
        else:
            metrics["pic"] = pic(s.image, s.frames, self.dreamsim)

        if self.lpips is None:  # first: without the model, evaluation does not read the source at all
            unavailable("lpips", "lpips", None)
        elif s.source is None:
            unavailable("lpips", "lpips", "no source video")
        else:
            metrics["lpips"] = lpips_video(self.lpips, s.source, s.frames)
        return metrics, notes


def outside_mask_psnr(source: np.ndarray, video: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) over pixels outside the edit mask: how well an edit preserved what it should not touch.

    `mask` is bool [F, H, W], True where editing is allowed; infinite when those pixels are identical.
    """
    keep = ~mask
    if not keep.any():
        raise ValueError("the mask covers every pixel; nothing outside it to compare")
    diff = source.astype(np.float64)[keep] - video.astype(np.float64)[keep]
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def load_scorer(
    clip: str | None,
    dreamsim: str | None = None,
    lpips: str | None = None,
    device: str = "cpu",
    xclip: str | None = None,
) -> Scorer:
    """Load the metric models a job asked for; those not asked for are recorded as absent, with why.

    A model that was asked for but cannot load raises: a misconfigured job should stop before it
    spends GPU-hours writing rows of nulls.
    """
    from pipelines.clip import load_clip
    from pipelines.xclip import load_xclip

    scorer = Scorer()
    if clip:
        scorer.clip = load_clip(clip, device)
    else:
        scorer.absent["clip"] = "no CLIP model given (--clip REF)"
    if xclip:
        scorer.xclip = load_xclip(xclip, device)
    else:
        scorer.absent["xclip"] = "no X-CLIP model given (--xclip REF)"
    if lpips:
        scorer.lpips = LPIPS.from_dir(lpips).to(device)
    else:
        scorer.absent["lpips"] = "no LPIPS weights given (--lpips DIR)"
    if dreamsim:
        try:
            scorer.dreamsim = DreamSimDistance(dreamsim, device)
        except ImportError as exc:
            raise ImportError(
                f"--dreamsim needs the optional dreamsim package (pip install 'anima[metrics]'): {exc}"
            ) from exc
    else:
        scorer.absent["dreamsim"] = "no DreamSim model given (--dreamsim DIR)"
    return scorer

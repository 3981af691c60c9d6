"""`anima demo`: the jobs on local Ray with tiny models over real example inputs.

Tiny models have random weights, so the numbers and the motion are meaningless; the demo shows the
whole path a cluster job takes: manifest, validation, actor pool, artifacts, result table, summary.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import resume
from jobs.report import write_report
from jobs.runner import JobSpec, run_job
from pipelines import media

DATA = Path(__file__).parent / "demo_data"

# (video, prompt, image it animates, style reference): prompts from the clips' sources.
EVAL_ROWS = [
    ("dance1.mp4", "two people dancing", "dance1.jpeg", None),
    ("guitar0.mp4", "bear playing guitar happily, snowing", "guitar0.jpeg", None),
    (
        "bird000.mp4",
        "a black and white bird perched on a branch of orange blossoms, ink painting style",
        None,
        "ink_1.jpeg",
    ),
    ("locomotive.mp4", "A locomotive rides in a forest", None, None),
]


def eval_manifest() -> pa.Table:
    def path(name: str | None) -> str | None:
        return str(DATA / name) if name else None

    return pa.table(
        {
            "id": [Path(v).stem for v, *_ in EVAL_ROWS],
            "video": [path(v) for v, *_ in EVAL_ROWS],
            "prompt": [p for _, p, *_ in EVAL_ROWS],
            "image": [path(i) for _, _, i, _ in EVAL_ROWS],
            "style": pa.array([[path(s)] if s else None for *_, s in EVAL_ROWS], pa.list_(pa.string())),
        }
    )


def sketch_manifest() -> pa.Table:
    with open(DATA / "sketches" / "prompts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return pa.table(
        {
            "id": [r["file"].removesuffix("_scaled1.svg") for r in rows],
            "svg": [str(DATA / "sketches" / r["file"]) for r in rows],
            "prompt": [r["prompt"] for r in rows],
        }
    )


# (clip, source prompt, target prompt): the shared data's edit prompts for these clips.
EDIT_ROWS = [
    ("locomotive.mp4", "A locomotive rides in a forest", "A car driving in a forest"),
    (
        "bird000.mp4",
        "a black and white bird perched on a branch of orange blossoms, ink painting style",
        "a red cardinal perched on a branch of orange blossoms, ink painting style",
    ),
]
# A DreamMotion smoke run: few iterations on 8 small frames.
DREAMMOTION_PARAMS = {"steps": 4, "num_frames": 8, "height": 64, "width": 112}


def edit_manifest() -> pa.Table:
    return pa.table(
        {
            "id": [Path(v).stem for v, *_ in EDIT_ROWS],
            "video": [str(DATA / v) for v, *_ in EDIT_ROWS],
            "source_prompt": [s for _, s, _ in EDIT_ROWS],
            "target_prompt": [t for *_, t in EDIT_ROWS],
        }
    )


# DynamiCrafter smoke run: the two images with their captions, one animated, one looped.
ANIMATE_ROWS = [
    ("dance1.jpeg", "two people dancing", "animate"),
    ("guitar0.jpeg", "bear playing guitar happily, snowing", "loop"),
]
DYNAMICRAFTER_PARAMS = {"steps": 4, "num_frames": 8, "height": 64, "width": 64}


def image_manifest() -> pa.Table:
    return pa.table(
        {
            "id": [Path(i).stem for i, *_ in ANIMATE_ROWS],
            "image": [str(DATA / i) for i, *_ in ANIMATE_ROWS],
            "prompt": [p for _, p, _ in ANIMATE_ROWS],
            "mode": [m for *_, m in ANIMATE_ROWS],
        }
    )


# StyleCrafter smoke run: content prompts of the shared data in the ink style of the demo's reference.
STYLE_ROWS = [
    ("performer", "A street performer playing the guitar."),
    ("chef", "A chef preparing meals in kitchen."),
]
STYLECRAFTER_PARAMS = {"steps": 4, "num_frames": 8, "height": 64, "width": 96, "style_size": 128}


def style_manifest() -> pa.Table:
    return pa.table(
        {
            "id": [i for i, _ in STYLE_ROWS],
            "prompt": [p for _, p in STYLE_ROWS],
            "style": pa.array([[str(DATA / "ink_1.jpeg")]] * len(STYLE_ROWS), pa.list_(pa.string())),
        }
    )


# A LiveSketch smoke run: few steps, small frames, all sketches optimized together in one batch.
LIVESKETCH_PARAMS = {"steps": 8, "num_frames": 8, "height": 64, "width": 64, "dim": 32, "video_size": 128}


def _write_manifest(table: pa.Table, uri: str) -> str:
    with media.atomic_write(uri) as f:
        pq.write_table(table, f)
    return uri


def _print_results(out: str, columns: list[str]) -> None:
    results = resume.latest(resume.read_results(media.join(out, "results")))
    for row in results.select(["id", "status", *columns]).to_pylist():
        cells = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"  {cells}")


@dataclass(frozen=True)
class DemoJob:
    """One generation job of the demo: its manifest, smoke-run parameters, and what to print."""

    method: str
    manifest: Callable[[], pa.Table]
    params: dict[str, Any]
    batch_size: int
    columns: list[str]
    artifact: str  # the file to look at in artifacts/<id>/


GENERATION_JOBS = [
    DemoJob(
        "livesketch", sketch_manifest, LIVESKETCH_PARAMS, 3, ["clip_image", "clip_text"], "animation.svg"
    ),
    DemoJob(
        "dreammotion",
        edit_manifest,
        DREAMMOTION_PARAMS,
        1,
        ["clip_text", "clip_temporal"],
        "source_and_edit.mp4",
    ),
    DemoJob(
        "dynamicrafter", image_manifest, DYNAMICRAFTER_PARAMS, 2, ["clip_image", "clip_text"], "video.mp4"
    ),
    DemoJob("stylecrafter", style_manifest, STYLECRAFTER_PARAMS, 2, ["clip_style", "clip_text"], "video.mp4"),
]


def run_demo(output: str, verbose: bool = False) -> None:
    output = str(Path(output).resolve())
    manifests = media.join(output, "manifests")
    out = media.join(output, "evaluate")
    manifest = _write_manifest(eval_manifest(), media.join(manifests, "eval.parquet"))
    run_job(
        JobSpec(method="evaluate", manifest=manifest, output=out, models={"clip": "tiny"}, verbose=verbose)
    )
    print("\nevaluation, per row (tiny random CLIP: the values only show the path works):")
    _print_results(out, ["clip_text", "clip_temporal", "clip_image", "clip_style"])
    print(f"report: {write_report([out])}")

    for job in GENERATION_JOBS:
        out = media.join(output, job.method)
        manifest = _write_manifest(job.manifest(), media.join(manifests, f"{job.method}.parquet"))
        models = {"backbone": "tiny", "clip": "tiny"}
        run_job(
            JobSpec(job.method, manifest, out, models, job.params, batch_size=job.batch_size, verbose=verbose)
        )
        where = media.join(out, "artifacts", "<id>", job.artifact)
        print(f"\n{job.method}, per row (tiny random models, untrained adapters; outputs: {where}):")
        _print_results(out, [*job.columns, "seconds"])
        print(f"report: {write_report([out])}")
    print(f"\ndemo outputs are under {output}")

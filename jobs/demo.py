"""`anima demo`: the main job on local Ray with tiny models over real example inputs.

Tiny models have random weights, so the numbers are meaningless; the demo shows the whole path a
cluster job takes: manifest, validation, actor pool, artifacts, result table, summary.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import resume
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


def run_demo(output: str) -> None:
    output = str(Path(output).resolve())
    manifest = media.join(output, "manifests", "eval.parquet")
    with media.atomic_write(manifest) as f:
        pq.write_table(eval_manifest(), f)
    out = media.join(output, "evaluate")
    run_job(JobSpec(method="evaluate", manifest=manifest, output=out, models={"clip": "tiny"}))
    results = resume.latest(resume.read_results(media.join(out, "results")))
    print("\nper-row results (tiny random CLIP: the values only show the path works):")
    for row in results.select(
        ["id", "status", "clip_text", "clip_temporal", "clip_image", "clip_style"]
    ).to_pylist():
        cells = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"  {cells}")
    print(f"\ndemo outputs are under {output}")

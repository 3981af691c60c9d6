"""The progress line's arithmetic and its once-per-id error messages (the job-submit test sees it live)."""

from __future__ import annotations

import io

from jobs.progress import Progress


def test_rows_are_counted_once_and_each_error_is_reported_once_with_its_id():
    progress = Progress(total=4, gpus=2.0, stream=io.StringIO())
    first = progress.add([("a", "ok", None), ("b", "error", "row 'b': cannot decode video")])
    again = progress.add(
        [("b", "error", "row 'b': cannot decode video"), ("c", "ok", None)]
    )  # a retried task
    assert first == ["[anima] error: row 'b': cannot decode video"] and again == []
    line = progress.line(now=progress.started + 30.0)
    # 3 rows in 30 s on 2 GPUs: 0.1 rows/s, 1 row left -> 10 s; 3 / (30 s x 2 GPUs) = 180 items per GPU-hour.
    assert line == "[anima] 3/4 rows (ok 2, error 1), 0.10 rows/s, ETA 10s, 180.0 items/GPU-h"


def test_a_cpu_job_says_it_has_no_gpus_and_a_finished_one_says_done():
    progress = Progress(total=1, gpus=0.0, stream=io.StringIO())
    assert progress.line(now=progress.started + 1.0).endswith("ETA unknown, no GPUs")
    progress.add([("a", "ok", None)])
    assert "ETA done" in progress.line(now=progress.started + 2.0)

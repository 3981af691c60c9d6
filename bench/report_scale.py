"""How long `anima report` takes to build, and the page to show its first page, for many result rows.

    python bench/report_scale.py [--rows 100000] [--table-rows 10000] [--chromium chromium]

Synthetic result rows without media (every row previewed as "no output"): the cost measured is the
table's data, not thumbnails. The table holds `--table-rows` of the ids (the report's cap, errors
first); counts and histograms are built over all of them. The first-page time is the page's own
`performance.now()` when its first render finished (from navigation start: parsing the HTML and its
JSON blob included), in headless chromium.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jobs.report import TABLE_ROWS, write_report
from schemas import ERROR, OK, ResultRow, result_table

REASONS = ["CUDA out of memory; lower batch size", "cannot decode video", "empty prompt"]


def synthetic_output(root: Path, rows: int) -> Path:
    rng = np.random.default_rng(0)
    now = dt.datetime.now(dt.UTC)
    failed = rng.random(rows) < 0.05
    table = result_table(
        [
            ResultRow(
                id=f"row-{i:06d}",
                method="livesketch",
                status=ERROR if failed[i] else OK,
                error=f"row 'row-{i:06d}': {REASONS[i % 3]}" if failed[i] else None,
                metrics={}
                if failed[i]
                else {"clip_image": rng.normal(0.95, 0.02), "clip_text": rng.normal(0.2, 0.05)},
                seconds=float(rng.uniform(30, 90)),
                peak_memory_mb=float(rng.uniform(9000, 12000)),
                finished_at=now,
                run_id="bench",
            )
            for i in range(rows)
        ]
    )
    (root / "results").mkdir(parents=True)
    pq.write_table(table, root / "results" / "bench.parquet")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--table-rows", type=int, default=TABLE_ROWS, help="ids in the page's table")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        output = synthetic_output(Path(tmp) / "out", args.rows)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        index = Path(write_report([str(output)], table_rows=args.table_rows))
        built = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        table = min(args.rows, args.table_rows)
        print(
            f"{args.rows} rows ({table} in the table): report built in {built:.1f} s, "
            f"index.html {index.stat().st_size / 2**20:.1f} MiB, peak RSS {peak:.0f} MB (before {before:.0f})"
        )
        start = time.perf_counter()
        run = subprocess.run(
            [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp}/profile",
             "--virtual-time-budget=60000", "--dump-dom", index.as_uri()],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - start
        found = re.search(r'data-first-render-ms="(\d+)"', run.stdout)
        shown = run.stdout.count('<td class="id">')
        first = f"{int(found[1]) / 1000:.2f} s" if found else "not rendered"
        print(
            f"first page ({shown} rows) rendered {first} after navigation start; "
            f"chromium ran {wall:.1f} s in all"
        )


if __name__ == "__main__":
    main()

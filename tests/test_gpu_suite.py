"""`bench/gpu_suite.py --small`: the suite meant for the day a GPU is lent runs through on this CPU.

No GPU has been lent to this project yet, and a device session has minutes, not hours: the suite must
not be found broken there. Its numbers are not checked here (CPU timings at tiny sizes mean little),
only that every method ran and reported what the table prints.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"


def test_the_gpu_suite_runs_every_method_at_tiny_sizes(tmp_path):
    report = tmp_path / "suite.json"
    run = subprocess.run(
        [sys.executable, str(SUITE), "--small", "--device", "cpu", "--json", str(report)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(report.read_text())["results"]
    assert list(results) == ["livesketch", "dreammotion", "dynamicrafter", "stylecrafter", "clip"]
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not failed, failed
    for name, r in results.items():
        assert math.isfinite(r["s_per_item_b1"]), (name, r)
        assert r["item"] in run.stdout, name  # the printed table has a line for it
    for name in ("livesketch", "dynamicrafter", "stylecrafter"):  # batched: batch 4 against batch 1
        assert math.isfinite(results[name]["ratio"]), results[name]
    assert results["clip"]["rows_per_s"] > 0 and results["clip"]["rows_per_s_cropping_in_actor"] > 0

"""The README's cluster path: `ray job submit --working-dir . -- python -m jobs ...` to a real head."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+) and above Ray's worker ports (10002-19999).

    An ephemeral port free now can be taken by any outgoing connection before `ray start` binds it (the
    GCS then fails with "address already in use"); few processes bind in this range by themselves.
    """
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _start_head(env: dict[str, str], attempts: int = 3) -> tuple[subprocess.Popen, int, str]:
    """`ray start --head --block` on ports of its own; started again on new ports if it exits early."""
    for _ in range(attempts):
        gcs_port, dashboard_port, agent_port, agent_grpc, env_agent, metrics = (
            _free_port() for _ in range(6)
        )
        # Short: Ray's socket paths must stay under 108 bytes.
        temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--block",
             # Ports of its own: the session's test cluster may hold Ray's default agent ports.
             f"--dashboard-agent-listen-port={agent_port}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 90
        while head.poll() is None and time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", dashboard_port)) == 0:
                    return head, dashboard_port, temp_dir
            time.sleep(1)
        _stop_head(head, temp_dir)
    raise RuntimeError(f"ray start --head did not open its dashboard in {attempts} attempts")


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_an_evaluation_on_a_local_head(data_dir, tmp_path):
    videos = sorted((data_dir / "videos").glob("*.mp4")) or sorted(data_dir.glob("*.mp4"))
    manifest = tmp_path / "eval.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [v.stem for v in videos],
                "video": [str(v) for v in videos],
                "prompt": ["a clip"] * len(videos),
            }
        ),
        manifest,
    )
    output = tmp_path / "out"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    head, dashboard_port, temp_dir = _start_head(env)
    try:
        command = [
            RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
            "--working-dir", str(REPO), "--", "python", "-m", "jobs", "evaluate",
            "--manifest", str(manifest), "--output", str(output), "--clip", "tiny", "--set", "num_frames=4",
        ]  # fmt: skip
        for _ in range(30):
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
            # The dashboard answers before its job agent is up on a slow machine; Ray says to retry.
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
        summary = json.loads((output / "summary.json").read_text())
        assert (summary["processed"], summary["ok"]) == (len(videos), len(videos))
        assert f"processed {len(videos)}" in submit.stdout
        # The driver's progress line reaches the job's logs, which `ray job submit` streams.
        n = len(videos)
        assert re.search(
            rf"\[anima\] {n}/{n} rows \(ok {n}, error 0\), [\d.]+ rows/s, ETA done", submit.stdout
        )
        assert "logging_progress" not in submit.stdout  # Ray Data's own progress blocks are off
    finally:
        _stop_head(head, temp_dir)

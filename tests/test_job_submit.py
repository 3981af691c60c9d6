"""The README's cluster path: `ray job submit --working-dir . -- python -m jobs ...` to a real head."""

from __future__ import annotations

import json
import os
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise TimeoutError(f"dashboard did not open port {port}")


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
    gcs_port, dashboard_port, agent_port, agent_grpc, env_agent, metrics = (_free_port() for _ in range(6))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--block",
         # Ports of its own: the session's test cluster may hold Ray's default agent ports.
         f"--dashboard-agent-listen-port={agent_port}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_dashboard(dashboard_port, head)
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
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)

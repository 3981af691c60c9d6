"""Manifests, inputs, artifacts and results in an S3 bucket, end to end, against a local S3 endpoint.

moto's server (what s3fs's own tests use) listens on loopback at AWS_ENDPOINT_URL, which conftest sets
before Ray starts so that every worker's s3fs reaches it. Nothing here talks to the internet.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import resume
from jobs.cli import main
from pipelines import media

BUCKET = "anima-test"


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
    server = ThreadedMotoServer(ip_address=endpoint.hostname, port=endpoint.port, verbose=False)
    server.start()
    fs = fsspec.filesystem("s3")
    fs.mkdir(BUCKET)
    yield fs
    server.stop()


def _upload(fs, local: Path, key: str) -> str:
    fs.put_file(str(local), f"{BUCKET}/{key}")
    return f"s3://{BUCKET}/{key}"


def _latest(output: str) -> dict[str, dict]:
    return {r["id"]: r for r in resume.latest(resume.read_results(f"{output}/results")).to_pylist()}


def test_evaluate_reads_and_writes_a_bucket_and_resumes_from_it(ray_cluster, s3, data_dir, tmp_path):
    videos = sorted((data_dir / "videos").glob("*.mp4"))[:3]
    uris = [_upload(s3, v, f"inputs/{v.name}") for v in videos]
    table = pa.table(
        {
            "id": [v.stem for v in videos] + ["gone"],
            "video": [*uris, f"s3://{BUCKET}/inputs/gone.mp4"],
            "prompt": ["a clip"] * (len(videos) + 1),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    _upload(s3, tmp_path / "m.parquet", "manifests/eval/part-0.parquet")
    output = f"s3://{BUCKET}/runs/eval"
    args = ["evaluate", "--manifest", f"s3://{BUCKET}/manifests/eval/", "--output", output, "--clip", "tiny"]
    assert main([*args, "--set", "num_frames=4"]) == 0
    rows = _latest(output)
    assert sorted(rows) == sorted(table.column("id").to_pylist())
    assert all(rows[v.stem]["status"] == "ok" and rows[v.stem]["clip_text"] is not None for v in videos)
    assert "not found" in rows["gone"]["error"] and "s3://" in rows["gone"]["error"]
    results = s3.find(f"{BUCKET}/runs/eval/results")
    assert len(results) == 1 and "_part-" in results[0], results  # the run's files, compacted
    assert s3.exists(f"{BUCKET}/runs/eval/summary.json")
    assert not s3.find(f"{BUCKET}/runs/eval/_inflight")

    assert main([*args, "--set", "num_frames=4"]) == 0  # resume: everything settled
    assert len(s3.find(f"{BUCKET}/runs/eval/results")) == 1
    again = resume.read_results(f"{output}/results", ["id"])
    assert again.num_rows == len(rows)


def test_generate_writes_its_artifacts_into_the_bucket(ray_cluster, s3, data_dir, tmp_path):
    image = _upload(s3, data_dir / "images" / "dance1.jpeg", "inputs/dance1.jpeg")
    pq.write_table(pa.table({"id": ["dance"], "image": [image], "prompt": ["two people dancing"]}),
                   tmp_path / "m.parquet")  # fmt: skip
    manifest = _upload(s3, tmp_path / "m.parquet", "manifests/images.parquet")
    output = f"s3://{BUCKET}/runs/animate"
    sets = ["steps=2", "num_frames=4", "height=64", "width=64"]
    args = ["generate", "dynamicrafter", "--manifest", manifest, "--output", output, "--backbone", "tiny"]
    args += ["--clip", "tiny"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    [row] = _latest(output).values()
    assert row["status"] == "ok", row["error"]
    mp4 = dict(row["outputs"])["mp4"]
    assert mp4.startswith(f"s3://{BUCKET}/runs/animate/artifacts/dance/")
    info = media.video_info(mp4)
    assert (info.num_frames, info.height, info.width) == (4, 64, 64)


def test_a_writer_killed_mid_write_leaves_no_object(s3):
    """Artifacts are one PUT of a whole buffer (`media.atomic_write`), and result files go through s3fs,
    whose multipart upload completes only when the file is closed: a process killed while writing either
    leaves nothing under the key, never a truncated object that a resume would take as complete."""
    artifact = f"s3://{BUCKET}/runs/killed/artifacts/a/video.mp4"
    results = f"{BUCKET}/runs/killed/results/run_000.parquet"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import fsspec, pyarrow as pa, pyarrow.parquet as pq
        from pyarrow.fs import FSSpecHandler, PyFileSystem
        from pipelines import media
        if sys.argv[1] == "artifact":
            with media.atomic_write({artifact!r}) as f:
                f.write(b"x" * 8_000_000)
                os.kill(os.getpid(), signal.SIGKILL)
        filesystem = PyFileSystem(FSSpecHandler(fsspec.filesystem("s3")))
        column = pa.array([os.urandom(1000) for _ in range(4000)])
        with pq.ParquetWriter({results!r}, pa.schema([("x", pa.binary())]), filesystem=filesystem) as w:
            for _ in range(4):  # 16 MB written, then killed before close
                w.write_table(pa.table({{"x": column}}))
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    for what in ("artifact", "results"):
        done = subprocess.run(
            [sys.executable, "-c", script, what], cwd=Path(__file__).parents[1], check=False
        )
        assert done.returncode == -9, what
    s3.invalidate_cache()
    assert not s3.exists(artifact.removeprefix("s3://")) and not s3.exists(results)
    assert resume.read_results(f"s3://{BUCKET}/runs/killed/results") is None
    media.write_bytes(b"whole", artifact)  # the same write, not killed, does land
    assert media.read_bytes(artifact) == b"whole"

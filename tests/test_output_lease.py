"""One job at a time per OUTPUT (jobs/output_lease.py), without Ray: a refused job never starts it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import output_lease
from jobs.cli import main
from jobs.output_lease import OutputInUse


@pytest.fixture
def quick(monkeypatch):
    """Renewals every 0.1 s, and a lease stale after 1 s unrenewed."""
    monkeypatch.setattr(output_lease, "RENEW_S", 0.1)
    monkeypatch.setattr(output_lease, "STALE_S", 1.0)


def test_a_second_job_on_a_held_output_is_refused_and_the_first_keeps_it(quick, tmp_path, capsys):
    manifest, output = tmp_path / "m.parquet", tmp_path / "out"
    pq.write_table(pa.table({"id": ["a", "b"], "video": ["a.mp4", "b.mp4"]}), manifest)
    lease = output / output_lease.LEASE
    with output_lease.held(str(output), "run-first"):
        assert json.loads(lease.read_text())["run_id"] == "run-first"
        code = main(["evaluate", "--manifest", str(manifest), "--output", str(output), "--clip", "none"])
        assert code == 2
        err = capsys.readouterr().err
        assert "in use by run run-first" in " ".join(err.split()), err
        assert not (output / "results").exists() and not (output / "runs").exists()  # nothing was touched
        assert json.loads(lease.read_text())["run_id"] == "run-first"
    assert not lease.exists()  # released when its job ended


def test_a_lease_whose_process_is_gone_is_taken_over_at_once(quick, tmp_path):
    """A driver killed on this machine (the head node kept its disk): its resumed job does not wait."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    output = tmp_path / "out"
    output.mkdir()
    with output_lease.held(str(output), "run-killed"):
        record = json.loads((output / output_lease.LEASE).read_text())
    (output / output_lease.LEASE).write_text(json.dumps({**record, "pid": int(gone.stdout)}))
    start = time.monotonic()
    with output_lease.held(str(output), "run-resumed"):
        assert json.loads((output / output_lease.LEASE).read_text())["run_id"] == "run-resumed"
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("left", ["another host's", "unreadable"])
def test_a_lease_that_is_not_renewed_is_taken_over_once_stale(quick, tmp_path, left):
    """A driver preempted with its node: its lease names a host this one cannot look into."""
    output = tmp_path / "out"
    output.mkdir()
    record = {"run_id": "run-preempted", "host": "node-gone", "pid": 1, "since": "-", "renewals": 3}
    (output / output_lease.LEASE).write_text(json.dumps(record) if left == "another host's" else "{not json")
    start = time.monotonic()
    with output_lease.held(str(output), "run-resumed"):
        waited = time.monotonic() - start
        assert json.loads((output / output_lease.LEASE).read_text())["run_id"] == "run-resumed"
    assert waited >= (output_lease.STALE_S if left == "another host's" else 0) and waited < 3


def test_a_job_that_waits_is_refused_when_another_took_the_lease_over_meanwhile(quick, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    lease = output / output_lease.LEASE
    lease.write_text(json.dumps({"run_id": "run-preempted", "host": "node-gone", "pid": 1}))
    other = {"run_id": "run-other", "host": "node-b", "pid": 7, "renewals": 0}
    takeover = threading.Timer(0.3, lambda: lease.write_text(json.dumps(other)))
    takeover.start()
    with pytest.raises(OutputInUse, match="in use by run run-other"), output_lease.held(str(output), "late"):
        pytest.fail("held an output another job holds")
    takeover.join()
    assert json.loads(lease.read_text())["run_id"] == "run-other"


def test_a_holder_that_was_taken_over_stops_renewing_and_leaves_the_new_lease(quick, tmp_path, capsys):
    """A job that stalled past the stale time (a suspended machine) must not take its lease back, nor
    remove the new holder's when it ends."""
    output = tmp_path / "out"
    lease = output / output_lease.LEASE
    other = {"run_id": "run-other", "host": "node-b", "pid": 7, "renewals": 0}
    with output_lease.held(str(output), "run-stalled"):
        lease.write_text(json.dumps(other))
        time.sleep(4 * output_lease.RENEW_S)
        assert json.loads(lease.read_text()) == other
    assert json.loads(lease.read_text()) == other
    assert "run run-other (host node-b, pid 7" in capsys.readouterr().out


def test_a_lease_of_the_same_host_name_on_another_machine_is_not_judged_by_its_pid(quick, tmp_path):
    """Containers on different machines may share a host name: a pid there says nothing here."""
    output = tmp_path / "out"
    with output_lease.held(str(output), "run-elsewhere"):
        record = json.loads((output / output_lease.LEASE).read_text())
    gone = {**record, "pid": 2**22 + 1, "boot": "another-machine"}  # no such pid here either
    (output / output_lease.LEASE).write_text(json.dumps(gone))
    start = time.monotonic()
    with output_lease.held(str(output), "run-here"):
        pass
    assert time.monotonic() - start >= output_lease.STALE_S  # waited for renewals, as for any other host


def test_two_jobs_that_take_a_free_lease_at_the_same_moment_do_not_both_run(tmp_path, monkeypatch):
    """Each finds no lease, and each writes its own before the other reads its back: on a slow store
    (every write 0.2 s) the second job's read, 0.05 s after the first's, still finds none. Only the
    later writer may run."""
    write = output_lease.media.write_text

    def slow_write(text: str, uri: str) -> str:
        time.sleep(0.2)
        return write(text, uri)

    monkeypatch.setattr(output_lease.media, "write_text", slow_write)
    output = tmp_path / "out"
    output.mkdir()
    ran, refused = [], []

    def job(run_id: str) -> None:
        try:
            with output_lease.held(str(output), run_id):
                ran.append(run_id)
                time.sleep(0.5)
        except OutputInUse:
            refused.append(run_id)

    threads = [threading.Thread(target=job, args=(run_id,)) for run_id in ("run-a", "run-b")]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert len(ran) == 1 and sorted(ran + refused) == ["run-a", "run-b"], (ran, refused)


def test_a_stale_lease_is_taken_over_only_just_after_a_read_that_answered(quick, tmp_path, monkeypatch):
    """The store stops answering around the stale time: the job waits for a read that answers, since its
    recheck against a job taking over beside it is timed from its last read."""
    output = tmp_path / "out"
    output.mkdir()
    record = {"run_id": "run-preempted", "host": "node-gone", "pid": 1, "since": "-", "renewals": 3}
    (output / output_lease.LEASE).write_text(json.dumps(record))
    read, start = output_lease._read, time.monotonic()

    def silent_store(uri: str):
        if 0.8 < time.monotonic() - start < 1.8:
            raise OSError("the store did not answer")
        return read(uri)

    monkeypatch.setattr(output_lease, "_read", silent_store)
    with output_lease.held(str(output), "run-resumed"):
        assert time.monotonic() - start >= 1.8  # not at the stale time (1 s), after a failed read

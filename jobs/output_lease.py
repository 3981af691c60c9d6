"""One job at a time per OUTPUT: a lease file (OUTPUT/lease.json) that the running job renews.

A second copy of a job on the same output (submitted twice, or rerun while the first still runs) would
clear the first's crash markers when it ends, compact the same files as the first and so keep their
rows twice, and run every pending row a second time. It is refused instead.

Whether the holder lives is read from its renewals, not from clocks, which differ between nodes: a job
that finds a lease waits for it to be renewed (then it is refused) or to go unrenewed for `STALE_S`
(its holder was killed or preempted: it takes over). A holder on this machine whose process is gone is
known dead at once.

Object stores offer fsspec no create-if-absent, so two jobs may each find the lease free (or stale) and
write their own. A job that wrote it reads it back at once, and again after twice the time its own
last read and write took: another job that read before this one's write landed wrote within about
that time, and the later writer keeps the lease. A window stays where the other job's read and write
took over twice as long (a much slower store or network, a process paused between them) or over 5 s
(the wait is at most a renewal's time).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipelines import media

LEASE = "lease.json"
RENEW_S = 10.0
STALE_S = 45.0  # several renewals: a slow store or a busy driver may delay one


class OutputInUse(RuntimeError):
    """Another job holds the output: refused before this one reads or writes anything there."""


@contextmanager
def held(output: str, run_id: str) -> Iterator[None]:
    """Hold OUTPUT's lease for the block, renewed every `RENEW_S` s; waits out a lease whose holder may
    be dead, raises OutputInUse when it lives or when another job wrote the lease at the same moment."""
    uri = media.join_under(output, LEASE)
    last_read = _wait_for_holder(uri, output)
    mine = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": os.getpid(),
        "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "renewals": 0,
    }
    media.write_text(json.dumps(mine), uri)
    # At most a renewal's time: the lease is not renewed meanwhile.
    for settle in (0.0, min(2 * (time.monotonic() - last_read), RENEW_S)):
        time.sleep(settle)
        now = _read(uri)
        if now is None:  # a holder that had stalled released it as it ended, removing ours
            raise OutputInUse(
                f"the lease of output {output} was removed while this job took it (a job that had stalled "
                "released it as it ended); run this job again"
            )
        if now != mine:  # another job wrote between our read and our write; the later write holds it
            raise OutputInUse(f"output {output} was taken at the same moment by {_describe(now)}")
    done = threading.Event()
    renewer = threading.Thread(target=_renew, args=(uri, mine, done), name="anima-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        try:
            if (_read(uri) or {}).get("run_id") == run_id:  # one that took over after a stall keeps its own
                media.remove(uri)
        except Exception as exc:  # the job's result stands; the next job waits the lease out
            print(f"[anima] warning: could not release the output's lease {uri}: {exc}", flush=True)


def _renew(uri: str, mine: dict[str, Any], done: threading.Event) -> None:
    """Renew the lease until the job ends, unless another job took it over (this one stalled past
    `STALE_S`): then stop, so as not to take it back, and say so."""
    while not done.wait(RENEW_S):
        try:
            now = _read(uri)
            if now is not None and now.get("run_id") != mine["run_id"]:
                print(
                    f"[anima] warning: {_describe(now)} took this output over after this job did not renew "
                    f"its lease for {STALE_S:g} s; both jobs now run on it: stop one of them",
                    flush=True,
                )
                return
            mine["renewals"] += 1
            media.write_text(json.dumps(mine), uri)
        except Exception as exc:  # a store's hiccup: the next renewal may pass, and the job goes on
            print(f"[anima] warning: could not renew the output's lease {uri}: {exc}", flush=True)


def _read(uri: str) -> dict[str, Any] | None:
    """The lease, or None when there is none (or it is not a lease: one is only ever written whole).
    A store that cannot be read raises."""
    data = media.read_bytes_if_exists(uri)
    try:
        lease = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return lease if isinstance(lease, dict) else None


def _boot_id() -> str | None:
    """This machine's boot, which tells apart machines (containers) of the same host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_gone(lease: dict[str, Any]) -> bool:
    """Whether the holder ran on this machine in a process that has ended."""
    here = lease.get("host") == socket.gethostname() and lease.get("boot") == _boot_id()
    if not here or type(lease.get("pid")) is not int:
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process of that number
        return False
    return False


def _describe(lease: dict[str, Any]) -> str:
    return (
        f"run {lease.get('run_id')} (host {lease.get('host')}, pid {lease.get('pid')}, "
        f"since {lease.get('since')})"
    )


def _wait_for_holder(uri: str, output: str) -> float:
    """Return once the output is free or its holder is known dead (when it last read the lease, in
    `time.monotonic()`); raise OutputInUse when its holder renews."""
    read_at = time.monotonic()
    lease = _read(uri)
    if lease is None:
        return read_at
    holder = _describe(lease)
    if _process_gone(lease):
        print(f"[anima] output {output}: {holder} ended without releasing it; taking it over", flush=True)
        return read_at
    print(
        f"[anima] output {output} is held by {holder}; waiting up to {STALE_S:g} s for it to renew its lease",
        flush=True,
    )
    deadline = time.monotonic() + STALE_S
    while True:
        time.sleep(min(1.0, RENEW_S / 4))
        read_at = time.monotonic()
        try:
            now = _read(uri)
        except Exception:
            # No news, and no ground to take over: the lease is taken only just after a read that
            # answered (`held` times its recheck from it). A store silent for as long again fails the job.
            if read_at < deadline + STALE_S:
                continue
            raise
        if now is None:  # released: that job ended
            return read_at
        if now != lease:  # renewed, or taken over by another job that waited
            raise OutputInUse(
                f"output {output} is in use by {_describe(now)}, which renewed its lease ({uri}); wait "
                "for it to end, or give this job another --output"
            )
        if read_at >= deadline:
            break
    print(
        f"[anima] output {output}: {holder} did not renew its lease in {STALE_S:g} s; taking it over",
        flush=True,
    )
    return read_at

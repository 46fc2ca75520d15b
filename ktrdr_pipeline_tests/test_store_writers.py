"""Concurrent writers of the bar store (issue 14): the per-partition write lock, the
read-merge-write of two loads of one month, and the leftovers of killed writers.

Waits are for states (a process blocked in ``flock`` per /proc/locks, a thread done), each
with a deadline, never for a fixed time."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from ktrdr_pipeline.locking import FileLockTimeout, exclusive_file_lock
from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.store.locks import FilePartitionLock, PartitionLock
from ktrdr_pipeline.store.parquet import BarStore

from .test_locking import WAIT_S, Other, _blocked_in_flock, _wait_for
from .test_store import kill_mid_write, minute_frame, subprocess_env, write

REPO = Path(__file__).resolve().parents[1]
needs_proc_locks = pytest.mark.skipif(not Path("/proc/locks").exists(),
                                      reason="needs Linux's /proc/locks")


def _writer_thread(store: BarStore, frame: pd.DataFrame) -> threading.Thread:
    thread = threading.Thread(target=write, args=(store, "1m", "AAPL", "2024-03", frame),
                              daemon=True)
    thread.start()
    return thread


# -- the lock -------------------------------------------------------------------------------
def test_the_file_lock_implements_the_protocol_outside_the_partition_dirs(tmp_path):
    lock = FilePartitionLock(tmp_path)
    assert isinstance(lock, PartitionLock)
    assert lock.path("1m", "AAPL", "2024-03") == (
        tmp_path / "locks/bars/timeframe=1m/symbol=AAPL/period=2024-03.lock")
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 5))
    assert lock.path("1m", "AAPL", "2024-03").is_file()
    directory = store.path("1m", "AAPL", "2024-03").parent
    assert sorted(p.name for p in directory.iterdir()) == ["data.parquet"]


@needs_proc_locks
def test_a_writer_in_another_process_blocks_a_write_until_it_lets_go(tmp_path):
    store = BarStore(tmp_path)
    other = Other(FilePartitionLock(tmp_path).path("1m", "AAPL", "2024-03"))
    try:
        other.expect("trying")
        other.expect("acquired")
        thread = _writer_thread(store, minute_frame("2024-03-04 14:30", 5))
        _wait_for(lambda: _blocked_in_flock(os.getpid()), "the write to wait for the lock")
        assert thread.is_alive() and not store.path("1m", "AAPL", "2024-03").exists()
        other.let_go()
        other.expect("released")
        thread.join(WAIT_S)
        assert not thread.is_alive()
        assert len(store.read("1m", "AAPL", "2024-03")) == 5
    finally:
        other.close()


@needs_proc_locks
def test_a_read_merge_write_keeps_other_threads_writers_out_and_is_reentrant(tmp_path):
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 5))
    with store.locked("1m", "AAPL", "2024-03"):
        thread = _writer_thread(store, minute_frame("2024-03-05 14:30", 7))
        _wait_for(lambda: _blocked_in_flock(os.getpid()), "the other thread to wait")
        current = store.read("1m", "AAPL", "2024-03")
        merged = pd.concat([current, minute_frame("2024-03-06 14:30", 3)]).sort_index()
        write(store, "1m", "AAPL", "2024-03", merged)  # re-entrant: no deadlock
        assert thread.is_alive()
        assert len(store.read("1m", "AAPL", "2024-03")) == 8
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert len(store.read("1m", "AAPL", "2024-03")) == 7  # it wrote after us


def test_a_lock_held_too_long_is_a_clear_error(tmp_path):
    lock = FilePartitionLock(tmp_path, timeout_s=0.2)
    store = BarStore(tmp_path, lock=lock)
    with exclusive_file_lock(lock.path("1m", "AAPL", "2024-03")):
        with pytest.raises(FileLockTimeout, match=r"period=2024-03\.lock stayed locked"):
            write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 5))
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 5))  # free again


def test_a_store_takes_any_partition_lock(tmp_path):
    held: list[tuple[str, str, str]] = []

    class Recording:
        def hold(self, timeframe, symbol, period):
            import contextlib

            @contextlib.contextmanager
            def block():
                held.append((timeframe, symbol, period))
                yield

            return block()

    store = BarStore(tmp_path, lock=Recording())
    with store.locked("1m", "AAPL", "2024-03"):
        write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 5))
    store.delete("1m", "AAPL", "2024-03")
    assert held == [("1m", "AAPL", "2024-03")] * 2
    assert not (tmp_path / "locks").exists()


# -- leftovers of killed writers --------------------------------------------------------------
def test_a_killed_writers_leftover_is_removed_by_a_write_of_another_period(tmp_path):
    store = BarStore(tmp_path)
    old = minute_frame("2024-03-04 14:30", 50)
    write(store, "1m", "AAPL", "2024-03", old)
    kill_mid_write(tmp_path, minute_frame("2024-03-05 14:30", 70))
    march = store.path("1m", "AAPL", "2024-03").parent
    assert len([p for p in march.iterdir() if p.name.endswith(".tmp")]) == 1
    # a temporary file of a live writer (our parent) in a third period stays
    live = store.path("1m", "AAPL", "2024-05").parent / f"data.parquet.{os.getppid()}.ab12.tmp"
    live.parent.mkdir(parents=True)
    live.write_bytes(b"partial")
    # the next run (a new store object) writes April only
    rerun = BarStore(tmp_path, lock=FilePartitionLock(tmp_path, timeout_s=WAIT_S))
    write(rerun, "1m", "AAPL", "2024-04", minute_frame("2024-04-02 14:30", 5))
    assert sorted(p.name for p in march.iterdir()) == ["data.parquet"]
    assert live.exists()
    pd.testing.assert_frame_equal(rerun.read("1m", "AAPL", "2024-03"), old)
    # the killed writer's lock died with it: March can be rewritten at once
    write(rerun, "1m", "AAPL", "2024-03", minute_frame("2024-03-05 14:30", 70))
    assert len(rerun.read("1m", "AAPL", "2024-03")) == 70


def test_sweep_counts_and_spares_live_writers(tmp_path):
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 5))
    write(store, "1m", "SPY", "2024-03", minute_frame("2024-03-04 14:30", 5))
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    directory = store.path("1m", "SPY", "2024-03").parent
    (directory / f"data.parquet.{dead}.00ff.tmp").write_bytes(b"x")
    (directory / f"data.parquet.{os.getppid()}.00ff.tmp").write_bytes(b"x")
    assert store.sweep_stale_tmp("1m", "AAPL") == 0
    assert store.sweep_stale_tmp() == 1
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == [
        f"data.parquet.{os.getppid()}.00ff.tmp"]


# -- two loads of one month at the same time --------------------------------------------------
CLOCK = "2026-11-18T15:00:00+00:00"


def _load(data_dir: Path, port: int, client_id: int, *window: str) -> subprocess.Popen:
    env = {**subprocess_env(), "KTRDR_DATA_DIR": str(data_dir), "IB_PORT": str(port),
           "IB_CLIENT_ID": str(client_id), "KTRDR_CLOCK": CLOCK, "KTRDR_RESET_WINDOW": "off",
           "KTRDR_TIMEFRAMES": "1m", "DAGSTER_HOME": str(data_dir / "dagster")}
    args = ["load", "AAPL", "--timeframe", "1m"]
    if window:
        args += ["--start", window[0], "--end", window[1]]
    return subprocess.Popen([sys.executable, "-m", "ktrdr_pipeline.cli", *args, "--json"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out, err


@pytest.mark.slow
@needs_proc_locks
def test_two_loads_of_one_month_at_once_store_the_union(tmp_path):
    data_dir, clean_dir = tmp_path / "data", tmp_path / "clean"
    with GatewayThread(clock=datetime.fromisoformat(CLOCK), latency="none") as gw:
        lock = FilePartitionLock(data_dir)
        # hold the month's lock: both loads fetch (the fetch takes no lock), then both wait
        # to merge — they overlap for certain, and neither has written when the other
        # fetched, which is exactly the race that lost an update
        with lock.hold("1m", "AAPL", "2024-12"):
            first = _load(data_dir, gw.port, 301, "2024-12-01", "2024-12-15")
            second = _load(data_dir, gw.port, 311, "2024-12-16", "2024-12-31")
            for proc in (first, second):
                _wait_for(lambda p=proc: _blocked_in_flock(p.pid) or p.poll() is not None,
                          "both loads to have fetched and to wait for the partition")
                assert proc.poll() is None, proc.communicate()[1]
            assert not BarStore(data_dir).path("1m", "AAPL", "2024-12").exists()
        logs = _finish(first)[1] + _finish(second)[1]
    # the reference: one load of the whole month (a fresh gateway: its pacing is IB's)
    with GatewayThread(clock=datetime.fromisoformat(CLOCK), latency="none") as gw:
        _finish(_load(clean_dir, gw.port, 321, "2024-12-01", "2024-12-31"))
    got, got_meta = BarStore(data_dir).read_with_meta("1m", "AAPL", "2024-12")
    want, want_meta = BarStore(clean_dir).read_with_meta("1m", "AAPL", "2024-12")
    assert logs.count("another writer holds the partition; waiting for it") == 2
    assert "was written by another writer while this load fetched; merging" in logs
    assert len(want) == 3900 + 4110  # 10 sessions + 10 sessions and the half day
    pd.testing.assert_frame_equal(got, want)
    assert got_meta.rows == want_meta.rows == len(want)
    for name in ("partial_from", "asked_until", "empty_runs", "use_rth", "what_to_show"):
        assert getattr(got_meta, name) == getattr(want_meta, name), name

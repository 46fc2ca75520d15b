"""The partition manifest agrees with the Parquet files after every kind of write: loads
(tail, again, full), deletes, concurrent writers in threads and processes, a writer killed
before and after its rename; a lost manifest is rebuilt by the documented command."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ktrdr_pipeline.domain.bars import FetchState, empty_bars
from ktrdr_pipeline.freshness import behind, tail_behind
from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.store import catalog as cat
from ktrdr_pipeline.store.manifest import MANIFEST_FILE, ManifestEntry, SqliteManifest
from ktrdr_pipeline.store.parquet import BarStore

from .test_store import minute_frame, subprocess_env, write

REPO = Path(__file__).resolve().parents[1]
CLOCK = datetime(2025, 1, 15, 15, 0, tzinfo=UTC)


def assert_agrees(store: BarStore) -> None:
    """The manifest lists exactly the stored partitions, each as its file says."""
    assert store.check_manifest() == []
    listed = [e.key for e in store.entries()]
    assert listed == store.partitions()
    for entry in store.entries():
        assert entry == store.entry_from_file(*entry.key)
        frame, meta = store.read_with_meta(*entry.key)
        assert entry.rows == len(frame) == meta.rows
        if len(frame):
            assert entry.as_datetime(entry.first_bar) == frame.index[0]
            assert entry.as_datetime(entry.last_bar) == frame.index[-1]
        assert entry.meta == meta
        assert (entry.use_rth, entry.what_to_show) == (meta.use_rth, meta.what_to_show)


def test_every_write_and_delete_keeps_the_manifest(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    assert store.entries() == [] and not (tmp_path / MANIFEST_FILE).exists()
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50), con_id="1")
    write(store, "1m", "AAPL", "2024-04", minute_frame("2024-04-02 14:30", 20))
    write(store, "1d", "AAPL", "2024", minute_frame("2024-03-04", 30, "1D"))
    write(store, "1m", "SPY", "2024-03", empty_bars())  # a period without bars
    assert_agrees(store)
    # a rewrite (more bars, another fetch state) replaces the row
    frame = minute_frame("2024-03-04 14:30", 80)
    partial = int(frame.index[-1].timestamp())
    store.write("1m", "AAPL", "2024-03", frame, use_rth=False, what_to_show="MIDPOINT",
                fetch=FetchState(partial_from=partial, asked_until=partial + 60,
                                 empty_runs=((1, 2),)))
    assert_agrees(store)
    entry = store.entry("1m", "AAPL", "2024-03")
    assert (entry.rows, entry.use_rth, entry.what_to_show) == (80, False, "MIDPOINT")
    # the bar in progress at the fetch is not completed
    assert entry.as_datetime(entry.last_completed) == frame.index[-2]
    assert entry.meta.fetch.partial_from == partial
    assert entry.path == "bars/timeframe=1m/symbol=AAPL/period=2024-03/data.parquet"
    assert entry.size == store.path("1m", "AAPL", "2024-03").stat().st_size
    assert store.delete("1m", "AAPL", "2024-04")
    assert not store.delete("1m", "AAPL", "2024-04")
    assert_agrees(store)
    assert [c.partitions for c in store.coverage()] == [1, 1]  # SPY's period is empty


def test_coverage_and_ranges_read_the_manifest_not_the_files(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50))
    write(store, "1m", "AAPL", "2024-04", minute_frame("2024-04-02 14:30", 20))
    want = cat.run_query(tmp_path, "SELECT * FROM coverage").rows
    # a file's bytes replaced behind the store's back: coverage still answers (it does not
    # open the files), and the check finds the change
    path = store.path("1m", "AAPL", "2024-04")
    path.write_bytes(b"garbage")
    assert cat.run_query(tmp_path, "SELECT * FROM coverage").rows == want
    assert want[0][2:] == (datetime(2024, 3, 4, 14, 30, tzinfo=UTC),
                           datetime(2024, 4, 2, 14, 49, tzinfo=UTC), 70, 2)
    with pytest.raises(OSError, match="cannot read bar file"):
        store.check_manifest()


def test_a_deleted_manifest_is_rebuilt_by_the_command_and_by_readers(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50))
    write(store, "5s", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 30, "5s"))
    write(store, "1m", "SPY", "2024-03", minute_frame("2024-03-04 14:30", 10))
    rows = store.entries()
    for leftover in tmp_path.glob(MANIFEST_FILE + "*"):
        leftover.unlink()
    env = {**subprocess_env(), "KTRDR_DATA_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    check = cli("manifest", "check")
    assert check.returncode == 1
    assert "AAPL 1m 2024-03: stored, but not in the manifest" in check.stdout
    assert "manifest rebuild" in check.stderr
    rebuilt = cli("manifest", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["partitions"] == 3
    assert cli("manifest", "check").returncode == 0
    assert_agrees(store)
    assert [dataclass_without_mtime(e) for e in store.entries()] == [
        dataclass_without_mtime(e) for e in rows]
    # a reader finding no manifest rebuilds it by itself
    for leftover in tmp_path.glob(MANIFEST_FILE + "*"):
        leftover.unlink()
    coverage = cli("coverage", "--format", "json")
    assert coverage.returncode == 0, coverage.stderr
    assert "rebuilding it from the Parquet files" in coverage.stderr
    assert [(r["symbol"], r["timeframe"], r["rows"]) for r in json.loads(coverage.stdout)] == [
        ("AAPL", "1m", 50), ("AAPL", "5s", 30), ("SPY", "1m", 10)]
    assert_agrees(store)


def test_coverage_command_starts_without_pandas_pyarrow_or_the_calendars(
        tmp_path: Path) -> None:
    """With a settled manifest, ``coverage`` is one SQLite query: its process imports
    neither the Parquet layer (pandas, pyarrow) nor the calendars, Dagster or the IB
    client (issue 15: coverage under 1 s end to end)."""
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50))
    env = {**subprocess_env(), "KTRDR_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ktrdr_pipeline.cli",
                           "coverage", "--format", "json"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["rows"] for r in json.loads(done.stdout)] == [50]
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    assert "sqlite3" in modules  # the premise: -X importtime lists what was imported
    heavy = {m for m in modules if m.split(".")[0] in (
        "pandas", "pyarrow", "dagster", "ib_async", "exchange_calendars", "pandera")}
    assert not heavy, sorted(heavy)[:10]


def dataclass_without_mtime(entry: ManifestEntry) -> tuple:
    return (*entry.key, entry.rows, entry.first_bar, entry.last_bar, entry.size)


def test_files_of_a_store_older_than_the_manifest_are_picked_up(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50))
    for leftover in tmp_path.glob(MANIFEST_FILE + "*"):
        leftover.unlink()
    # a writer creating the manifest while files exist marks it incomplete...
    write(store, "1m", "SPY", "2024-03", minute_frame("2024-03-04 14:30", 5))
    assert not store.manifest.complete()
    # ...so the next reader lists both
    assert [e.key for e in store.entries()] == [("1m", "AAPL", "2024-03"),
                                                ("1m", "SPY", "2024-03")]
    assert store.manifest.complete()
    assert_agrees(store)


def test_a_rebuild_rereads_files_replaced_while_it_ran(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50))
    stale = store.entry_from_file("1m", "AAPL", "2024-03")
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 60))
    write(store, "1m", "SPY", "2024-03", minute_frame("2024-03-04 14:30", 5))
    # the footers were read before the second writes: the rebuild rechecks every file
    store.manifest.rebuild([stale], lambda key, e: store.entry_from_file(*key)
                           if e is None or e.size != store.path(*key).stat().st_size else e,
                           keep_intents=lambda intent: False)
    assert store.entry("1m", "AAPL", "2024-03").rows == 60
    assert_agrees(store)


# -- writers killed mid-write -----------------------------------------------------------------
_DIE = textwrap.dedent("""
    import os, signal, sys
    import pandas as pd
    from ktrdr_pipeline.store import manifest as M, parquet as P

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[3] == "before-rename":
        def die_writing(table, sink):
            sink.write(b"PAR1" + b"x" * 5000)
            sink.flush()
            die()
        P._write_table = die_writing
    else:  # after the rename, before the manifest's row
        M.SqliteManifest.put = die
        M.SqliteManifest.delete = die
    store = P.BarStore(sys.argv[1])
    if sys.argv[4] == "delete":
        store.delete("1m", "AAPL", "2024-03")
    else:
        store.write("1m", "AAPL", "2024-03", pd.read_pickle(sys.argv[2]), use_rth=True,
                    what_to_show="TRADES")
""")


@pytest.mark.parametrize("when, what", [("before-rename", "write"),
                                        ("after-rename", "write"),
                                        ("after-rename", "delete")])
def test_a_writer_killed_mid_write_is_repaired_and_a_rerun_agrees(tmp_path: Path, when: str,
                                                                 what: str) -> None:
    store = BarStore(tmp_path)
    old = minute_frame("2024-03-04 14:30", 50)
    write(store, "1m", "AAPL", "2024-03", old)
    write(store, "1m", "SPY", "2024-03", old)
    new = minute_frame("2024-03-05 14:30", 70)
    pickled = tmp_path / "new.pkl"
    new.to_pickle(pickled)
    proc = subprocess.run([sys.executable, "-c", _DIE, str(tmp_path), str(pickled), when, what],
                          env=subprocess_env(), timeout=60, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    # the dead writer's intent is still there: the check names it
    [intent] = store.manifest.intents()
    assert intent.key == ("1m", "AAPL", "2024-03") and intent.abandoned()
    problems = store.check_manifest()
    assert any("a write in flight by a dead writer" in p for p in problems), problems
    # the file is the truth: a reader repairs the row from it
    entry = store.entry("1m", "AAPL", "2024-03")
    if what == "delete":
        assert entry is None and not store.path("1m", "AAPL", "2024-03").exists()
    else:
        assert entry.rows == (70 if when == "after-rename" else 50)
    assert store.manifest.intents() == []
    assert_agrees(store)
    # a rerun writes as usual
    write(BarStore(tmp_path), "1m", "AAPL", "2024-03", minute_frame("2024-03-06 14:30", 90))
    assert store.entry("1m", "AAPL", "2024-03").rows == 90
    assert_agrees(store)


class _NoManifest:
    """A manifest that records nothing: a writer whose row is not there yet."""

    def begin_write(self, *args, **kwargs) -> str:
        return "x"

    def put(self, *args, **kwargs) -> None:
        pass

    def delete(self, *args, **kwargs) -> None:
        pass


def test_a_partition_a_live_writer_is_replacing_is_read_from_its_file(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50))
    # this process (alive) begins a write, renames the new file, and has not put its row
    token = store.manifest.begin_write("1m", "AAPL", "2024-03", lambda: True)
    write(BarStore(tmp_path, manifest=_NoManifest()), "1m", "AAPL", "2024-03",
          minute_frame("2024-03-04 14:30", 60))
    assert store.manifest.get("1m", "AAPL", "2024-03").rows == 50  # the row is behind
    assert store.entry("1m", "AAPL", "2024-03").rows == 60  # the answer is not
    assert [i.token for i in store.manifest.intents()] == [token]  # a live writer's: kept
    store.manifest.put(store.entry_from_file("1m", "AAPL", "2024-03"), token=token)
    assert_agrees(store)


# -- concurrent writers -----------------------------------------------------------------------
_WRITER = textwrap.dedent("""
    import sys
    from ktrdr_pipeline.store.parquet import BarStore
    from ktrdr_pipeline_tests.test_store import minute_frame

    store = BarStore(sys.argv[1])
    k = int(sys.argv[2])
    for i in range(12):
        # every process writes the shared partition and one of its own, turn by turn
        store.write("1m", "SPY", "2024-03", minute_frame("2024-03-04 14:30", 10 + k * 100 + i),
                    use_rth=True, what_to_show="TRADES")
        store.write("1m", f"S{k}", f"2024-{i % 12 + 1:02d}",
                    minute_frame(f"2024-{i % 12 + 1:02d}-04 14:30", 5 + i),
                    use_rth=True, what_to_show="TRADES")
""")


def test_concurrent_writers_in_processes_and_threads_leave_an_agreeing_manifest(
        tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(k)],
                              env=subprocess_env(), stderr=subprocess.PIPE)
             for k in range(3)]
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(8):
                write(store, "1m", "QQQ", f"2024-{n + 1:02d}",
                      minute_frame(f"2024-{n + 1:02d}-04 14:30", 10 + i))
                store.delete("1m", "QQQ", f"2024-{n + 1:02d}") if i == 3 else None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    assert errors == []
    assert len(store.partitions()) == 1 + 3 * 12 + 3
    assert store.manifest.intents() == []
    assert_agrees(store)
    # the manifest is in WAL mode: readers and writers of several processes at once
    with sqlite3.connect(tmp_path / MANIFEST_FILE) as con:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# -- the sensor's shortcut --------------------------------------------------------------------
def test_tail_behind_agrees_with_behind_whenever_it_answers() -> None:
    rng = np.random.default_rng(7)
    answered = 0
    for _ in range(3000):
        n = int(rng.integers(0, 12))
        exp_start = np.arange(n, dtype=np.int64) * 60 + 1_000_000
        exp_end = exp_start + 60
        stored = exp_start[rng.random(n) < 0.6]
        partial = int(rng.choice([*stored, 0])) if len(stored) and rng.random() < 0.3 else None
        state = FetchState(
            partial_from=partial or None,
            asked_until=int(rng.choice([*exp_end, 999_000])) if n and rng.random() < 0.7
            else None,
            empty_runs=tuple((int(a), int(a) + 60) for a in exp_start[rng.random(n) < 0.2]))
        done = stored[stored < state.partial_from] if state.partial_from else stored
        want = behind(done, state, exp_start, exp_end)
        got = tail_behind(int(done[-1]) if len(done) else None, state, exp_start, exp_end)
        if got is not None:
            answered += 1
            assert got == want, (exp_start, stored, state)
    assert answered > 2000  # the file is needed only for inner gaps


def test_the_manifest_implements_the_protocol(tmp_path: Path) -> None:
    from ktrdr_pipeline.store.manifest import PartitionManifest

    assert isinstance(SqliteManifest(tmp_path / "m.sqlite"), PartitionManifest)
    assert isinstance(BarStore(tmp_path).manifest, PartitionManifest)


# -- loads through IB (the simulator) -------------------------------------------------------
def _load(data_dir: Path, port: int, *args: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "KTRDR_DATA_DIR": str(data_dir), "IB_PORT": str(port),
           "IB_CLIENT_ID": "410", "KTRDR_RESET_WINDOW": "off"}
    env.pop("DAGSTER_HOME", None)
    return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "load", *args,
                           "--json"], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_loads_tail_again_and_full_leave_an_agreeing_manifest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = BarStore(data)
    with GatewayThread(clock=CLOCK, latency="none") as gw:
        for args in (("--start", "2024-12-16"),  # the tail: two years' partitions
                     (),  # again: nothing missing but the newest bars
                     ("--start", "2024-12-20", "--mode", "full")):
            done = _load(data, gw.port, "AAPL", "--timeframe", "1h", *args)
            assert done.returncode == 0, done.stderr
            assert_agrees(store)
        done = _load(data, gw.port, "AAPL", "--timeframe", "1m", "--start", "2025-01-13")
        assert done.returncode == 0, done.stderr
    assert_agrees(store)
    assert [e.key for e in store.entries()] == [("1m", "AAPL", "2025-01"),
                                                ("1h", "AAPL", "2024"), ("1h", "AAPL", "2025")]
    newest = store.entry("1m", "AAPL", "2025-01")
    frame = store.read("1m", "AAPL", "2025-01")
    assert newest.as_datetime(newest.last_bar) == frame.index[-1]
    # the load at 15:00 stored the bar then in progress: it is not completed
    assert newest.last_completed < newest.last_bar
    assert pd.Timestamp(newest.as_datetime(newest.last_completed)) == frame.index[-2]


def test_light_readers_answer_from_the_manifest_and_defer_repairs(tmp_path: Path) -> None:
    from ktrdr_pipeline.store.contents import read_coverage, read_entries

    assert read_entries(tmp_path) == [] and read_coverage(tmp_path) == []
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50))
    write(store, "1d", "AAPL", "2024", minute_frame("2024-03-04", 3, "1D"))
    assert sorted(e.key for e in read_entries(tmp_path)) == sorted(
        e.key for e in store.entries())
    assert [e.rows for e in read_entries(tmp_path, "1m", "AAPL", ["2024-03"])] == [50]
    assert read_coverage(tmp_path) == store.coverage()
    # a dead writer's intent: the light readers hand over to the store, which repairs
    dead = 2 ** 22 + 4321  # above the default pid_max: no such process
    store.manifest.begin_write("1m", "AAPL", "2024-03", lambda: True)
    with sqlite3.connect(tmp_path / MANIFEST_FILE) as con:
        con.execute("UPDATE intents SET pid = ?", (dead,))
    assert [e.rows for e in read_entries(tmp_path, "1m")] == [50]
    assert store.manifest.intents() == []


# -- seconds bars: a file per month, a row group per day ----------------------------------
def _seconds_day(day: str, n: int = 40) -> pd.DataFrame:
    return minute_frame(f"{day} 14:30", n, "5s")


def test_a_month_of_seconds_bars_is_one_file_with_a_row_group_per_day(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    store = BarStore(tmp_path)
    days = ["2024-03-04", "2024-03-05", "2024-03-07"]
    month = pd.concat([_seconds_day(d) for d in days])
    write(store, "5s", "AAPL", "2024-03", month)
    path = store.path("5s", "AAPL", "2024-03")
    footer = pq.read_metadata(path)
    assert footer.num_row_groups == 3
    firsts = [footer.row_group(k).column(0).statistics.min for k in range(3)]
    assert [f.date().isoformat() for f in firsts] == days
    pd.testing.assert_frame_equal(store.read("5s", "AAPL", "2024-03"), month)
    one_day = cat.run_query(tmp_path, "SELECT count(*) FROM symbol_bars('5s', 'AAPL') WHERE "
                                      "ts >= '2024-03-05' AND ts < '2024-03-06'").rows
    assert one_day == [(40,)]
    # minute bars keep one row group per month
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 3000))
    assert pq.read_metadata(store.path("1m", "AAPL", "2024-03")).num_row_groups == 1
    assert_agrees(store)


def test_daily_files_of_seconds_bars_are_folded_into_months(tmp_path: Path,
                                                            monkeypatch) -> None:
    from ktrdr_pipeline.domain.timeframes import TIMEFRAMES, Timeframe

    old_layout = BarStore(tmp_path)
    frames = {d: _seconds_day(d) for d in ("2024-02-29", "2024-03-04", "2024-03-05")}
    with monkeypatch.context() as m:  # the store of before: a file per day
        m.setitem(TIMEFRAMES, "5s", Timeframe("5s", "5 secs", "daily"))
        for k, (day, frame) in enumerate(frames.items()):
            old_layout.write("5s", "AAPL", day, frame, use_rth=True, what_to_show="TRADES",
                             fetch=FetchState(asked_until=1000 + k, empty_runs=((10 * k, 10 * k + 5),)))
    store = BarStore(tmp_path)
    # already in the month: one bar of March 5 (whose stored version wins) and a later day
    later = _seconds_day("2024-03-06", 10)
    kept = frames["2024-03-05"].iloc[:1] * 2
    kept["bar_count"] = kept["bar_count"].astype("int64")
    write(store, "5s", "AAPL", "2024-03", pd.concat([kept, later]))
    assert store.partitions("5s") == [("5s", "AAPL", "2024-03")]  # days are ignored
    assert any("ktrdr-pipeline migrate" in p for p in store.check_manifest())
    env = {**subprocess_env(), "KTRDR_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "migrate"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"daily_files_folded": 3}
    assert store.partitions("5s") == [("5s", "AAPL", "2024-02"), ("5s", "AAPL", "2024-03")]
    march, meta = store.read_with_meta("5s", "AAPL", "2024-03")
    want = pd.concat([frames["2024-03-04"], kept, frames["2024-03-05"].iloc[1:], later])
    pd.testing.assert_frame_equal(march, want)
    pd.testing.assert_frame_equal(store.read("5s", "AAPL", "2024-02"), frames["2024-02-29"])
    assert meta.asked_until == 1002 and meta.empty_runs == ((10, 15), (20, 25))
    assert not list((tmp_path / "bars" / "timeframe=5s" / "symbol=AAPL").glob("period=*-*-*"))
    assert store.check_manifest() == []
    assert_agrees(store)
    # a run killed after writing the month and before removing a day: folded again, same
    with monkeypatch.context() as m:
        m.setitem(TIMEFRAMES, "5s", Timeframe("5s", "5 secs", "daily"))
        old_layout.write("5s", "AAPL", "2024-03-04", frames["2024-03-04"], use_rth=True,
                         what_to_show="TRADES")
    assert store.migrate_daily_files() == 1
    pd.testing.assert_frame_equal(store.read("5s", "AAPL", "2024-03"), want)
    assert store.migrate_daily_files() == 0
    assert_agrees(store)


def test_an_unreadable_manifest_stops_writes_clearly_and_is_rebuilt(tmp_path: Path) -> None:
    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 50))
    for leftover in tmp_path.glob(MANIFEST_FILE + "*"):
        leftover.unlink()
    (tmp_path / MANIFEST_FILE).write_bytes(b"not a database" * 100)
    with pytest.raises(OSError, match="manifest rebuild"):
        write(store, "1m", "AAPL", "2024-04", minute_frame("2024-04-02 14:30", 5))
    assert store.partitions() == [("1m", "AAPL", "2024-03")]  # nothing was written
    assert [e.rows for e in store.entries()] == [50]  # a reader rebuilds it
    assert list(tmp_path.glob(MANIFEST_FILE + ".unreadable-*"))
    write(store, "1m", "AAPL", "2024-04", minute_frame("2024-04-02 14:30", 5))
    assert_agrees(store)


def test_kept_read_connections_follow_the_manifest_file(tmp_path: Path) -> None:
    """Readers keep one SQLite connection per thread and manifest between calls; they
    still answer from whatever file is at the path now: a deleted manifest (the listing
    then answers), a rebuilt one (a new file), an older copy put in its place, garbage
    written over it, another thread, a forked child. At most four are kept per thread."""
    import multiprocessing
    import os
    import shutil

    from ktrdr_pipeline.store import manifest as mf

    store = BarStore(tmp_path)
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 5))
    manifest = SqliteManifest(tmp_path / MANIFEST_FILE)
    assert [r[:2] for r in manifest.settled_files("1m")] == [("AAPL", "2024-03")]
    older = tmp_path / "older.sqlite"
    with sqlite3.connect(manifest.path) as src, sqlite3.connect(older) as dst:
        src.backup(dst)  # the manifest as it is now: one partition
    write(store, "1m", "AAPL", "2024-04", minute_frame("2024-04-01 13:30", 5))
    assert len(manifest.settled_files("1m")) == 2  # same file, new rows
    for leftover in tmp_path.glob(MANIFEST_FILE + "*"):
        leftover.unlink()
    assert manifest.settled_files("1m") is None  # no manifest: not settled
    assert store.rebuild_manifest() == 2
    assert len(manifest.settled_files("1m")) == 2  # the rebuilt file
    shutil.copy(older, tmp_path / "copy.sqlite")
    os.replace(tmp_path / "copy.sqlite", manifest.path)
    assert [r[:2] for r in manifest.settled_files("1m")] == [("AAPL", "2024-03")]
    manifest.path.write_bytes(b"not a database" * 512)  # in place: same inode
    assert manifest.settled_files("1m") is None
    assert store.rebuild_manifest() == 2
    assert len(manifest.settled_files("1m")) == 2
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(manifest.settled_files("1m")))
    thread.start()
    thread.join()
    assert len(answers[0]) == 2
    queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(
        target=lambda: queue.put(manifest.settled_files("1m")))
    child.start()
    assert len(queue.get(timeout=60)) == 2
    child.join(timeout=60)
    assert child.exitcode == 0
    assert len(manifest.settled_files("1m")) == 2  # the parent's kept connection still works
    for k in range(6):
        other = BarStore(tmp_path / f"d{k}")
        write(other, "1m", "SPY", "2024-03", minute_frame("2024-03-04 14:30", 3))
        assert SqliteManifest(other.data_dir / MANIFEST_FILE).settled_files("1m")
    assert len(mf._readers.cons) == mf._READERS_PER_THREAD

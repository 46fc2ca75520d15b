"""The Greeks DuckDB tables and the outage buffer (circuit breaker), without IB."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import pytest

from ktrdr_pipeline.greeks import store as greeks_store
from ktrdr_pipeline.greeks.model import (
    PositionGreeks,
    Snapshot,
    clean_greek,
    clean_price,
)
from ktrdr_pipeline.greeks.store import (
    GREEKS_COLUMNS,
    LOGS_COLUMNS,
    MESSAGE_MAX,
    GreeksStore,
    JsonlBuffer,
    api_log_row,
    read_rows,
)
from ktrdr_pipeline.store.catalog import run_query

from .lockholder import DuckDBLockHolder as Holder

T0 = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)


def snap(k: int, account: str = "DU1") -> Snapshot:
    tick = T0 + timedelta(seconds=5 * k)
    return Snapshot(account=account, mode="SOCKET", tick_time=tick,
                    snapshot_time=tick + timedelta(milliseconds=3), positions=(
                        PositionGreeks.non_option(con_id=1, symbol="AAPL", sec_type="STK",
                                                  position=100.0, underlying_price=250.0),
                        PositionGreeks(con_id=2, symbol="AAPL", sec_type="OPT", position=-3.0,
                                       multiplier=100.0, unit_delta=0.5 + k / 1000,
                                       unit_gamma=0.01, unit_vega=0.2, unit_theta=-0.05),
                    ))


def make_store(tmp_path: Path, **kw) -> GreeksStore:
    return GreeksStore(tmp_path / "greeks.duckdb", tmp_path / "greeks_buffer.jsonl",
                       mode="SOCKET", **kw)


def ticks(db: Path) -> list[datetime]:
    return [r["tick_time"] for r in read_rows(
        db, "SELECT tick_time FROM portfolio_greeks WHERE con_id = 0 ORDER BY rowid")]


# -- sentinels and the snapshot model ------------------------------------------------------------
def test_sentinels_and_missing_greeks():
    assert clean_greek(-2.0) is None and clean_greek(-2) is None and clean_greek(None) is None
    assert clean_greek(float("nan")) is None and clean_greek(float("inf")) is None
    assert clean_greek(-1.0) == -1.0 and clean_greek(0.0) == 0.0  # a put's delta is valid
    assert clean_price(-1.0) is None and clean_price(0.0) is None and clean_price(12.5) == 12.5
    s = Snapshot(account="DU1", mode="SOCKET", tick_time=T0, snapshot_time=T0, positions=(
        PositionGreeks(con_id=1, symbol="X", sec_type="OPT", position=2, multiplier=100,
                       unit_delta=0.5, unit_gamma=0.1, unit_vega=None, unit_theta=None),
        PositionGreeks(con_id=2, symbol="Y", sec_type="OPT", position=-1, multiplier=100,
                       unit_delta=0.25, unit_gamma=0.2, unit_vega=0.3, unit_theta=-0.1),
        PositionGreeks.non_option(con_id=3, symbol="ES", sec_type="FUT", position=2,
                                  multiplier=50),
    ))
    assert s.missing_greeks == 1
    assert s.totals() == pytest.approx({"delta": 100 - 25 + 100, "gamma": 20 - 20,
                                        "vega": -30, "theta": 10})
    rows = s.rows()
    assert rows[0]["symbol"] == "PORTFOLIO" and rows[0]["con_id"] == 0
    assert rows[0]["missing_greeks"] == 1 and rows[0]["positions"] == 3
    assert [r["missing_greeks"] for r in rows[1:]] == [1, 0, 0]
    assert rows[1]["vega"] is None and rows[3]["delta"] == 100 and rows[3]["gamma"] == 0
    for g in ("delta", "gamma", "vega", "theta"):  # the aggregate is the column sum
        assert rows[0][g] == pytest.approx(sum(r[g] or 0 for r in rows[1:]))


# -- schema --------------------------------------------------------------------------------------
def test_bootstrap_twice_is_a_no_op(tmp_path):
    store = make_store(tmp_path)
    assert store.bootstrap()
    assert store.write_snapshot(snap(0)) == "written"
    con = duckdb.connect(str(store.db_path), read_only=True)
    before = con.execute("SELECT table_name, column_name, data_type FROM "
                         "information_schema.columns ORDER BY ALL").fetchall()
    con.close()
    assert make_store(tmp_path).bootstrap()  # a second start
    assert store.bootstrap()
    con = duckdb.connect(str(store.db_path), read_only=True)
    after = con.execute("SELECT table_name, column_name, data_type FROM "
                        "information_schema.columns ORDER BY ALL").fetchall()
    tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    count = con.execute("SELECT count(*) FROM portfolio_greeks").fetchone()[0]
    con.close()
    assert before == after
    assert tables == {"portfolio_greeks", "api_logs"}
    assert {c for t, c, _ in after if t == "portfolio_greeks"} >= {c for c, _ in GREEKS_COLUMNS}
    assert {c for t, c, _ in after if t == "api_logs"} >= {c for c, _ in LOGS_COLUMNS}
    assert count == 3  # untouched


def test_the_schema_is_created_once_at_start_up(tmp_path, monkeypatch):
    created = []
    statements = greeks_store.schema_statements
    monkeypatch.setattr(greeks_store, "schema_statements",
                        lambda: created.append(1) or statements())
    store = make_store(tmp_path)
    assert store.bootstrap()
    assert len(created) == 1
    for k in range(3):
        assert store.write_snapshot(snap(k)) == "written"
    store.log_event("connect", message="hello")
    assert len(created) == 1  # writes only insert
    # the file replaced behind the store's back: the rows wait in the buffer, and the flush
    # creates the tables again
    store.db_path.unlink()
    store.db_path.with_name(store.db_path.name + ".wal").unlink(missing_ok=True)
    assert store.write_snapshot(snap(3)) == "buffered"
    assert store.flush() == 2  # db_unavailable, snap 3
    assert len(created) == 2
    assert ticks(store.db_path) == [snap(3).tick_time]
    assert store.write_snapshot(snap(4)) == "written"
    assert len(created) == 2


def test_api_log_rows_are_built_in_one_place():
    ts = datetime(2026, 11, 18, 10, 0, tzinfo=ZoneInfo("America/New_York"))
    row = api_log_row("error", ts=ts, mode="SOCKET", message="x" * (MESSAGE_MAX + 50),
                      attempt=2, code=1100)
    assert set(row) == {c for c, _ in LOGS_COLUMNS}
    assert row["ts"] == ts and row["ts"].tzinfo == UTC
    assert row["message"] == "x" * MESSAGE_MAX
    assert (row["event"], row["mode"], row["attempt"], row["code"], row["delay_s"]) == (
        "error", "SOCKET", 2, 1100, None)
    assert api_log_row("connect", ts=ts, mode=None, message="")["message"] is None
    assert api_log_row("connect", ts=ts, mode=None)["log_id"] != row["log_id"]


def test_long_messages_are_cut_when_stored(tmp_path):
    store = make_store(tmp_path)
    store.bootstrap()
    store.log_event("error", message="y" * 5000, code=2105)
    (row,) = read_rows(store.db_path, "SELECT mode, message, code FROM api_logs")
    assert row == {"mode": "SOCKET", "message": "y" * MESSAGE_MAX, "code": 2105}


def test_rows_round_trip_and_a_tick_is_stored_once(tmp_path):
    store = make_store(tmp_path)
    store.bootstrap()
    s = snap(1)
    assert store.write_snapshot(s) == "written"
    assert store.write_snapshot(s) == "written"  # same id: ignored, not duplicated
    rows = read_rows(store.db_path, "SELECT * FROM portfolio_greeks ORDER BY rowid")
    assert len(rows) == 3
    for got, want in zip(rows, s.rows(), strict=True):
        for k, v in want.items():
            assert got[k] == (pytest.approx(v) if isinstance(v, float) else v), k


def test_the_sql_command_reads_the_tables(tmp_path):
    store = make_store(tmp_path)
    store.bootstrap()
    store.write_snapshot(snap(0))
    store.log_event("connect", message="hello")
    result = run_query(tmp_path, "SELECT symbol, delta FROM greeks.portfolio_greeks "
                                 "WHERE con_id = 0")
    assert result.rows == [("PORTFOLIO", pytest.approx(100 - 150.0))]
    result = run_query(tmp_path, "SELECT event, message FROM greeks.api_logs")
    assert result.rows == [("connect", "hello")]


# -- the outage buffer ----------------------------------------------------------------------------
def test_locked_database_buffers_then_flushes_in_order(tmp_path):
    clock = [0.0]
    store = make_store(tmp_path, flush_interval=60.0, monotonic=lambda: clock[0])
    store.bootstrap()
    store.write_snapshot(snap(0))
    with Holder(store.db_path):
        for k in range(1, 6):
            clock[0] += 5
            assert store.write_snapshot(snap(k)) == "buffered"
            assert store.flush_if_due() == 0  # still locked
        clock[0] += 60
        assert store.flush_if_due() == 0  # retried, still locked
    clock[0] += 30
    assert store.write_snapshot(snap(6)) == "buffered"  # behind the buffer, not before it
    clock[0] += 30
    assert store.flush_if_due() == 7  # 5 snapshots + 1 more + the db_unavailable log row
    assert store.buffer.size() == 0
    assert store.write_snapshot(snap(7)) == "written"  # normal writes resume
    assert ticks(store.db_path) == [snap(k).tick_time for k in range(8)]
    events = [r["event"] for r in read_rows(store.db_path,
                                            "SELECT event FROM api_logs ORDER BY ts")]
    assert events == ["db_unavailable", "buffer_flushed"]


def test_a_new_process_flushes_a_leftover_buffer_first(tmp_path):
    store = make_store(tmp_path)
    store.bootstrap()
    with Holder(store.db_path):
        for k in range(3):
            assert store.write_snapshot(snap(k)) == "buffered"
    # the process dies; the next one starts and flushes before anything else
    again = make_store(tmp_path)
    assert again.bootstrap()
    assert again.buffer.size() == 0
    assert again.write_snapshot(snap(3)) == "written"
    assert ticks(store.db_path) == [snap(k).tick_time for k in range(4)]


def test_crash_between_commit_and_truncate_writes_nothing_twice(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    store.bootstrap()
    with Holder(store.db_path):
        for k in range(4):
            store.write_snapshot(snap(k))

    def crash(self):
        raise SystemExit("killed after the commit")

    monkeypatch.setattr(JsonlBuffer, "clear", crash)
    with pytest.raises(SystemExit):
        store.flush()
    monkeypatch.undo()
    assert store.buffer.size() > 0  # the buffer survived the "crash"...
    assert ticks(store.db_path) == [snap(k).tick_time for k in range(4)]  # ...after the commit
    again = make_store(tmp_path)
    again.bootstrap()  # flushes the same lines again: INSERT OR IGNORE
    assert again.buffer.size() == 0
    assert ticks(store.db_path) == [snap(k).tick_time for k in range(4)]
    n = read_rows(store.db_path, "SELECT count(*) AS n FROM portfolio_greeks")[0]["n"]
    assert n == 4 * 3


def test_a_torn_buffer_line_is_skipped_and_later_lines_survive(tmp_path):
    store = make_store(tmp_path)
    store.bootstrap()
    with Holder(store.db_path):
        store.write_snapshot(snap(0))
        with open(store.buffer.path, "ab") as fh:  # a crash in the middle of an append
            fh.write(b'{"table":"portfolio_greeks","rows":[{"snapsh')
        store.write_snapshot(snap(1))
    assert len(store.buffer.read()) == 3  # db_unavailable, snap 0, snap 1
    assert store.flush() == 3
    assert ticks(store.db_path) == [snap(0).tick_time, snap(1).tick_time]


def test_unavailable_directory_buffers(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    clock = [0.0]
    store = GreeksStore(blocker / "greeks.duckdb", tmp_path / "buf.jsonl", flush_interval=0.1,
                        monotonic=lambda: clock[0])
    assert not store.bootstrap()
    assert store.write_snapshot(snap(0)) == "buffered"
    blocker.unlink()
    clock[0] += 0.15  # the retry interval has passed
    assert store.write_snapshot(snap(1)) == "written"
    assert ticks(store.db_path) == [snap(0).tick_time, snap(1).tick_time]


def test_reading_a_missing_database_fails_at_once(tmp_path, monkeypatch):
    from ktrdr_pipeline.greeks.store import read_rows

    attempts = []
    real_connect = duckdb.connect

    def connect(*args, **kwargs):
        attempts.append(args)
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(duckdb, "connect", connect)
    with pytest.raises(duckdb.IOException):
        read_rows(tmp_path / "absent.duckdb", "SELECT 1", timeout_s=5.0)
    assert len(attempts) == 1  # not retried as if it were locked
    assert not (tmp_path / "absent.duckdb").exists()

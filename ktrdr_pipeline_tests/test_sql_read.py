"""``sql`` that pays for what it touches, streamed output, and the research read API
(``read_bars``, ``latest_bars``) — issue 15."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ktrdr_pipeline
from ktrdr_pipeline.store import catalog as cat
from ktrdr_pipeline.store.parquet import BarStore
from ktrdr_pipeline.store.read import BarReadError

from .test_store import minute_frame, subprocess_env, write

UTC = "UTC"


@pytest.fixture(autouse=True)
def _default_timeframes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KTRDR_TIMEFRAMES", raising=False)


def _fill(data_dir: Path) -> BarStore:
    """AAPL and SPY 1-minute bars over three months (crossing period boundaries in
    exchange time), AAPL hourly bars over two years."""
    store = BarStore(data_dir)
    for sym, n in (("AAPL", 3), ("SPY", 2)):
        for key, start in (("2024-02", "2024-02-29 14:30"), ("2024-03", "2024-03-01 14:30"),
                           ("2024-04", "2024-04-01 13:30")):
            if key == "2024-04" and n == 2:
                continue
            frame = minute_frame(start, 40 + n)
            write(store, "1m", sym, key, frame)
    write(store, "1h", "AAPL", "2023", minute_frame("2023-12-28 14:00", 5, "1h"))
    write(store, "1h", "AAPL", "2024", minute_frame("2024-01-02 14:00", 6, "1h"))
    return store


def _files(data_dir: Path, tf: str, symbol: str = "*") -> list[Path]:
    return sorted((data_dir / "bars").glob(f"timeframe={tf}/symbol={symbol}/period=*/"
                                           "data.parquet"))


def _spoil(paths: list[Path]) -> None:
    """Make files unreadable for DuckDB (not Parquet any more): a query that opens one
    fails."""
    assert paths
    for p in paths:
        p.write_bytes(b"not parquet")


# == read_bars =================================================================================
@pytest.mark.parametrize("start, end", [
    (None, None),
    ("2024-02-29T15:00:00+00:00", "2024-03-01T14:50:00+00:00"),  # across a period boundary
    (pd.Timestamp("2024-03-01 14:35", tz=UTC), pd.Timestamp("2024-04-01 13:45", tz=UTC)),
    (pd.Timestamp("2024-03-01", tz=UTC).date(), None),
    (None, "2024-03-01T00:00:00+00:00"),
    ("2025-01-01T00:00:00+00:00", None),  # nothing in range: an empty frame
])
def test_read_bars_equals_the_stored_bars(tmp_path: Path, start, end) -> None:
    store = _fill(tmp_path)
    lo = start if start is not None else pd.Timestamp("2000-01-01", tz=UTC)
    hi = end if end is not None else pd.Timestamp("2100-01-01", tz=UTC)
    expected = store.read_range("1m", "AAPL", lo, hi)
    got = ktrdr_pipeline.read_bars("AAPL", "1m", start, end, data_dir=tmp_path)
    if expected.empty:
        assert got.empty and list(got.columns) == list(expected.columns)
    else:
        pd.testing.assert_frame_equal(got, expected)
    table = ktrdr_pipeline.read_bars("AAPL", "1m", start, end, data_dir=tmp_path, as_="arrow")
    assert isinstance(table, pa.Table) and table.column_names[0] == "ts"
    assert table.num_rows == len(expected)
    assert table.column("close").to_pylist() == expected["close"].tolist()


def test_read_bars_columns_and_path_columns(tmp_path: Path) -> None:
    store = _fill(tmp_path)
    full = store.read_range("1m", "SPY", pd.Timestamp("2024-01-01", tz=UTC),
                            pd.Timestamp("2025-01-01", tz=UTC))
    got = ktrdr_pipeline.read_bars("SPY", "1m", columns=["close", "volume"], data_dir=tmp_path)
    pd.testing.assert_frame_equal(got, full[["close", "volume"]])
    # no constant symbol/period columns unless asked
    assert "symbol" not in got.columns and "period" not in got.columns
    tagged = ktrdr_pipeline.read_bars("SPY", "1m", columns=["symbol", "period", "close"],
                                      data_dir=tmp_path, as_="arrow")
    assert tagged.column_names == ["ts", "symbol", "period", "close"]
    assert set(tagged.column("symbol").to_pylist()) == {"SPY"}
    assert sorted(set(tagged.column("period").to_pylist())) == ["2024-02", "2024-03"]
    # the same answer as the catalog's view
    res = cat.run_query(tmp_path, "SELECT period, count(*) FROM bars_1m WHERE symbol = 'SPY' "
                                  "GROUP BY period ORDER BY period")
    counts = pd.Series(tagged.column("period").to_pylist()).value_counts().sort_index()
    assert [tuple(r) for r in res.rows] == list(counts.items())


@pytest.mark.parametrize("start, end", [
    (None, None),  # three files joined
    ("2024-03-01T14:35:00+00:00", "2024-03-01T14:50:00+00:00"),  # a slice of one file
])
def test_research_frames_can_be_changed(tmp_path: Path, start, end) -> None:
    """A frame from read_bars or latest_bars is the caller's to change, as any pandas
    frame (``df.loc[...] = x``, in-place arithmetic), without touching what the next read
    returns (Arrow's zero-copy numpy views are read-only: the columns must not be those)."""
    _fill(tmp_path)
    first = ktrdr_pipeline.read_bars("AAPL", "1m", start, end, data_dir=tmp_path)
    again = ktrdr_pipeline.read_bars("AAPL", "1m", start, end, data_dir=tmp_path)
    stored = again.copy()
    first.iloc[0] = [1.0, 2.0, 0.5, 1.5, 10.0, 1.2, 3]  # every column, bar_count too
    first["close"] *= 2
    first.loc[first.index[-1], "volume"] = 0.0
    assert first.iloc[0].tolist() == [1.0, 2.0, 0.5, 3.0, 10.0, 1.2, 3]
    pd.testing.assert_frame_equal(again, stored)  # an earlier answer is its own
    pd.testing.assert_frame_equal(
        ktrdr_pipeline.read_bars("AAPL", "1m", start, end, data_dir=tmp_path), stored)
    last = ktrdr_pipeline.latest_bars("1m", 3, columns=["close", "period"], data_dir=tmp_path)
    stored_last = last.copy()
    last.loc[0, "close"] = -1.0
    last.loc[1, "period"] = "changed"
    moved = pd.Timestamp("2030-01-01", tz=UTC)
    last.loc[2, "ts"] = moved  # ts is a column here
    last.iloc[3] = last.iloc[4]  # a whole row, ts included
    assert last["close"].iloc[0] == -1.0 and last["period"].iloc[1] == "changed"
    assert last["ts"].iloc[2] == moved and last.iloc[3].equals(last.iloc[4])
    pd.testing.assert_frame_equal(
        ktrdr_pipeline.latest_bars("1m", 3, columns=["close", "period"], data_dir=tmp_path),
        stored_last)


def test_footers_are_parsed_once_and_a_rewritten_file_afresh(tmp_path: Path,
                                                              monkeypatch) -> None:
    """read_bars keeps each file's parsed footer, looked up by the footer's own bytes: a
    second read parses none, a partition rewritten since (other bars, same path) is read
    as it is now, and no more footers are kept than allowed."""
    from ktrdr_pipeline.store import read as read_mod

    store = _fill(tmp_path)
    monkeypatch.setattr(read_mod, "_FOOTERS", {})
    parsed = []
    real = pq.ParquetFile

    def counting(source, *, metadata=None, **kw):
        parsed.append(metadata is None)
        return real(source, metadata=metadata, **kw)

    monkeypatch.setattr(read_mod.pq, "ParquetFile", counting)
    every = lambda: store.read_range("1m", "AAPL", pd.Timestamp("2024-01-01", tz=UTC),  # noqa: E731
                                     pd.Timestamp("2025-01-01", tz=UTC))
    pd.testing.assert_frame_equal(ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path),
                                  every())
    assert parsed == [True] * 3
    parsed.clear()
    pd.testing.assert_frame_equal(ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path),
                                  every())
    assert parsed == [False] * 3
    write(store, "1m", "AAPL", "2024-03", minute_frame("2024-03-04 14:30", 17))
    parsed.clear()
    got = ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path)
    pd.testing.assert_frame_equal(got, every())
    assert parsed.count(True) == 1 and len(got.loc["2024-03-02":"2024-03-31"]) == 17
    monkeypatch.setattr(read_mod, "_FOOTERS_KEPT", 2)
    ktrdr_pipeline.read_bars("SPY", "1m", data_dir=tmp_path)
    assert len(read_mod._FOOTERS) == 2
    # and no more footer bytes than allowed (a 5-second month's footer is ~18 KB)
    monkeypatch.setattr(read_mod, "_FOOTERS_KEPT", 1024)
    one = max(map(len, read_mod._FOOTERS))
    monkeypatch.setattr(read_mod, "_FOOTER_BYTES_KEPT", 8 * one + one // 2)
    ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path)
    assert 0 < sum(map(len, read_mod._FOOTERS)) <= 8 * one + one // 2


def test_decoding_threads_keep_order_and_raise_a_failure() -> None:
    """Files shared out to several threads: the answers keep the jobs' order and a failure
    in any thread is raised to the caller, whichever thread met it (how many files the
    others decoded meanwhile depends on scheduling, so it is not asserted)."""
    from ktrdr_pipeline.store import read as read_mod

    def one(k: int) -> int:
        if k in (5, 6):
            raise OSError(f"cannot read bar file {k}")
        return k * 10

    assert read_mod._decode_shared(lambda k: k * 10, list(range(40))) == [
        k * 10 for k in range(40)]
    with pytest.raises(OSError, match="bar file [56]"):
        read_mod._decode_shared(one, list(range(400)))
    assert read_mod._decode_shared(lambda k: k, [7]) == [7]  # the pool still serves


def test_unreadable_and_missing_files_are_named(tmp_path: Path) -> None:
    """A file that is not Parquet is the same clear error, naming it, for the research read
    and the store's own reads; a partition never written reads as empty in the store, and
    a file the manifest lists but which is gone is an error for the research read."""
    store = _fill(tmp_path)
    spoilt = store.path("1m", "AAPL", "2024-03")
    spoilt.write_bytes(b"not parquet")
    for read in (lambda: ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path),
                 lambda: store.read("1m", "AAPL", "2024-03"),
                 lambda: store.read_meta("1m", "AAPL", "2024-03")):
        with pytest.raises(OSError, match=f"cannot read bar file {spoilt}"):
            read()
    assert store.read("1m", "AAPL", "2019-01").empty
    assert store.read_meta("1m", "AAPL", "2019-01") is None
    gone = store.path("1m", "SPY", "2024-02")
    gone.unlink()  # behind the store's back: the manifest still lists it
    with pytest.raises(OSError, match=f"cannot read bar file {gone}"):
        ktrdr_pipeline.read_bars("SPY", "1m", data_dir=tmp_path)


def test_files_written_with_the_earlier_options_read_the_same(tmp_path: Path) -> None:
    """New writes use LZ4, required columns and no Arrow schema in the footer; a partition
    written before (zstd, dictionary, nullable float columns, Arrow schema stored) reads
    back the same bars and metadata next to the new ones, through read_bars (pandas and
    Arrow), latest_bars, the store and the sql views."""
    store = _fill(tmp_path)
    lo, hi = pd.Timestamp("2024-01-01", tz=UTC), pd.Timestamp("2025-01-01", tz=UTC)
    expected = store.read_range("1m", "AAPL", lo, hi)
    meta = store.read_meta("1m", "AAPL", "2024-03")
    new = pq.ParquetFile(store.path("1m", "AAPL", "2024-03"))
    assert new.metadata.row_group(0).column(0).compression == "LZ4"  # LZ4_RAW in the file
    assert b"ARROW:schema" not in new.metadata.metadata and b"ktrdr" in new.metadata.metadata
    assert new.schema_arrow.field("ts").type == pa.timestamp("us", tz="UTC")
    assert all(new.schema.column(i).max_definition_level == 0  # required: no null levels
               for i in range(len(new.schema)))
    encodings = {new.metadata.row_group(0).column(i).path_in_schema:
                 set(new.metadata.row_group(0).column(i).encodings)
                 for i in range(new.metadata.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["volume"]  # whole shares: smaller and faster
    assert "RLE_DICTIONARY" in encodings["close"] and "DELTA_BINARY_PACKED" in encodings["ts"]
    old = store.path("1m", "AAPL", "2024-03")
    table = pq.read_table(old)
    table = table.cast(pa.schema([f.with_nullable(f.name not in ("ts", "bar_count"))
                                  for f in table.schema], metadata=table.schema.metadata))
    pq.write_table(table, old, compression="zstd", compression_level=3,
                   use_dictionary=["open", "high", "low", "close", "volume", "wap"],
                   column_encoding={"ts": "DELTA_BINARY_PACKED",
                                    "bar_count": "DELTA_BINARY_PACKED"})
    assert pq.ParquetFile(old).metadata.row_group(0).column(0).compression == "ZSTD"
    assert b"ARROW:schema" in pq.ParquetFile(old).metadata.metadata
    assert pq.ParquetFile(old).schema.column(1).max_definition_level == 1  # nullable
    pd.testing.assert_frame_equal(ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path),
                                  expected)
    arrow = ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path, as_="arrow")
    assert arrow.column("close").to_pylist() == expected["close"].tolist()
    last = ktrdr_pipeline.latest_bars("1m", 100, symbols=["AAPL"], data_dir=tmp_path)
    assert last["close"].tolist() == expected["close"].tolist()[-100:]
    pd.testing.assert_frame_equal(store.read_range("1m", "AAPL", lo, hi), expected)
    assert store.read_meta("1m", "AAPL", "2024-03") == meta
    res = cat.run_query(tmp_path, "SELECT count(*), sum(close) FROM bars_1m "
                                  "WHERE symbol = 'AAPL'")
    assert res.rows[0][0] == len(expected)
    assert res.rows[0][1] == pytest.approx(expected["close"].sum())


def test_read_bars_reads_only_the_periods_of_the_range(tmp_path: Path) -> None:
    _fill(tmp_path)
    _spoil(_files(tmp_path, "1m", "AAPL")[:1])  # 2024-02: outside the range below
    got = ktrdr_pipeline.read_bars("AAPL", "1m", "2024-03-02", "2024-05-01", data_dir=tmp_path)
    assert len(got) and got.index.min() >= pd.Timestamp("2024-03-02", tz=UTC)
    with pytest.raises(OSError):  # the premise: that file cannot be read
        ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"symbol": "aapl"}, r"invalid symbol 'aapl'.*'AAPL'"),
    ({"symbol": "../AAPL"}, r"invalid symbol"),
    ({"symbol": "MSFT"}, r"no 1m bars stored for symbol 'MSFT'.*symbols with 1m bars: "
                         r"AAPL, SPY"),
    ({"timeframe": "1x"}, r"unknown timeframe '1x'; allowed: .*\b1m\b"),
    ({"timeframe": "1M"}, r"ambiguous timeframe"),
    ({"start": "2024-03-01 10:00"}, r"naive start.*timezone-aware"),
    ({"start": "yesterday-ish"}, r"invalid start"),
    ({"start": "2024-03-02", "end": "2024-03-01"}, r"empty range: start"),
    ({"columns": ["close", "vwap"]}, r"unknown column\(s\) 'vwap'; allowed: open, high"),
    ({"as_": "polars"}, r"unknown output 'polars'; allowed: pandas, arrow"),
])
def test_read_bars_refuses_bad_requests_clearly(tmp_path: Path, kwargs, message) -> None:
    _fill(tmp_path)
    args = {"symbol": "AAPL", "timeframe": "1m", **kwargs}
    with pytest.raises(BarReadError, match=message):
        ktrdr_pipeline.read_bars(args.pop("symbol"), args.pop("timeframe"), data_dir=tmp_path,
                                 **args)


def test_latest_bars_python_and_sql_agree_with_the_store(tmp_path: Path) -> None:
    store = _fill(tmp_path)
    everything = {s: store.read_range("1m", s, pd.Timestamp("2024-01-01", tz=UTC),
                                      pd.Timestamp("2025-01-01", tz=UTC)) for s in ("AAPL",
                                                                                    "SPY")}
    for n in (1, 5, 60, 500):  # 60 and 500 need more than the newest period
        got = ktrdr_pipeline.latest_bars("1m", n, data_dir=tmp_path)
        assert list(got.columns) == ["symbol", "ts", "open", "high", "low", "close", "volume",
                                     "wap", "bar_count"]
        for sym, frame in everything.items():
            mine = got[got["symbol"] == sym].set_index("ts").drop(columns="symbol")
            pd.testing.assert_frame_equal(mine, frame.tail(n), check_names=False)
        res = cat.run_query(tmp_path, f"SELECT symbol, ts, close FROM latest_bars('1m', {n}) "
                                      "ORDER BY symbol, ts")
        assert [(r[0], pd.Timestamp(r[1]), r[2]) for r in res.rows] == [
            (s, t, c) for s, t, c in zip(got["symbol"], got["ts"], got["close"], strict=True)]
    one = ktrdr_pipeline.latest_bars("1m", 2, symbols=["SPY"], columns=["close"],
                                     data_dir=tmp_path, as_="arrow")
    assert one.column_names == ["symbol", "ts", "close"] and one.num_rows == 2
    with pytest.raises(BarReadError, match="no 1m bars stored for 'MSFT'"):
        ktrdr_pipeline.latest_bars("1m", 2, symbols=["MSFT"], data_dir=tmp_path)
    with pytest.raises(BarReadError, match="an integer >= 0"):
        ktrdr_pipeline.latest_bars("1m", -1, data_dir=tmp_path)
    with pytest.raises(cat.QueryError, match="latest_bars: unknown timeframe '1x'"):
        cat.run_query(tmp_path, "SELECT * FROM latest_bars('1x', 3)")


def test_latest_bars_sql_reads_only_recent_periods(tmp_path: Path) -> None:
    _fill(tmp_path)
    old = [p for p in _files(tmp_path, "1m") if "period=2024-02" in str(p)]
    _spoil(old)
    res = cat.run_query(tmp_path, "SELECT symbol, count(*) FROM latest_bars('1m', 3) "
                                  "GROUP BY symbol ORDER BY symbol")
    assert res.rows == [("AAPL", 3), ("SPY", 3)]
    with pytest.raises(cat.QueryError):  # the premise: reading every period fails
        cat.run_query(tmp_path, "SELECT count(*) FROM bars_1m")


def test_latest_bars_counts_rows_from_the_manifest(tmp_path: Path, monkeypatch) -> None:
    """Which files hold a symbol's last n bars comes from the manifest's row counts (no
    footer opened for it); without a settled manifest, from the footers — same bars."""
    from ktrdr_pipeline.store import read as rd
    from ktrdr_pipeline.store.manifest import MANIFEST_FILE

    _fill(tmp_path)
    want = ktrdr_pipeline.latest_bars("1m", 50, data_dir=tmp_path)
    footers: list[Path] = []
    real = pq.read_metadata
    monkeypatch.setattr(rd.pq, "read_metadata", lambda p, *a, **k: (footers.append(p),
                                                                     real(p, *a, **k))[1])
    pd.testing.assert_frame_equal(ktrdr_pipeline.latest_bars("1m", 50, data_dir=tmp_path),
                                  want)
    sql = cat.run_query(tmp_path, "SELECT symbol, count(*) FROM latest_bars('1m', 50) "
                                  "GROUP BY symbol ORDER BY symbol").rows
    assert footers == []
    for leftover in tmp_path.glob(MANIFEST_FILE + "*"):
        leftover.unlink()
    pd.testing.assert_frame_equal(ktrdr_pipeline.latest_bars("1m", 50, data_dir=tmp_path),
                                  want)
    assert footers  # the fallback read the footers
    assert sql == [("AAPL", 50), ("SPY", 50)]
    assert want.groupby("symbol").size().to_dict() == {"AAPL": 50, "SPY": 50}


# == views only for what a statement names ======================================================
def _views(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}


def test_sql_builds_only_the_views_a_statement_names(tmp_path: Path) -> None:
    _fill(tmp_path)
    for sql, views in [
        ("SELECT count(*) FROM bars_1h", {"bars_1h"}),
        ("SELECT 1", set()),
        # coverage comes from the partition manifest (issue 15): no bars view behind it
        ("SELECT * FROM coverage", {"coverage"}),
        ("SELECT count(*) FROM symbol_bars('1m', 'AAPL')", set()),
        ("WITH x AS (SELECT * FROM bars_1m) SELECT count(*) FROM x JOIN bars_1d USING (ts)",
         {"bars_1m", "bars_1d"}),
        ("SELECT * FROM query_table('bars_5m')", {"bars_5m"}),
        ("SHOW TABLES", {"bars", "coverage", "bars_1m", "bars_5m", "bars_15m", "bars_1h",
                         "bars_1d"}),
    ]:
        con = cat.memory_connection(tmp_path, statement=sql)
        try:
            assert _views(con) == views, sql
        finally:
            con.close()
    # a statement naming bars_1h does not touch the 1-minute files: they may be unreadable
    _spoil(_files(tmp_path, "1m"))
    assert cat.run_query(tmp_path, "SELECT count(*) FROM bars_1h").rows == [(11,)]
    assert cat.run_query(tmp_path, "SELECT 1 AS x").rows == [(1,)]
    with pytest.raises(cat.QueryError):  # the premise: a statement naming bars_1m fails
        cat.run_query(tmp_path, "SELECT count(*) FROM bars_1m")


def test_views_are_narrowed_to_the_partitions_the_filters_allow(tmp_path: Path) -> None:
    _fill(tmp_path)
    spy = len(ktrdr_pipeline.read_bars("SPY", "1m", data_dir=tmp_path))
    periods = ktrdr_pipeline.read_bars("AAPL", "1m", data_dir=tmp_path, columns=["period"])
    aapl_march = int((periods["period"] == "2024-03").sum())
    assert 0 < aapl_march < len(periods)
    _spoil(_files(tmp_path, "1m", "AAPL")[::2])  # AAPL 2024-02 and 2024-04
    ok = {
        "SELECT count(*) FROM bars_1m WHERE symbol = 'SPY'": spy,
        "SELECT count(*) FROM bars_1m b WHERE 'SPY' = b.symbol AND ts > '2000-01-01'": spy,
        "SELECT count(*) FROM bars_1m WHERE symbol IN ('SPY', 'NOPE', 'x/../y')": spy,
        "SELECT count(*) FROM bars_1m WHERE period = '2024-03' AND symbol = 'AAPL'":
            aapl_march,
        "SELECT count(*) FROM bars WHERE timeframe = '1m' AND symbol = 'SPY'": spy,
        "SELECT (SELECT count(*) FROM bars_1m WHERE symbol = 'SPY') + (SELECT count(*) "
        "FROM bars_1m WHERE symbol = 'AAPL' AND period = '2024-03')": spy + aapl_march,
        "SELECT count(*) FROM bars_1m WHERE symbol = 'aapl'": 0,
    }
    for sql, n in ok.items():
        assert cat.run_query(tmp_path, sql).rows == [(n,)], sql
    # a reference that is not filtered (or joined, or named in a string) reads every file
    for sql in ("SELECT count(*) FROM bars_1m",
                "SELECT count(*) FROM bars_1m WHERE symbol = 'SPY' OR close > 0",
                "SELECT count(*) FROM bars_1m a JOIN bars_1h b USING (ts) WHERE symbol = 'SPY'",
                "SELECT count(*) FROM bars_1m WHERE symbol = 'SPY' AND ts IN (SELECT ts FROM "
                "query('SELECT * FROM bars_1m'))",
                "SELECT count(*) FROM bars_1m WHERE symbol = 'SPY' UNION ALL "
                "SELECT count(*) FROM bars_1m"):
        with pytest.raises(cat.QueryError):
            cat.run_query(tmp_path, sql)


def test_partition_filters_are_read_from_the_parse_tree(tmp_path: Path) -> None:
    con = cat.memory_connection(tmp_path, statement="SELECT 1")
    try:
        f = cat.partition_filters
        assert f(con, "SELECT * FROM bars_1m WHERE symbol = 'A' AND period IN ('2024-01', "
                      "'2024-02')", {"bars_1m"}) == {
            "bars_1m": [{"symbol": frozenset({"A"}), "period": frozenset({"2024-01",
                                                                          "2024-02"})}]}
        assert f(con, "SELECT * FROM bars_1m WHERE symbol = 'A' UNION ALL SELECT * FROM "
                      "bars_1m WHERE symbol = 'B' AND period = 'P'", {"bars_1m"}) == {
            "bars_1m": [{"symbol": frozenset({"A"}), "period": None},
                        {"symbol": frozenset({"B"}), "period": frozenset({"P"})}]}
        assert f(con, "SELECT * FROM bars_1m x WHERE y.symbol = 'A'", {"bars_1m"}) == {}
        assert f(con, "SELECT * FROM bars_1m WHERE symbol = 'A' AND symbol = 'B'",
                 {"bars_1m"}) == {"bars_1m": [{"symbol": frozenset(), "period": None}]}
        assert f(con, "DESCRIBE bars_1m", {"bars_1m"}) == {}
    finally:
        con.close()


# == output ====================================================================================
def test_streamed_csv_and_json_equal_the_whole_result(tmp_path: Path) -> None:
    _fill(tmp_path)
    sql = "SELECT symbol, ts, close, volume, bar_count FROM bars_1m ORDER BY symbol, ts"
    result = cat.run_query(tmp_path, sql)
    assert len(result.rows) > 10
    for fmt in ("csv", "json"):
        writes: list[str] = []

        class Out(io.StringIO):
            def write(self, text: str, _log: list[str] = writes) -> int:
                _log.append(text)
                return super().write(text)

        out = Out()
        n = cat.write_query(tmp_path, sql, fmt, out, batch_rows=3)
        assert n == len(result.rows)
        assert out.getvalue() == cat.format_result(result.rows, result.columns, fmt)
        # written batch by batch, never as one string of the whole result
        assert max(map(len, writes)) < len(out.getvalue()) / 3
    assert cat.query(tmp_path, "SELECT 1 AS x WHERE false", "json") == "[]\n"
    empty = io.StringIO()
    cat.write_query(tmp_path, "SELECT 1 AS x WHERE false", "csv", empty)
    assert empty.getvalue() == "x\n"


def test_parquet_output_round_trips(tmp_path: Path) -> None:
    _fill(tmp_path)
    sql = "SELECT * FROM bars_1m ORDER BY symbol, ts"
    out = tmp_path / "out.parquet"
    n = cat.write_query(tmp_path, sql, "parquet", out, batch_rows=7)
    back = pq.read_table(out)
    expected = cat.query_arrow(tmp_path, sql)
    assert n == expected.num_rows == back.num_rows and back.equals(expected)
    assert back.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    batches = list(cat.iter_arrow(tmp_path, sql, batch_rows=7))
    assert max(b.num_rows for b in batches) <= 7 and sum(b.num_rows for b in batches) == n
    with pytest.raises(ValueError, match="parquet"):
        cat.query(tmp_path, sql, "parquet")


def test_sql_command_parquet_output_and_formats(tmp_path: Path) -> None:
    _fill(tmp_path)
    env = {**subprocess_env(), "KTRDR_DATA_DIR": str(tmp_path)}

    def sql(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "sql", *args],
                              env=env, capture_output=True, text=True, timeout=120)

    out = tmp_path / "result.parquet"
    done = sql("SELECT symbol, ts, close FROM bars_1m ORDER BY symbol, ts", "--format",
               "parquet", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    frame = pq.read_table(out).to_pandas()
    assert list(frame.columns) == ["symbol", "ts", "close"]
    assert len(frame) == len(cat.run_query(tmp_path, "SELECT * FROM bars_1m").rows)
    refused = sql("SELECT 1", "--format", "parquet")
    assert refused.returncode == 2 and "--output FILE" in refused.stderr
    text_out = tmp_path / "result.csv"
    done = sql("SELECT count(*) AS n FROM bars_1h", "--format", "csv", "--output",
               str(text_out))
    assert done.returncode == 0 and done.stdout == ""
    assert list(csv.reader(text_out.open())) == [["n"], ["11"]]
    done = sql("SELECT count(*) AS n FROM bars_1h", "--format", "json")
    assert json.loads(done.stdout) == [{"n": 11}]


def test_sql_command_starts_without_pandas_dagster_or_the_ib_client(tmp_path: Path) -> None:
    env = {**subprocess_env(), "KTRDR_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ktrdr_pipeline.cli",
                           "sql", "select 1"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    assert "duckdb" in modules  # the premise: -X importtime lists what was imported
    heavy = {m for m in modules if m.split(".")[0] in (
        "pandas", "dagster", "ib_async", "pyarrow", "asyncio", "pandera",
        "exchange_calendars")}
    assert not heavy, sorted(heavy)[:10]


def test_the_research_api_is_exported_lazily() -> None:
    code = ("import sys, ktrdr_pipeline; assert 'pandas' not in sys.modules; "
            "f = ktrdr_pipeline.read_bars; assert callable(f) and "
            "callable(ktrdr_pipeline.latest_bars)")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

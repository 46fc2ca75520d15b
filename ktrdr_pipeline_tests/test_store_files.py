"""The seam of :mod:`ktrdr_pipeline.store.files`: which files hold which bars, from the
partition manifest when it is settled, from the directory layout otherwise — the same
files either way (issue 15)."""

from __future__ import annotations

import glob
import os
import pathlib
from datetime import date
from pathlib import Path

import pytest

import ktrdr_pipeline
from ktrdr_pipeline.store import catalog as cat
from ktrdr_pipeline.store import files
from ktrdr_pipeline.store.manifest import MANIFEST_FILE, SqliteManifest

from .test_sql_read import _fill


def _answers(data_dir: Path) -> dict[str, object]:
    """Every question the seam answers, with globs expanded to the files they match."""

    def expand(sources: list[str]) -> list[str]:
        return sorted({f for s in sources for f in glob.glob(s)})

    return {
        "periods_aapl": files.symbol_periods(data_dir, "1m", "AAPL"),
        "periods_spy": files.symbol_periods(data_dir, "1m", "SPY"),
        "periods_none": files.symbol_periods(data_dir, "1m", "NOPE"),
        "periods_1h": files.symbol_periods(data_dir, "1h", "AAPL"),
        "symbols_1m": files.stored_symbols(data_dir, "1m"),
        "universe_1m": files.timeframe_files(data_dir, "1m"),
        "universe_1d": files.timeframe_files(data_dir, "1d"),
        "symbols_1d": files.stored_symbols(data_dir, "1d"),
        "has_1m": files.has_files(data_dir, "1m"),
        "has_1m_spy": files.has_files(data_dir, "1m", "SPY"),
        "has_1m_nope": files.has_files(data_dir, "1m", "NOPE"),
        "has_1d": files.has_files(data_dir, "1d"),
        "all_1m": expand(files.timeframe_sources(data_dir, "1m")),
        "spy": expand(files.timeframe_sources(data_dir, "1m", ["SPY", "NOPE", "x/../y"])),
        "march": expand(files.timeframe_sources(data_dir, "1m", periods=["2024-03"])),
        "aapl_march": expand(files.timeframe_sources(data_dir, "1m", ["AAPL"], ["2024-03"])),
        "nothing": files.timeframe_sources(data_dir, "1m", ["NOPE"]),
        "nothing_1d": files.timeframe_sources(data_dir, "1d"),
    }


@pytest.fixture
def no_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any directory listing, or existence probe below ``bars/``, from Python fails the
    test (the manifest's own file may be probed)."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a directory was listed or probed: {args!r}")

    def probe(original):
        def checked(self: pathlib.Path, *args: object, **kwargs: object) -> bool:
            if "bars" in self.parts:
                boom(self)
            return original(self, *args, **kwargs)
        return checked

    monkeypatch.setattr(os, "scandir", boom)
    monkeypatch.setattr(os, "listdir", boom)
    for name in ("glob", "rglob", "iterdir"):
        monkeypatch.setattr(pathlib.Path, name, boom)
    for name in ("is_dir", "is_file"):
        monkeypatch.setattr(pathlib.Path, name, probe(getattr(pathlib.Path, name)))


def test_manifest_and_listing_give_the_same_files(tmp_path: Path) -> None:
    _fill(tmp_path)
    manifest = SqliteManifest(tmp_path / MANIFEST_FILE)
    assert manifest.settled_files("1m") is not None  # the premise: the manifest is settled
    from_manifest = _answers(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    assert manifest.settled_files("1m") is None
    from_listing = _answers(tmp_path)
    assert from_manifest == from_listing
    # the premise of the comparison: the questions have non-trivial answers
    assert [p for p, _ in from_listing["periods_aapl"]] == ["2024-02", "2024-03", "2024-04"]
    assert from_listing["symbols_1m"] == ["AAPL", "SPY"]
    assert from_listing["universe_1m"] == {"AAPL": from_listing["periods_aapl"],
                                           "SPY": from_listing["periods_spy"]}
    assert len(from_listing["spy"]) == 2 and len(from_listing["march"]) == 2
    assert len(from_listing["aapl_march"]) == 1 and from_listing["nothing"] == []
    assert from_listing["has_1m_spy"] and not from_listing["has_1d"]


def test_a_settled_manifest_answers_without_listing_a_directory(tmp_path: Path,
                                                                request) -> None:
    store = _fill(tmp_path)
    expected = store.read_range("1m", "SPY", date(2000, 1, 1), date(2100, 1, 1))
    request.getfixturevalue("no_listing")
    assert files.stored_symbols(tmp_path, "1m") == ["AAPL", "SPY"]
    assert list(files.timeframe_files(tmp_path, "1m")) == ["AAPL", "SPY"]
    assert len(ktrdr_pipeline.latest_bars("1m", 3, data_dir=tmp_path)) == 6
    assert [p for p, _ in files.symbol_periods(tmp_path, "1m", "AAPL")] == [
        "2024-02", "2024-03", "2024-04"]
    sources = files.timeframe_sources(tmp_path, "1m", ["SPY"])
    root = files.bars_root(tmp_path).as_posix()
    assert sources == [f"{root}/timeframe=1m/symbol=SPY/period={p}/data.parquet"
                       for p in ("2024-02", "2024-03")]  # the files themselves, no glob
    got = ktrdr_pipeline.read_bars("SPY", "1m", data_dir=tmp_path)
    assert len(got) == len(expected) > 0
    res = cat.run_query(tmp_path, "SELECT count(*) FROM bars_1m WHERE symbol = 'SPY'")
    assert res.rows == [(len(expected),)]


def test_a_write_in_flight_or_an_incomplete_manifest_means_listing(tmp_path: Path) -> None:
    _fill(tmp_path)
    manifest = SqliteManifest(tmp_path / MANIFEST_FILE)
    settled = _answers(tmp_path)
    # a writer between its intent and its row: its file may be newer than the manifest
    manifest.begin_write("1m", "SPY", "2024-04", lambda: True)
    assert manifest.settled_files("1m") is None and manifest.settled_symbols("1m") is None
    (files.bars_root(tmp_path) / "timeframe=1m/symbol=SPY/period=2024-04").mkdir()
    (files.bars_root(tmp_path) / "timeframe=1m/symbol=SPY/period=2024-04/data.parquet"
     ).write_bytes((files.bars_root(tmp_path)
                    / "timeframe=1m/symbol=SPY/period=2024-03/data.parquet").read_bytes())
    listed = files.symbol_periods(tmp_path, "1m", "SPY")
    assert [p for p, _ in listed] == ["2024-02", "2024-03", "2024-04"]  # the new file too
    assert _answers(tmp_path)["symbols_1m"] == settled["symbols_1m"]
    # a manifest that is not a database: the listing answers, nothing is raised
    (tmp_path / MANIFEST_FILE).write_bytes(b"not sqlite")
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp_path / MANIFEST_FILE}{suffix}").unlink(missing_ok=True)
    assert [p for p, _ in files.symbol_periods(tmp_path, "1m", "SPY")] == [
        "2024-02", "2024-03", "2024-04"]

"""The DuckDB lock holder the store tests use: it holds when it says so, waits for a
writer that holds the file for a moment, and fails clearly when it cannot take it."""

from __future__ import annotations

import threading

import duckdb
import pytest

from .lockholder import DuckDBLockHolder


def _is_locked(db) -> bool:
    try:
        duckdb.connect(str(db)).close()
    except duckdb.IOException as exc:
        assert "lock" in str(exc).lower(), exc
        return True
    return False


def test_holds_until_released(tmp_path):
    db = tmp_path / "x.duckdb"
    with DuckDBLockHolder(db) as holder:
        assert holder.holding()
        assert _is_locked(db)
        assert holder.holding()
        holder.release()
        assert not holder.holding() and holder.proc.returncode == 0
        assert not _is_locked(db)


def test_waits_for_a_writer_that_holds_the_file(tmp_path):
    db = tmp_path / "x.duckdb"
    writer = duckdb.connect(str(db))
    got: list[DuckDBLockHolder] = []
    starting = threading.Thread(target=lambda: got.append(DuckDBLockHolder(db)))
    starting.start()
    # the holder cannot have taken the file while this process holds it
    assert not got
    writer.close()
    starting.join(90)
    assert not starting.is_alive() and got, "the holder did not take the freed file"
    with got[0] as holder:
        assert holder.holding() and _is_locked(db)


def test_fails_clearly_when_it_cannot_take_the_file(tmp_path):
    db = tmp_path / "x.duckdb"
    writer = duckdb.connect(str(db))
    try:
        with pytest.raises(AssertionError, match=r"did not take .*x\.duckdb: it said 'failed:"):
            DuckDBLockHolder(db, patience=0.2)
    finally:
        writer.close()

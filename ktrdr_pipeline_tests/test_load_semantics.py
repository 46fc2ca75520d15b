"""``ktrdr-pipeline load`` does what a user predicts (issue 14): an explicit window is always
loaded whole, empty results say why and exit non-zero, bad input is refused before anything
is created or any connection is opened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.store.parquet import BarStore

REPO = Path(__file__).resolve().parents[1]
CLOCK = datetime(2025, 1, 15, 15, 0, tzinfo=UTC)


@pytest.fixture
def gw():
    with GatewayThread(clock=CLOCK, latency="none") as gateway:
        yield gateway


def _load(data_dir: Path, port: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KTRDR_DATA_DIR": str(data_dir), "IB_PORT": str(port),
           "IB_CLIENT_ID": "400", "KTRDR_RESET_WINDOW": "off"}
    env.pop("DAGSTER_HOME", None)
    return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "load", *args,
                           "--json"], env=env, capture_output=True, text=True, timeout=300)


def _months(data_dir: Path) -> dict[str, int]:
    store = BarStore(data_dir)
    return {p: len(store.read("1m", "AAPL", p)) for _, _, p in store.partitions("1m", "AAPL")}


@pytest.mark.slow
def test_an_explicit_window_is_always_loaded_whole(gw, tmp_path):
    data = tmp_path / "data"
    december = _load(data, gw.port, "AAPL", "--timeframe", "1m", "--start", "2024-12-01",
                     "--end", "2024-12-31")
    assert december.returncode == 0, december.stderr
    # a wider window afterwards: every missing bar inside it is fetched (the tail mode does
    # not move an explicit --start to the last stored bar)
    wider = _load(data, gw.port, "AAPL", "--timeframe", "1m", "--start", "2024-07-01",
                  "--end", "2024-12-31")
    assert wider.returncode == 0, wider.stderr
    summary = json.loads(wider.stdout)
    assert summary["start"] == "2024-07-01" and summary["ib_requests_made"] > 0
    months = _months(data)
    assert sorted(months) == [f"2024-{m:02d}" for m in range(7, 13)]
    assert all(n > 15 * 390 for n in months.values()), months
    # a window inside what is stored: loaded (nothing missing), no invented dates
    inner = _load(data, gw.port, "AAPL", "--timeframe", "1m", "--start", "2024-12-01",
                  "--end", "2024-12-15")
    assert inner.returncode == 0, inner.stderr
    assert json.loads(inner.stdout)["ib_requests_made"] == 0
    # a partition lost in the middle is fetched again by a window that covers it
    BarStore(data).delete("1m", "AAPL", "2024-09")
    again = _load(data, gw.port, "AAPL", "--timeframe", "1m", "--start", "2024-07-01",
                  "--end", "2024-12-31")
    assert again.returncode == 0, again.stderr
    assert _months(data) == months


@pytest.mark.slow
@pytest.mark.parametrize("args, why", [
    (("RBLX", "--timeframe", "1d", "--start", "2020-01-02", "--end", "2020-12-31"),
     "before IB's earliest data for RBLX (2021-03-10)"),
    (("AAPL", "--timeframe", "1d", "--start", "2030-01-02", "--end", "2030-01-31"),
     "after the gateway's clock"),
    (("AAPL", "--timeframe", "5s", "--start", "2024-03-04", "--end", "2024-03-04"),
     "older than IB keeps 5 secs bars"),
])
def test_an_empty_result_says_why_and_exits_non_zero(gw, tmp_path, args, why):
    out = _load(tmp_path / "data", gw.port, *args)
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert summary["status"] == "empty" and why in summary["reason"], summary
    assert f"nothing loaded: {summary['reason']}" in out.stderr
    assert not list((tmp_path / "data").rglob("*.parquet"))  # no empty file


@pytest.mark.parametrize("args, message", [
    (("AAPL", "--timeframe", "1d", "--start", "2024-12-15", "--end", "2024-12-01"),
     "--start 2024-12-15 is after --end 2024-12-01"),
    (("A" * 30, "--timeframe", "1d"), "(30 characters); allowed: at most 24"),
    (("AAPL;RM", "--timeframe", "1d"), "invalid symbol 'AAPL;RM'"),
])
def test_bad_input_is_refused_before_anything_is_created(tmp_path, args, message):
    data = tmp_path / "data"
    out = _load(data, 1, *args)  # port 1: nothing listens, and nothing must try
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not data.exists()

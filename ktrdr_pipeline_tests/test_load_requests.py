"""A year of 1-min RTH bars for one stock costs a fifth of the requests it used to (issue 12):
whole sessions up to the bar budget (LEAN's 7 D) instead of IB's old step-size example
(1 D per 1-min request, 252 requests for 2024), and the same bars, bar for bar.

What a request returns follows domain/durations.py (docs/ib-facts.md §2: ``N D`` = the N
sessions ending at or before the end); the simulator answers with the same semantics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from ktrdr_pipeline.domain.timeframes import get_timeframe
from ktrdr_pipeline.simulator.market import C, H, L, O, T, V
from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.store.parquet import BarStore

from .conftest import read_audit

CLOCK = datetime(2025, 1, 15, 15, 0, tzinfo=UTC)
#: Requests the planner of 1-D chunks made for this load (measured at commit 96ab5a1).
OLD_REQUESTS = 252


def test_a_year_of_minute_bars_in_a_fifth_of_the_requests_same_bars(tmp_path, audit_path):
    data = tmp_path / "data"
    with GatewayThread(clock=CLOCK, latency="none", audit_log=audit_path) as gw:
        env = {**os.environ, "KTRDR_DATA_DIR": str(data), "IB_PORT": str(gw.port),
               "IB_CLIENT_ID": "400", "KTRDR_RESET_WINDOW": "off"}
        env.pop("DAGSTER_HOME", None)
        env.pop("KTRDR_MAX_BARS_PER_REQUEST", None)  # the default budget
        done = subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "load", "AAPL",
                               "--timeframe", "1m", "--start", "2024-01-01", "--end",
                               "2024-12-31", "--json"], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        inst = gw.server.universe.instruments[265598]
        start, _ = get_timeframe("1m").period_bounds("2024-01")
        _, end = get_timeframe("1m").period_bounds("2024-12")
        expected = gw.server.market.bars(inst, "1 min", start, end, True, CLOCK)
    events = read_audit(audit_path)
    requests = [e for e in events if e["message"] == "reqHistoricalData"]
    assert summary["error"] is None and summary["ib_requests_made"] == len(requests)
    assert len(requests) <= OLD_REQUESTS // 5, len(requests)
    assert not [e for e in events if e["message"] in ("error", "fault", "pacing")]
    store = BarStore(data)
    stored = pd.concat([store.read("1m", "AAPL", p)
                        for _, _, p in store.partitions("1m", "AAPL")]).sort_index()
    assert len(stored) == len(expected) == 252 * 390 - 3 * 180  # 3 half days (210 bars) in 2024
    np.testing.assert_array_equal(stored.index.asi8 // 10**9, expected[:, T].astype(np.int64))
    for col, k in (("open", O), ("high", H), ("low", L), ("close", C), ("volume", V)):
        np.testing.assert_array_equal(stored[col].to_numpy(), expected[:, k])

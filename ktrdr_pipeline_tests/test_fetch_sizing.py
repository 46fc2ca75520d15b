"""The fetcher sizes its requests to IB's speed: a timed-out request is split (never sent
again at the same size), down to one session; slow answers shrink the rest of the plan.

IB's service time, not a rule, limits big requests (docs/ib-facts.md §2: 6 D of 1-min bars
timed out at 60 s on a busy day, ib_insync #268). The simulator's ``stall`` fault never
answers; its latency model waits per bar. Every test waits for states (answers, timeouts),
never for wall-clock bounds.

The weeks used (Mon-Fri without holidays) make ``N D`` ending at a Friday close mean the
same sessions under any reading of ``D``, so these tests hold for the simulator before and
after it adopts domain/durations.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from ib_async import Contract

from ktrdr_pipeline.domain import calendars
from ktrdr_pipeline.domain.ib_rules import PacingLimits
from ktrdr_pipeline.domain.planning import plan_requests
from ktrdr_pipeline.ib.connection import IBConnection
from ktrdr_pipeline.ib.errors import IBError
from ktrdr_pipeline.ib.fetch import HistoricalFetcher
from ktrdr_pipeline.ib.governor import PacingGovernor
from ktrdr_pipeline.ib.ledger import MemoryPacingLedger
from ktrdr_pipeline.simulator.latency import LatencyModel
from ktrdr_pipeline.simulator.server import GatewayThread

from .conftest import MARKET_OPEN, read_audit

AAPL = Contract(conId=265598, symbol="AAPL", secType="STK", exchange="SMART", currency="USD")
WEEK = (datetime(2026, 11, 9, tzinfo=UTC), datetime(2026, 11, 14, tzinfo=UTC))  # Mon-Fri
FOUR_WEEKS = (datetime(2026, 10, 19, tzinfo=UTC), datetime(2026, 11, 14, tzinfo=UTC))


def _sent(audit_path) -> list[tuple[str, str]]:
    return [(e["end"], e["duration"]) for e in read_audit(audit_path)
            if e["message"] == "reqHistoricalData"]


async def _fetch(port: int, plan, **kw):
    conn = IBConnection("127.0.0.1", port, 1, backoff_s=0.05)
    await conn.connect()
    try:
        governor = PacingGovernor(MemoryPacingLedger(), PacingLimits())
        return await HistoricalFetcher(conn, governor, backoff_s=0.05, **kw).fetch(AAPL, plan)
    finally:
        await conn.disconnect()


def test_a_timed_out_request_is_split_not_resent(gateway, audit_path):
    plan = plan_requests(calendars.STOCK, "1 min", *WEEK, "TRADES", True, now=MARKET_OPEN)
    assert [r.duration for r in plan] == ["5 D"]
    gateway.inject("stall", 1)
    # a timeout no real answer comes near, even on a loaded machine (0.5 s once made a
    # half look slow, shrinking the budget further): only the stalled request times out
    result = asyncio.run(_fetch(gateway.port, plan, timeout_s=10.0))
    sent = _sent(audit_path)
    assert sent[0][1] == "5 D" and len(sent) == 3
    assert sorted(d for _, d in sent[1:]) == ["2 D", "3 D"]  # the two halves, once each
    assert result.splits == 1 and result.requests_made == 3
    assert len(result.frame) == 5 * 390


def test_splitting_stops_at_one_session_then_retries_and_fails(gateway, audit_path):
    plan = plan_requests(calendars.STOCK, "1 min", *WEEK, "TRADES", True, now=MARKET_OPEN)
    gateway.inject("stall", 100)
    with pytest.raises(IBError, match="gave up after 2 attempts"):
        asyncio.run(_fetch(gateway.port, plan, timeout_s=0.3, attempts=2))
    sent = _sent(audit_path)
    counts = [int(d.split()[0]) for _, d in sent]
    assert counts[0] == 5 and counts[-2:] == [1, 1]  # halved down to one session
    assert all(b < a for a, b in zip(counts[:-2], counts[1:-1], strict=True))
    assert sent[-1] == sent[-2]  # only the single session is sent again (the retry)
    assert len(set(sent[:-1])) == len(sent) - 1


def test_slow_answers_shrink_the_rest_of_the_plan(audit_path):
    # 1950 bars (a 5 D request) take at least 0.585 s: more than half the 1 s timeout
    slow = LatencyModel(per_bar_s=0.0003)
    with GatewayThread(clock=MARKET_OPEN, latency=slow, audit_log=audit_path) as gw:
        plan = plan_requests(calendars.STOCK, "1 min", *FOUR_WEEKS, "TRADES", True,
                             now=MARKET_OPEN, max_bars=1950)
        assert [r.duration for r in plan] == ["5 D"] * 4
        result = asyncio.run(_fetch(gw.port, plan, timeout_s=1.0, max_concurrency=1,
                                    max_bars=1950))
    sent = _sent(audit_path)
    assert sent[0][1] == "5 D"
    assert result.max_bars < 1950
    assert all(int(d.split()[0]) < 5 for _, d in sent[1:])  # the rest asked in less
    assert len(sent) > len(plan)
    assert len(result.frame) == 20 * 390

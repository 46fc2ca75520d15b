"""Each IB rule the simulator enforces, provoked through ib_async, with its exact code."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from ib_async import Contract, Forex, Stock

from ktrdr_pipeline.domain import ib_rules
from ktrdr_pipeline.simulator.server import GatewayThread

from .conftest import MARKET_OPEN, ErrorLog, RawClient, connect, read_audit, wait_until

AAPL = Stock("AAPL", "SMART", "USD")


def _codes_for(errors: ErrorLog, code: int) -> list[str]:
    return [m for _, c, m in errors.items if c == code]


def _small_bars(ib, contract, end: str, what: str = "TRADES", timeout: float = 5):
    return ib.reqHistoricalData(contract, end, "1800 S", "5 secs", what, True, 2,
                                timeout=timeout)


def _bars_until_error(ib, errors: ErrorLog, code: int, *request) -> list:
    """``reqHistoricalData(*request)``, waiting for IB's error ``code`` instead of a
    timeout: ib_async takes 321 for a warning and would leave the request open."""
    seen = len(errors.items)
    task = asyncio.ensure_future(ib.reqHistoricalDataAsync(*request))
    try:
        wait_until(lambda: task.done() or code in [c for _, c, _ in errors.items[seen:]],
                   f"error {code} for {request}", sleep=ib.sleep)
    finally:
        if not task.done():
            task.cancel()
            ib.sleep(0)
    return [] if task.cancelled() else list(task.result())


@pytest.fixture
def fast_pacing(audit_path):
    """Pacing windows shrunk 50× (15 s → 0.3 s, 2 s → 0.04 s, 600 s → 12 s)."""
    with GatewayThread(clock=MARKET_OPEN, latency="none", audit_log=audit_path,
                       pacing_time_scale=0.02) as gw:
        yield gw


def test_identical_request_within_15_seconds_is_a_pacing_violation(gateway, ib):
    errors = ErrorLog(ib)
    end = "20261117 15:00:00 US/Eastern"
    assert len(_small_bars(ib, AAPL, end)) == 360
    assert len(_small_bars(ib, AAPL, end)) == 0
    assert _codes_for(errors, 162) == [ib_rules.MSG_PACING_VIOLATION]
    # a different end time is not identical and is served
    assert len(_small_bars(ib, AAPL, "20261117 14:00:00 US/Eastern")) == 360


def test_identical_request_allowed_after_the_window(fast_pacing):
    ib = connect(fast_pacing)
    try:
        end = "20261117 15:00:00 US/Eastern"
        assert len(_small_bars(ib, AAPL, end)) == 360
        time.sleep(0.35)
        assert len(_small_bars(ib, AAPL, end)) == 360
    finally:
        ib.disconnect()


def test_six_requests_for_one_contract_within_two_seconds(gateway, ib):
    errors = ErrorLog(ib)
    ends = [f"20261117 {10 + i}:00:00 US/Eastern" for i in range(6)]
    results = [len(_small_bars(ib, AAPL, e)) for e in ends]
    assert results[:5] == [360] * 5
    assert results[5] == 0
    assert _codes_for(errors, 162) == [ib_rules.MSG_PACING_VIOLATION]
    # another contract has its own budget
    assert len(_small_bars(ib, Stock("MSFT", "SMART", "USD"), ends[0])) == 360


def test_bid_ask_counts_twice(gateway, ib):
    errors = ErrorLog(ib)
    ends = [f"20261117 {10 + i}:00:00 US/Eastern" for i in range(3)]
    served = [len(_small_bars(ib, AAPL, e, "BID_ASK")) for e in ends]
    # 2 + 2 = 4 of 5 allowed; a third BID_ASK would make 6
    assert served == [360, 360, 0]
    assert _codes_for(errors, 162) == [ib_rules.MSG_PACING_VIOLATION]


def test_sixty_requests_per_ten_minutes(fast_pacing, audit_path):
    """With the windows scaled, 60 requests fit in 12 s; the 61st is refused."""
    ib = connect(fast_pacing)
    errors = ErrorLog(ib)
    symbols = ["AAPL", "MSFT", "SPY", "TSLA", "NVDA", "RBLX"]
    try:
        served = 0
        for i in range(61):
            end = (datetime(2026, 11, 17, 20, 0, tzinfo=UTC)
                   - timedelta(minutes=30 * (i // 6)))
            bars = ib.reqHistoricalData(Stock(symbols[i % 6], "SMART", "USD"), end, "1800 S",
                                        "30 secs", "MIDPOINT", False, 2, timeout=5)
            served += bool(bars)
        violations = [e for e in read_audit(audit_path) if e["message"] == "pacing"]
        assert served == 60, violations
        assert _codes_for(errors, 162) == [ib_rules.MSG_PACING_VIOLATION]
        assert len(violations) == 1 and "60" in violations[0]["rule"]
    finally:
        ib.disconnect()


def test_head_timestamp_requests_are_paced(gateway, ib):
    errors = ErrorLog(ib)
    assert ib.reqHeadTimeStamp(AAPL, "TRADES", True, 2)
    ib.RaiseRequestErrors = False
    second = ib.reqHeadTimeStamp(AAPL, "TRADES", True, 2)
    assert second in ([], None)
    assert _codes_for(errors, 162) == [ib_rules.MSG_PACING_VIOLATION]


def test_bars_of_one_minute_and_larger_are_not_hard_paced(gateway, ib):
    end = "20261117 16:00:00 US/Eastern"
    for _ in range(8):
        assert len(ib.reqHistoricalData(AAPL, end, "1 D", "1 min", "TRADES", True, 2)) == 390


def test_fifty_open_historical_requests(gateway):
    raw = RawClient(gateway.port, 55)
    try:
        gateway.inject("stall", 50)
        contract = ["265598", "AAPL", "STK", "", "0", "", "", "SMART", "", "USD", "", ""]
        for req_id in range(1, 52):
            raw.send(20, req_id, *contract, 0, "20261117 16:00:00 US/Eastern", "1 min",
                     "1 D", 1, "TRADES", 2, 0, "")
        answer = raw.read_until("4", "51")
        assert answer[3] == str(ib_rules.ERR_PROCESSING)
        assert "50 simultaneous" in answer[4]
        # cancelling one stalled request frees a slot
        raw.send(25, 1, 1)
        assert raw.read_until("4", "1")[3] == "162"
        raw.send(20, 52, *contract, 0, "20261117 16:00:00 US/Eastern", "1 min", "1 D", 1,
                 "TRADES", 2, 0, "")
        assert raw.read_until("17", "52")[4] == "390"
    finally:
        raw.close()


@pytest.mark.parametrize(("bar_size", "duration"), [
    ("1 min", "2 D"), ("5 secs", "7201 S"), ("1 hour", "2 M"), ("1 day", "2 Y"),
    ("1 secs", "3600 S"), ("5 mins", "8 D"),
])
def test_duration_over_the_maximum_is_321(gateway, ib, bar_size, duration):
    errors = ErrorLog(ib)
    bars = _bars_until_error(ib, errors, 321, AAPL, "20261117 16:00:00 US/Eastern", duration,
                             bar_size, "MIDPOINT", True, 2)
    assert len(bars) == 0
    assert any("Time length exceed max" in m for m in _codes_for(errors, 321))


@pytest.mark.parametrize(("bar_size", "duration", "fragment"), [
    ("7 mins", "1 D", "bar size setting is invalid"),
    ("1 min", "90000 S", "must be in days"),
    ("1 day", "400 D", "must be in years"),
    ("1 min", "1 day", "Invalid duration"),
])
def test_invalid_request_is_321(gateway, ib, bar_size, duration, fragment):
    errors = ErrorLog(ib)
    _bars_until_error(ib, errors, 321, AAPL, "", duration, bar_size, "TRADES", True, 2)
    assert any(fragment in m for m in _codes_for(errors, 321)), errors.items


def test_small_bars_older_than_six_months_have_no_data(gateway, ib):
    errors = ErrorLog(ib)
    old = MARKET_OPEN - timedelta(days=200)
    bars = ib.reqHistoricalData(AAPL, old, "3600 S", "30 secs", "TRADES", False, 2, timeout=2)
    assert len(bars) == 0
    assert any("HMDS query returned no data" in m for m in _codes_for(errors, 162))


def test_no_data_before_head_timestamp_or_when_closed(gateway, ib):
    errors = ErrorLog(ib)
    rblx = Stock("RBLX", "SMART", "USD")
    assert len(ib.reqHistoricalData(rblx, "20210301 16:00:00 US/Eastern", "1 W", "1 hour",
                                    "TRADES", True, 2, timeout=2)) == 0
    # Saturday: closed market
    assert len(ib.reqHistoricalData(AAPL, "20261114 16:00:00 US/Eastern", "3600 S", "1 min",
                                    "TRADES", True, 2, timeout=2)) == 0
    # Thanksgiving 2025, all day
    assert len(ib.reqHistoricalData(AAPL, "20251127 20:00:00 US/Eastern", "57600 S", "1 min",
                                    "TRADES", False, 2, timeout=2)) == 0
    no_data = [m for m in _codes_for(errors, 162) if "HMDS query returned no data" in m]
    assert len(no_data) == 3


def test_fx_trades_has_no_data_but_midpoint_does(gateway, ib):
    """FX has no TRADES: IB answers 162 "No historical market data for EUR/CASH@FXSUBPIP
    Last 1d" (``docs/ib-facts.md`` §2/§3; the step is the bar size in seconds below a day)."""
    errors = ErrorLog(ib)
    eur = Forex("EURUSD")
    end = "20261117 16:00:00 US/Eastern"
    assert len(ib.reqHistoricalData(eur, end, "1 D", "1 hour", "TRADES", False, 2,
                                    timeout=2)) == 0
    assert len(ib.reqHistoricalData(eur, end, "5 D", "1 day", "TRADES", False, 2,
                                    timeout=2)) == 0
    assert _codes_for(errors, 162) == [
        ib_rules.HMDS_PREFIX + "No historical market data for EUR/CASH@FXSUBPIP Last 3600",
        ib_rules.HMDS_PREFIX + "No historical market data for EUR/CASH@FXSUBPIP Last 1d"]
    assert len(ib.reqHistoricalData(eur, end, "1 D", "1 hour", "MIDPOINT", False, 2)) == 24


def test_unknown_and_ambiguous_contracts_are_200(gateway, ib):
    errors = ErrorLog(ib)
    ib.reqHistoricalData(Stock("ZZZZ", "SMART", "USD"), "", "1 D", "1 hour", "TRADES", True, 2,
                         timeout=2)
    ib.reqHistoricalData(Contract(symbol="ES", secType="FUT", exchange="CME"), "", "1 D",
                         "1 hour", "TRADES", False, 2, timeout=2)
    messages = _codes_for(errors, 200)
    assert len(messages) == 2
    assert "No security definition" in messages[0]
    assert "ambiguous" in messages[1]


def test_bid_ask_head_timestamps_weigh_two_as_for_the_governor(audit_path):
    """IB counts BID_ASK twice in every pacing rule, head timestamps included
    (``docs/ib-facts.md`` §1): two BID_ASK head timestamps (weight 4) and a BID_ASK
    5-second request (2) for one contract exceed the 5 allowed in 2 s. The keys come from
    ``domain.pacing``, the one builder the governor uses too. Windows are stretched 10×
    so that a busy machine cannot let the first requests age out of the window."""
    from ktrdr_pipeline.domain.pacing import bars_pacing_key, head_timestamp_pacing_key

    assert head_timestamp_pacing_key("1", "SMART", "BID_ASK", True).weight == 2
    assert bars_pacing_key("1", "SMART", "", "1800 S", "5 secs", "BID_ASK", True).weight == 2
    with GatewayThread(clock=MARKET_OPEN, latency="none", audit_log=audit_path,
                       pacing_time_scale=10) as gw:
        ib = connect(gw)
        try:
            errors = ErrorLog(ib)
            ib.RaiseRequestErrors = False
            assert ib.reqHeadTimeStamp(AAPL, "BID_ASK", True, 2)
            assert ib.reqHeadTimeStamp(AAPL, "BID_ASK", False, 2)
            assert len(_small_bars(ib, AAPL, "20261117 15:00:00 US/Eastern", "BID_ASK")) == 0
            assert _codes_for(errors, 162) == [ib_rules.MSG_PACING_VIOLATION]
        finally:
            ib.disconnect()

"""Each IB rule the simulator enforces, provoked through ib_async, with its exact code."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from ib_async import Contract, Forex, Stock

from ktrdr_pipeline.domain import calendars, ib_rules
from ktrdr_pipeline.simulator.server import GatewayThread

from .conftest import MARKET_OPEN, ErrorLog, RawClient, connect, read_audit, wait_until

AAPL = Stock("AAPL", "SMART", "USD")
ET = ZoneInfo("US/Eastern")


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
    ("1 secs", "2001 S"), ("1 secs", "1 D"), ("1 hour", "53 W"), ("1 day", "13 M"),
    ("1 month", "69 Y"),
])
def test_too_long_a_request_is_162_time_length_exceed_max(gateway, ib, bar_size, duration):
    """docs/ib-facts.md §2/§3: IB answers a request too long for its bar size with 162
    "Historical Market Data Service error message:Time length exceed max." (not 321):
    1 secs bars over 2000 S, any size over 52 W / 12 M / 68 Y (86400 S and 365 D are
    parse_duration's 321 rules, test_invalid_request_is_321)."""
    errors = ErrorLog(ib)
    bars = ib.reqHistoricalData(AAPL, "20261117 16:00:00 US/Eastern", duration, bar_size,
                                "MIDPOINT", True, 2, timeout=10)
    assert len(bars) == 0
    assert _codes_for(errors, 162) == [
        "Historical Market Data Service error message:Time length exceed max."]
    assert ib_rules.MSG_TIME_LENGTH_EXCEEDED == _codes_for(errors, 162)[0]
    assert 321 not in errors.codes()


@pytest.mark.parametrize(("bar_size", "duration", "bars"), [
    # the old step-size table (1 min -> 1 D, 1 secs -> 1800 S, 1 hour -> 1 M...) is no
    # rule (docs/ib-facts.md §2): IB's own sample asks for 10 D of 1-min bars
    ("1 secs", "2000 S", 2000), ("1 min", "2 D", 780), ("5 mins", "8 D", 8 * 78),
    ("1 hour", "52 W", None), ("1 day", "12 M", None), ("1 month", "68 Y", None),
])
def test_ib_current_maximum_durations_are_accepted(gateway, ib, bar_size, duration, bars):
    errors = ErrorLog(ib)
    answer = ib.reqHistoricalData(AAPL, "20261117 16:00:00 US/Eastern", duration, bar_size,
                                  "MIDPOINT", True, 2, timeout=30)
    assert errors.items == []
    assert len(answer) == bars if bars is not None else len(answer) > 0


def test_ten_days_of_one_minute_bars_are_ten_sessions(gateway, ib):
    """docs/ib-facts.md §2: `10 D` (IB's own sample) is accepted and means 10 sessions."""
    bars = ib.reqHistoricalData(AAPL, "20261117 16:00:00 US/Eastern", "10 D", "1 min",
                                "TRADES", True, 2, timeout=30)
    assert len(bars) == 3900
    assert bars[0].date == datetime(2026, 11, 4, 9, 30, tzinfo=ET)
    assert bars[-1].date == datetime(2026, 11, 17, 15, 59, tzinfo=ET)


def test_365_days_of_one_minute_bars_are_accepted(gateway, ib):
    """365 D is the longest day count IB accepts for every bar size from 5 secs up
    (docs/ib-facts.md §2): 365 sessions of 1-min bars in one answer."""
    end = datetime(2026, 11, 17, 16, 0, tzinfo=ET)
    bars = ib.reqHistoricalData(AAPL, end, "365 D", "1 min", "TRADES", True, 2, timeout=120)
    sessions = [s for s in calendars.sessions_between(calendars.STOCK, bars[0].date, end, True)
                if s.open < end]
    assert len(sessions) == 365 and sessions[0].open == bars[0].date
    assert len(bars) == sum((s.close - s.open) // timedelta(minutes=1) for s in sessions)


# -- durations as IB means them (docs/ib-facts.md §2) -------------------------------------
def test_five_days_of_daily_bars_are_the_last_five_sessions(gateway, ib):
    """`5 D` = the 5 sessions ending at or before the end; 2025-01-09 was a market
    closure (a national day of mourning), so it is no session."""
    bars = ib.reqHistoricalData(AAPL, "20250110 16:00:00 US/Eastern", "5 D", "1 day",
                                "TRADES", True, 1)
    assert [b.date for b in bars] == [date(2025, 1, 3), date(2025, 1, 6), date(2025, 1, 7),
                                      date(2025, 1, 8), date(2025, 1, 10)]


def test_two_days_ending_monday_midnight_are_the_two_sessions_before(gateway, ib):
    bars = ib.reqHistoricalData(AAPL, "20250113 00:00:00 US/Eastern", "2 D", "1 min",
                                "TRADES", True, 2)
    assert sorted({b.date.astimezone(ET).date() for b in bars}) == [date(2025, 1, 8),
                                                                    date(2025, 1, 10)]
    assert len(bars) == 2 * 390
    assert bars[0].date == datetime(2025, 1, 8, 9, 30, tzinfo=ET)
    assert bars[-1].date == datetime(2025, 1, 10, 15, 59, tzinfo=ET)


def test_86400_seconds_of_rth_hourly_bars_reach_about_3_7_sessions_back(gateway, ib):
    """`S` counts trading seconds per useRTH: 24 h of 6.5-h sessions ending Friday's close
    are Friday, Thursday, Wednesday (19.5 h) and Tuesday's last 4.5 h, from 11:30. Hourly
    RTH bars start at 09:30, 10:00, 11:00 ... 15:00 (7 a session), so the first bar
    starting in that span is Tuesday's 12:00 bar."""
    bars = ib.reqHistoricalData(AAPL, "20250117 16:00:00 US/Eastern", "86400 S", "1 hour",
                                "TRADES", True, 2)
    assert bars[0].date == datetime(2025, 1, 14, 12, 0, tzinfo=ET)
    assert bars[-1].date == datetime(2025, 1, 17, 15, 0, tzinfo=ET)
    assert len(bars) == 4 + 3 * 7


def test_a_request_ending_when_the_market_is_closed_reaches_back_to_its_sessions(gateway, ib):
    """Durations count trading time (docs/ib-facts.md §2), so a request ending on a
    Saturday or a holiday is answered with the last session's bars, not "no data"."""
    saturday = ib.reqHistoricalData(AAPL, "20261114 16:00:00 US/Eastern", "3600 S", "1 min",
                                    "TRADES", True, 2)
    assert saturday[0].date == datetime(2026, 11, 13, 15, 0, tzinfo=ET)  # Friday's last hour
    assert len(saturday) == 60
    # Thanksgiving 2025, all day: 16 h of all-hours trading time are Wednesday's 04:00-20:00
    thanksgiving = ib.reqHistoricalData(AAPL, "20251127 20:00:00 US/Eastern", "57600 S",
                                        "1 min", "MIDPOINT", False, 2)
    assert thanksgiving[0].date == datetime(2025, 11, 26, 4, 0, tzinfo=ET)
    assert thanksgiving[-1].date == datetime(2025, 11, 26, 19, 59, tzinfo=ET)
    assert len(thanksgiving) == 16 * 60


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


def test_no_data_before_head_timestamp(gateway, ib):
    errors = ErrorLog(ib)
    rblx = Stock("RBLX", "SMART", "USD")
    assert len(ib.reqHistoricalData(rblx, "20210301 16:00:00 US/Eastern", "1 W", "1 hour",
                                    "TRADES", True, 2, timeout=2)) == 0
    no_data = [m for m in _codes_for(errors, 162) if "HMDS query returned no data" in m]
    assert len(no_data) == 1


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
    # 1 D = the session in progress at the end (docs/ib-facts.md §2): IDEALPRO's session
    # opened Monday 17:15 US/Eastern (§9), so 23 hourly bars from 22:15 UTC to 21:00 UTC
    bars = ib.reqHistoricalData(eur, end, "1 D", "1 hour", "MIDPOINT", False, 2)
    assert len(bars) == 23 and bars[0].date == datetime(2026, 11, 16, 22, 15, tzinfo=UTC)


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

"""Unmodified ib_async drives every message the simulator supports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from ib_async import IB, Contract, Forex, Future, Stock

from .conftest import MARKET_OPEN, ErrorLog, connect, read_audit, wait_until

ET = ZoneInfo("US/Eastern")


def test_connect_start_up_is_complete(gateway):
    ib = IB()
    # raiseSyncErrors: a start-up request whose end message never comes (positions, open
    # orders, account updates, executions...) fails the connect instead of being logged
    # (connect time is a benchmark figure: benchmarks/bench_gateway.py)
    ib.connect("127.0.0.1", gateway.port, clientId=1, timeout=20, raiseSyncErrors=True)
    try:
        assert ib.client.serverVersion() == 178
        assert ib.managedAccounts() == ["DU0000001"]
        assert abs((ib.reqCurrentTime() - MARKET_OPEN).total_seconds()) < 30
    finally:
        ib.disconnect()


def test_contract_details_time_zone_and_hours(ib):
    [cd] = ib.reqContractDetails(Stock("AAPL", "SMART", "USD"))
    assert cd.contract.conId == 265598
    assert cd.contract.primaryExchange == "NASDAQ"
    assert cd.timeZoneId == "US/Eastern"
    assert cd.liquidHours.startswith("20261118:0930-20261118:1600")
    assert cd.tradingHours.startswith("20261118:0400-20261118:2000")
    # about a week ahead (docs/ib-facts.md §9): the weekend is CLOSED (Thanksgiving and its
    # half day, a week later, are in test_sessions.py)
    assert "20261121:CLOSED;20261122:CLOSED;20261123:0930-20261123:1600" in cd.liquidHours

    [fx] = ib.reqContractDetails(Forex("EURUSD"))
    assert fx.contract.secType == "CASH" and fx.contract.localSymbol == "EUR.USD"
    assert fx.timeZoneId == "US/Eastern"  # IDEALPRO's hours are US/Eastern (§9)

    futures = ib.reqContractDetails(Future("ES", exchange="CME"))
    assert [c.contract.localSymbol for c in futures][:2] == ["ESZ6", "ESH7"]
    assert futures[0].timeZoneId == "US/Central"
    assert futures[0].contract.multiplier == "50"


def test_unknown_contract_details_is_200(ib):
    errors = ErrorLog(ib)
    assert ib.reqContractDetails(Stock("NOPE", "SMART", "USD")) == []
    assert 200 in errors.codes()


def test_historical_format_date_1_and_2_agree(ib):
    aapl = Stock("AAPL", "SMART", "USD", conId=265598)
    end = datetime(2026, 11, 17, 21, 0, tzinfo=UTC)
    epoch = ib.reqHistoricalData(aapl, end, "1 D", "1 min", "TRADES", True, 2)
    text = ib.reqHistoricalData(aapl, end, "1 D", "5 mins", "TRADES", True, 1)
    assert len(epoch) == 390
    assert epoch[0].date == datetime(2026, 11, 17, 14, 30, tzinfo=UTC)
    assert epoch[-1].date == datetime(2026, 11, 17, 20, 59, tzinfo=UTC)
    assert len(text) == 78
    assert text[0].date.tzinfo is not None and str(text[0].date.tzinfo) == "US/Eastern"
    assert text[0].date == datetime(2026, 11, 17, 9, 30, tzinfo=ET)
    # the first 5-minute bar aggregates the first five 1-minute bars exactly
    first5 = epoch[:5]
    assert text[0].open == first5[0].open and text[0].close == first5[-1].close
    assert text[0].high == max(b.high for b in first5)
    assert text[0].low == min(b.low for b in first5)
    assert text[0].volume == sum(b.volume for b in first5)


def test_daily_bars_are_dates_and_skip_holidays(ib):
    spy = Stock("SPY", "SMART", "USD")
    bars = ib.reqHistoricalData(spy, "20261105 23:00:00 US/Eastern", "1 Y", "1 day", "TRADES",
                                True, 1)
    assert all(type(b.date) is date for b in bars)
    days = {b.date for b in bars}
    assert date(2026, 7, 3) not in days  # Independence Day observed
    assert date(2026, 7, 2) in days
    assert all(d.weekday() < 5 for d in days)
    assert 245 <= len(bars) <= 253


def test_use_rth_selects_regular_hours(ib):
    aapl = Stock("AAPL", "SMART", "USD")
    end = "20261117 23:59:00 US/Eastern"
    rth = ib.reqHistoricalData(aapl, end, "1 D", "1 hour", "TRADES", True, 2)
    eth = ib.reqHistoricalData(aapl, end, "1 D", "1 hour", "TRADES", False, 2)
    assert rth[0].date == datetime(2026, 11, 17, 14, 30, tzinfo=UTC)
    assert eth[0].date == datetime(2026, 11, 17, 9, 0, tzinfo=UTC)  # 04:00 US/Eastern
    assert eth[-1].date == datetime(2026, 11, 18, 0, 0, tzinfo=UTC)  # 19:00 US/Eastern
    assert len(rth) == 7 and len(eth) == 16


@pytest.mark.parametrize("end", [
    "20261117 16:00:00 US/Eastern",
    "20261117-21:00:00",
    "20261117 21:00:00 UTC",
    "20261117 16:00:00",  # no zone: the login time zone (US/Eastern)
    datetime(2026, 11, 17, 21, 0, tzinfo=UTC),
])
def test_end_date_time_forms(ib, end):
    bars = ib.reqHistoricalData(Stock("MSFT", "SMART", "USD"), end, "3600 S", "1 min",
                                "TRADES", True, 2)
    assert len(bars) == 60
    assert bars[-1].date == datetime(2026, 11, 17, 20, 59, tzinfo=UTC)


def test_empty_end_means_now_and_last_bar_is_partial(gateway, ib):
    eur = Forex("EURUSD")
    first = ib.reqHistoricalData(eur, "", "1800 S", "1 min", "MIDPOINT", False, 2)
    now = gateway.server.clock.now()
    assert first[-1].date <= now < first[-1].date + timedelta(minutes=1)
    gateway.server.clock.shift(61)  # the clock moves on; the partial minute completes
    later = ib.reqHistoricalData(eur, "", "1800 S", "1 min", "MIDPOINT", False, 2)
    same = [b for b in later if b.date == first[-1].date]
    assert same and same[0].open == first[-1].open
    assert same[0].high >= first[-1].high and same[0].low <= first[-1].low
    assert all(b.volume == -1 for b in later)  # MIDPOINT has no volume


def test_head_timestamp(ib):
    head = ib.reqHeadTimeStamp(Stock("RBLX", "SMART", "USD"), "TRADES", True, 2)
    assert head == datetime(2021, 3, 10, 14, 30, tzinfo=UTC)
    head_all = ib.reqHeadTimeStamp(Stock("RBLX", "SMART", "USD"), "TRADES", False, 1)
    # formatDate 1 answers 'YYYYMMDD-HH:MM:SS' in UTC, which ib_async parses as naive
    assert head_all.tzinfo is None
    assert head_all.replace(tzinfo=UTC) == datetime(2021, 3, 10, 9, 0, tzinfo=UTC)


def test_cancel_historical_answers_162(gateway, ib):
    errors = ErrorLog(ib)
    gateway.inject("stall")
    bars = ib.reqHistoricalData(Stock("AAPL", "SMART", "USD"), "", "1 D", "1 min", "TRADES",
                                True, 2, timeout=0.5)
    assert len(bars) == 0
    ib.sleep(0.3)
    cancelled = [m for _, c, m in errors.items if c == 162]
    assert cancelled and "API historical data query cancelled" in cancelled[0]


def test_positions_portfolio_and_account_values(ib):
    positions = ib.positions()
    kinds = sorted({p.contract.secType for p in positions})
    assert kinds == ["FUT", "OPT", "STK"]
    assert all(p.account == "DU0000001" for p in positions)
    portfolio = ib.portfolio()
    assert len(portfolio) == len(positions) == 8
    for item in portfolio:
        mult = float(item.contract.multiplier or 1)
        assert item.marketValue == pytest.approx(item.marketPrice * item.position * mult,
                                                 rel=1e-6, abs=0.02)
    values = {v.tag: v.value for v in ib.accountValues()}
    assert values["AccountCode"] == "DU0000001"
    assert float(values["NetLiquidation"]) > 0


def test_option_model_greeks_and_pnl(gateway, ib):
    option = next(p.contract for p in ib.positions() if p.contract.secType == "OPT")
    option.exchange = "SMART"
    ticker = ib.reqMktData(option, "", False, False)
    deadline = time.time() + 5
    while ticker.modelGreeks is None and time.time() < deadline:
        ib.sleep(0.05)
    greeks = ticker.modelGreeks
    assert greeks is not None
    inst = gateway.server.universe.instruments[option.conId]
    expected = gateway.server.book.greeks(inst)
    assert greeks.delta == pytest.approx(expected.delta, rel=0.05, abs=0.01)
    assert greeks.undPrice == pytest.approx(expected.und_price, rel=0.01)
    assert 0 < greeks.impliedVol < 2 and greeks.gamma > 0 and greeks.vega > 0
    assert greeks.theta < 0
    assert ticker.bid < ticker.ask
    ib.cancelMktData(option)

    pnl = ib.reqPnL("DU0000001")
    deadline = time.time() + 5
    while pnl.unrealizedPnL != pnl.unrealizedPnL and time.time() < deadline:  # NaN until set
        ib.sleep(0.05)
    assert pnl.unrealizedPnL == pnl.unrealizedPnL
    ib.cancelPnL("DU0000001")


def test_several_clients_and_client_id_in_use(gateway):
    a, b = connect(gateway, 11), connect(gateway, 12)
    try:
        bars_a = a.reqHistoricalData(Stock("NVDA", "SMART", "USD"), "20261117 16:00:00 US/Eastern",
                                     "1 D", "1 hour", "TRADES", True, 2)
        bars_b = b.reqHistoricalData(Stock("NVDA", "SMART", "USD"), "20261117 16:00:00 US/Eastern",
                                     "1 D", "1 hour", "TRADES", True, 2)
        assert list(bars_a) == list(bars_b) and len(bars_a) == 7
        dup = IB()
        errors = ErrorLog(dup)
        # refused with 326 (ib_async would then wait out its timeout: wait for the error)
        attempt = asyncio.ensure_future(dup.connectAsync("127.0.0.1", gateway.port,
                                                         clientId=11, timeout=30))
        try:
            wait_until(lambda: 326 in errors.codes() or attempt.done(),
                       "error 326 for the client id in use", sleep=dup.sleep)
            assert 326 in errors.codes()
            assert not dup.isConnected()
            if attempt.done():
                assert isinstance(attempt.exception(), TimeoutError | ConnectionError)
        finally:
            attempt.cancel()
            with contextlib.suppress(ConnectionError):  # already closed by the failed connect
                dup.disconnect()
        assert a.isConnected()
    finally:
        a.disconnect()
        b.disconnect()


def test_audit_log_records_requests_and_answers(gateway, ib, audit_path):
    ib.reqHistoricalData(Stock("AAPL", "SMART", "USD"), "20261117 16:00:00 US/Eastern", "1 D",
                         "1 hour", "TRADES", True, 2)
    events = read_audit(audit_path)
    req = [e for e in events if e["message"] == "reqHistoricalData"]
    ans = [e for e in events if e["message"] == "historicalData"]
    assert len(req) == 1 and len(ans) == 1
    assert req[0]["bar_size"] == "1 hour" and req[0]["duration"] == "1 D"
    assert req[0]["what_to_show"] == "TRADES" and req[0]["client_id"] == ib.client.clientId
    assert ans[0]["bars"] == 7 and ans[0]["req_id"] == req[0]["req_id"]


def test_futures_bars_follow_the_cme_calendar(ib):
    [front] = [cd.contract for cd in ib.reqContractDetails(
        Contract(secType="FUT", symbol="ES", exchange="CME", lastTradeDateOrContractMonth="202612"))]
    session = ib.reqHistoricalData(front, "20261117 17:00:00 US/Central", "1 D", "1 hour",
                                   "TRADES", False, 2)
    # the CME Globex session of the 17th runs 17:00 US/Central on the 16th to 16:00, then
    # the daily halt (docs/ib-facts.md §9): 23 hourly bars, none at 16:00
    assert len(session) == 23
    assert session[0].date == datetime(2026, 11, 16, 23, 0, tzinfo=UTC)
    assert session[-1].date == datetime(2026, 11, 17, 21, 0, tzinfo=UTC)  # 15:00 CT
    weekend = ib.reqHistoricalData(front, "20261116-01:00:00", "3 D", "1 hour", "TRADES", False, 2)
    assert weekend and all(b.date.weekday() != 5 for b in weekend)
    sunday = [b for b in weekend if b.date.date() == date(2026, 11, 15)]
    assert [b.date.hour for b in sunday] == [23]


def test_universe_file_replaces_the_default(tmp_path):
    from ktrdr_pipeline.simulator.server import GatewayThread

    universe = tmp_path / "universe.yaml"
    universe.write_text(
        "account: DU7654321\n"
        "stocks: [{symbol: IBM, primary_exchange: NYSE, price: 220, vol: 0.25, head: '2010-01-04'}]\n"
        "fx: [{pair: AUDUSD, price: 0.65}]\n"
        "futures: [{symbol: CL, exchange: NYMEX, multiplier: 1000, price: 70, tick: 0.01}]\n")
    with GatewayThread(clock=MARKET_OPEN, latency="none", universe=universe) as gw:
        ib = connect(gw)
        try:
            assert ib.managedAccounts() == ["DU7654321"]
            [ibm] = ib.reqContractDetails(Stock("IBM", "SMART", "USD"))
            assert ibm.contract.primaryExchange == "NYSE"
            assert ib.reqContractDetails(Stock("AAPL", "SMART", "USD")) == []
            bars = ib.reqHistoricalData(Forex("AUDUSD"), "", "1 D", "1 hour", "MIDPOINT",
                                        False, 2)
            assert bars and 0.3 < bars[-1].close < 1.3
            assert [c.contract.localSymbol for c in ib.reqContractDetails(
                Future("CL", exchange="NYMEX"))][:1] == ["CLZ6"]
        finally:
            ib.disconnect()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stocks: [{price: 3}]\n")
    with pytest.raises(ValueError, match="invalid entry in universe file"):
        GatewayThread(universe=bad)

"""The requests ib_async 2.1's own live tests make (ib-api-reloaded/ib_async,
``tests/test_contract.py`` and ``tests/test_requests.py``), against the simulator with the
universe file that names their instruments: each is answered — with data, or with IB's error
— and none hangs. Written for this project after those tests, not copied from them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ib_async import IB, AccountValue, Forex, MarketOrder, RequestError, Stock, util

from ktrdr_pipeline.simulator.server import GatewayThread

from .conftest import MARKET_OPEN

UNIVERSE = Path(__file__).parent / "data" / "ib_async_live_tests.yaml"


@pytest.fixture
def gw():
    with GatewayThread(clock=MARKET_OPEN, latency="none", universe=UNIVERSE) as gateway:
        yield gateway


def _ib(gw: GatewayThread) -> IB:
    ib = IB()
    ib.connect("127.0.0.1", gw.port, clientId=90, readonly=True, timeout=5)
    return ib


@pytest.mark.parametrize("symbol", ["AMZN", "TSLA"])
def test_contract_format_data_pd(gw, symbol):
    """test_contract.py: one day of hourly TRADES bars, all hours, formatDate 1, as a
    DataFrame whose dates convert to America/New_York."""
    ib = _ib(gw)
    try:
        bars = ib.reqHistoricalData(Stock(symbol, "SMART", "USD"), "", "1 D", "1 hour",
                                    "TRADES", False, 1, timeout=10)
        df = util.df(bars)
        assert df is not None and len(df) > 0
        dates = df["date"].dt.tz_convert("America/New_York")  # tz-aware, as the test needs
        assert dates.is_monotonic_increasing
        assert list(df.columns[:6]) == ["date", "open", "high", "low", "close", "volume"]
    finally:
        ib.disconnect()


def test_what_if_orders_are_answered_with_ibs_errors(gw):
    """test_requests.py::test_request_error_raised asks for a what-if order's commission
    (EURUSD, BUY 100), then expects a RequestError for ``Stock("XXX")``. The simulator never
    trades: the first is refused with 201, the unknown contract with 200 — both end the
    request at once (no timeout)."""

    async def go():
        ib = IB()
        await ib.connectAsync("127.0.0.1", gw.port, clientId=1, timeout=5)
        ib.RaiseRequestErrors = True
        try:
            codes = []
            for contract in (Forex("EURUSD"), Stock("XXX")):
                with pytest.raises(RequestError) as info:
                    await asyncio.wait_for(
                        ib.whatIfOrderAsync(contract, MarketOrder("BUY", 100)), 10)
                codes.append((info.value.code, info.value.message))
            return codes
        finally:
            ib.disconnect()

    (fx_code, fx_text), (xxx_code, xxx_text) = asyncio.run(go())
    assert fx_code == 201 and fx_text.startswith("Order rejected - reason:")
    assert xxx_code == 200 and "No security definition" in xxx_text


def test_account_summary(gw):
    """test_requests.py::test_account_summary."""

    async def go():
        ib = IB()
        await ib.connectAsync("127.0.0.1", gw.port, clientId=1, timeout=5)
        try:
            return await asyncio.wait_for(ib.accountSummaryAsync(), 10)
        finally:
            ib.disconnect()

    summary = asyncio.run(go())
    assert summary and all(isinstance(v, AccountValue) for v in summary)

"""IB's error answers with IB's exact texts: classified by code first, 162 by the stable parts
of its text (also from a translated TWS), and sent so by the simulator
(``docs/ib-facts.md`` §2, §3)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest
from ib_async import Contract, Forex, Stock

from ktrdr_pipeline.domain import ib_rules
from ktrdr_pipeline.domain.ib_rules import PacingLimits
from ktrdr_pipeline.domain.planning import HistoricalRequest
from ktrdr_pipeline.ib.connection import IBConnection
from ktrdr_pipeline.ib.errors import (
    DataTypeUnavailable,
    ErrorKind,
    IBError,
    InvalidRequest,
    classify,
)
from ktrdr_pipeline.ib.fetch import HistoricalFetcher
from ktrdr_pipeline.ib.governor import PacingGovernor
from ktrdr_pipeline.ib.ledger import MemoryPacingLedger
from ktrdr_pipeline.simulator.faults import MSG_HMDS_UNKNOWN

from .conftest import ErrorLog, RawClient, read_audit, wait_until

P = ib_rules.HMDS_PREFIX
#: The Spanish TWS's prefix for 162 (wrighter/ib-scripts#1).
SPANISH = "Mensaje de error de los servicios de datos de mercado históricos:"

#: 162 texts as real gateways send them (§3), and what each means for a loader.
REAL_162 = [
    (P + "Historical data request pacing violation", ErrorKind.PACING),
    (P + "HMDS query returned no data: AAPL@SMART Trades", ErrorKind.NO_DATA),
    (P + "HMDS query returned no data: EUR.USD@IDEALPRO Ask", ErrorKind.NO_DATA),
    (P + "No historical market data for EUR/CASH@FXSUBPIP Last 1d",
     ErrorKind.NO_SUCH_DATA_TYPE),
    (P + "No historical market data for CAC40/IND@MONEP Bid 1800", ErrorKind.NO_SUCH_DATA_TYPE),
    (P + "No market data permissions for NYSE STK", ErrorKind.PERMISSIONS),
    (P + "Time length exceed max.", ErrorKind.VALIDATION),
    (P + "API historical data query cancelled: 4", ErrorKind.CANCELLED),
    ("API historical data query cancelled: 4", ErrorKind.CANCELLED),
]


@pytest.mark.parametrize(("text", "kind"), REAL_162)
def test_162_by_its_stable_text(text, kind):
    assert classify(162, text) is kind


@pytest.mark.parametrize(("text", "kind"), [
    # the prefix translated, HMDS's own words kept (as wrighter/ib-scripts#1 shows)
    (SPANISH + "Historical data request pacing violation", ErrorKind.PACING),
    (SPANISH + "HMDS query returned no data: AAPL@SMART Trades", ErrorKind.NO_DATA),
    (SPANISH + "Time length exceed max.", ErrorKind.VALIDATION),
    # everything translated but HMDS's identifiers of instrument, data type and step
    (SPANISH + "No hay datos de mercado históricos para EUR/CASH@FXSUBPIP Last 1d",
     ErrorKind.NO_SUCH_DATA_TYPE),
    # nothing recognisable: neither pacing nor no data, never an empty success
    (SPANISH + "invalid step: 1", ErrorKind.UNRECOGNISED),
    (MSG_HMDS_UNKNOWN, ErrorKind.UNRECOGNISED),
    (P + "Something IB has never said before", ErrorKind.UNRECOGNISED),
])
def test_162_from_a_translated_tws(text, kind):
    assert classify(162, text) is kind


def test_other_codes_by_code_alone():
    # the text does not matter: a translated TWS changes it, the code stays
    assert classify(ib_rules.ERR_INVALID_END, ib_rules.MSG_INVALID_END) is ErrorKind.VALIDATION
    assert classify(10314, "Fecha/hora final no válida") is ErrorKind.VALIDATION
    assert classify(ib_rules.ERR_CONTFUT_END, ib_rules.MSG_CONTFUT_END) is ErrorKind.VALIDATION
    assert classify(2174, ib_rules.MSG_END_WITHOUT_ZONE) is ErrorKind.WARNING
    assert classify(2174, "警告: 您提交的请求包含日期-时间属性，但未明确指定时区。") is ErrorKind.WARNING
    assert classify(321, "Error validating request.-'bW' : cause - x") is ErrorKind.VALIDATION


def test_no_such_data_type_names_the_what_to_show_that_works():
    err = IBError.from_answer(162, P + "No historical market data for EUR/CASH@FXSUBPIP Last 1d",
                              "EUR.USD 1 day 5 D", what_to_show="TRADES")
    assert isinstance(err, DataTypeUnavailable) and isinstance(err, InvalidRequest)
    assert not err.retryable
    text = str(err)
    assert "No historical market data for EUR/CASH@FXSUBPIP Last 1d" in text  # IB's own words
    assert "MIDPOINT" in text and "BID" in text and "ASK" in text
    assert "use one of MIDPOINT, BID, ASK, BID_ASK" in text


def test_time_length_exceed_max_is_a_bad_request_not_retried():
    err = IBError.from_answer(162, P + "Time length exceed max.", "AAPL 1 secs 3600 S")
    assert isinstance(err, InvalidRequest) and not err.retryable
    assert "Time length exceed max." in str(err) and "too long for the bar size" in str(err)


def test_unrecognised_162_is_retried_a_bounded_number_of_times():
    err = IBError.from_answer(162, MSG_HMDS_UNKNOWN)
    assert err.kind is ErrorKind.UNRECOGNISED and err.retryable
    assert err.ib_text == MSG_HMDS_UNKNOWN


# -- against the simulator -----------------------------------------------------------------

AAPL = Contract(conId=265598, symbol="AAPL", secType="STK", exchange="SMART", currency="USD")


def _governor() -> PacingGovernor:
    return PacingGovernor(MemoryPacingLedger(), PacingLimits(time_scale=0.01),
                          backoff_initial_s=1.0)


def _req(bar: str = "1 min", duration: str = "3600 S", what: str = "TRADES",
         end: datetime = datetime(2026, 11, 17, 21, tzinfo=UTC)) -> HistoricalRequest:
    return HistoricalRequest(end=end, duration=duration, bar_size=bar, what_to_show=what,
                             use_rth=True)


async def _fetch(gw, contract, req, **kw):
    conn = IBConnection("127.0.0.1", gw.port, 1, backoff_s=0.05)
    await conn.connect()
    try:
        return await HistoricalFetcher(conn, _governor(), backoff_s=0.01, **kw).fetch(
            contract, [req])
    finally:
        await conn.disconnect()


def _requests(audit_path) -> int:
    return len([e for e in read_audit(audit_path) if e["message"] == "reqHistoricalData"])


def test_fx_trades_fails_at_once_naming_midpoint(gateway, audit_path):
    eur = Contract(conId=12087792, symbol="EUR", secType="CASH", exchange="IDEALPRO",
                   currency="USD")
    with pytest.raises(DataTypeUnavailable) as info:
        asyncio.run(_fetch(gateway, eur, _req(bar="1 day", duration="5 D")))
    text = str(info.value)
    assert "No historical market data for EUR/CASH@FXSUBPIP Last 1d" in text
    assert "MIDPOINT" in text
    assert _requests(audit_path) == 1  # a bad request is not retried


@pytest.mark.parametrize("bar", ["1 min", "5 secs"])
def test_an_unrecognised_162_fails_after_the_attempts_with_ibs_text(gateway, audit_path, bar):
    gateway.inject("hmds_unknown", 5)
    with pytest.raises(IBError) as info:
        asyncio.run(_fetch(gateway, AAPL, _req(bar=bar, duration="1800 S"), attempts=3))
    assert info.value.kind is ErrorKind.UNRECOGNISED
    assert MSG_HMDS_UNKNOWN in str(info.value)
    assert "gave up after 3 attempts" in str(info.value)
    assert _requests(audit_path) == 3


def test_an_unrecognised_162_that_goes_away_is_served(gateway):
    gateway.inject("hmds_unknown", 1)
    result = asyncio.run(_fetch(gateway, AAPL, _req()))
    assert len(result.frame) == 60 and result.retries == 1


def test_no_data_is_empty_with_ibs_reason(gateway):
    # before RBLX's listing (2021-03-10) IB has no data (a request ending on a Saturday
    # reaches back to Friday's session: durations count trading time, docs/ib-facts.md §2)
    rblx = Contract(symbol="RBLX", secType="STK", exchange="SMART", currency="USD")
    before_listing = _req(end=datetime(2021, 3, 1, 21, tzinfo=UTC))
    result = asyncio.run(_fetch(gateway, rblx, before_listing))
    assert len(result.frame) == 0
    assert result.no_data_reasons == [P + "HMDS query returned no data: RBLX@SMART Trades"]


def test_invalid_end_is_10314_with_ibs_text(gateway, ib):
    errors = ErrorLog(ib)
    for end in ("2026-11-17 16:00", "20261317 16:00:00 US/Eastern",
                "20261117 16:00:00 Mars/Olympus"):
        assert len(ib.reqHistoricalData(Stock("AAPL", "SMART", "USD"), end, "3600 S",
                                        "1 min", "TRADES", True, 2, timeout=5)) == 0
    assert [(c, m) for _, c, m in errors.items if c == 10314] == [
        (10314, ib_rules.MSG_INVALID_END)] * 3
    # ib_async ends the request on 10314 (not a warning): no wait for the timeout
    assert ib_rules.MSG_INVALID_END.startswith("End Date/Time: The date, time, or time-zone")


def test_an_impossible_time_is_10314_and_a_bad_request(gateway):
    raw = RawClient(gateway.port, 77)
    try:
        raw.send(20, 5, 265598, "AAPL", "STK", "", 0.0, "", "", "SMART", "", "USD", "", "",
                 0, "20261117 25:00:00 US/Eastern", "1 min", "3600 S", 1, "TRADES", 2, 0, "")
        answer = raw.read_until("17", "5")
        assert answer[:5] == ["4", "2", "5", "10314", ib_rules.MSG_INVALID_END]
    finally:
        raw.close()
    err = IBError.from_answer(10314, ib_rules.MSG_INVALID_END, "AAPL")
    assert isinstance(err, InvalidRequest) and not err.retryable


def test_end_without_zone_is_answered_with_a_2174_warning_first(gateway):
    raw = RawClient(gateway.port, 78)
    try:
        raw.send(20, 6, 265598, "AAPL", "STK", "", 0.0, "", "", "SMART", "", "USD", "", "",
                 0, "20261117 16:00:00", "1 min", "3600 S", 1, "TRADES", 2, 0, "")
        warning = raw.read_until("4", "6")
        assert warning[:5] == ["4", "2", "6", "2174", ib_rules.MSG_END_WITHOUT_ZONE]
        bars = raw.read_until("17", "6")
        assert bars[0] == "17" and bars[4] == "60"
        # zoned and UTC forms draw no warning
        for k, end in ((7, "20261117 16:00:00 US/Eastern"), (8, "20261117-21:00:00")):
            raw.send(20, k, 265598, "AAPL", "STK", "", 0.0, "", "", "SMART", "", "USD", "", "",
                     0, end, "1 min", "3600 S", 1, "TRADES", 2, 0, "")
            assert raw.read_until("17", str(k))[0] == "17"
    finally:
        raw.close()


def test_2174_is_logged_once_per_connection_and_never_fatal(gateway, caplog):
    async def go():
        conn = IBConnection("127.0.0.1", gateway.port, 1, backoff_s=0.05)
        await conn.connect()
        try:
            ib = conn.ib
            got = []
            for hour in (14, 15, 16):
                got.append(await ib.reqHistoricalDataAsync(
                    Stock("AAPL", "SMART", "USD"), f"20261117 {hour}:00:00", "3600 S",
                    "1 min", "TRADES", True, 2, timeout=10))
            return got
        finally:
            await conn.disconnect()

    with caplog.at_level(logging.INFO, logger="ktrdr_pipeline.ib.connection"):
        answers = asyncio.run(go())
    assert [len(a) for a in answers] == [60, 60, 60]
    ours = [r for r in caplog.records
            if r.name == "ktrdr_pipeline.ib.connection" and "2174" in r.getMessage()]
    assert len(ours) == 1 and ours[0].levelno == logging.WARNING


def test_contfut_with_an_end_date_is_10339(gateway, ib):
    errors = ErrorLog(ib)
    es = Contract(symbol="ES", secType="CONTFUT", exchange="CME", currency="USD")
    assert len(ib.reqHistoricalData(es, "20261117 16:00:00 US/Central", "1 D", "1 hour",
                                    "TRADES", False, 2, timeout=5)) == 0
    wait_until(lambda: 10339 in errors.codes(), "10339", sleep=ib.sleep)
    assert (10339, ib_rules.MSG_CONTFUT_END) in [(c, m) for _, c, m in errors.items]
    assert classify(10339, ib_rules.MSG_CONTFUT_END) is ErrorKind.VALIDATION


def test_fx_head_timestamp_of_trades_names_the_data_type(gateway, ib):
    errors = ErrorLog(ib)
    assert ib.reqHeadTimeStamp(Forex("EURUSD"), "TRADES", False, 2) == []
    assert (162, P + "No historical market data for EUR/CASH@FXSUBPIP Last 0") in [
        (c, m) for _, c, m in errors.items]

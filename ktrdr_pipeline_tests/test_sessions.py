"""Trading sessions as IB trades them (issue 13, docs/ib-facts.md §9): one session model
(:mod:`ktrdr_pipeline.domain.calendars`) for the simulator's bars and contract details, the
gap analysis, the checks and the tail-fill sensor; bars IB serves outside it never fail a
load.

§9's facts: CME equity index futures (ES, NQ) trade 17:00-16:00 US/Central with a daily
16:00-17:00 halt (23 hourly bars a full session) and early closes on CME holidays (12:00 CT
on 2025-05-26), liquid hours from 08:30; IDEALPRO FX trades Sunday 17:15 - Friday 17:00
US/Eastern with a daily pause 17:00-17:15; a 24-hour market's daily bar carries the date its
session closes; a real ES contract-details answer reads
``20250521:1700-20250522:1600;20250522:1700-20250523:1600;20250524:CLOSED;
20250525:1700-20250526:1200;20250526:1700-20250527:1600;...``.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import numpy as np
import pytest
from ib_async import Contract, Forex, Stock

from ktrdr_pipeline.defs.bars.assets import build_bar_asset
from ktrdr_pipeline.defs.bars.checks import build_checks
from ktrdr_pipeline.defs.bars.jobs import build_bar_job
from ktrdr_pipeline.defs.bars.sensors import build_tail_fill_sensor
from ktrdr_pipeline.defs.resources import KtrdrSettings
from ktrdr_pipeline.domain import calendars, gaps
from ktrdr_pipeline.domain.calendars import FUTURE, FX, STOCK
from ktrdr_pipeline.domain.timeframes import get_timeframe
from ktrdr_pipeline.freshness import stale_partitions
from ktrdr_pipeline.ib.contracts import ResolvedContract, warn_if_hours_disagree
from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.store.parquet import BarStore

from .conftest import connect

CT, ET = ZoneInfo("US/Central"), ZoneInfo("US/Eastern")
#: §9's real ES answer (the first five sessions; IB's string goes on for about a week).
ES_TRADING_HOURS = ("20250521:1700-20250522:1600;20250522:1700-20250523:1600;20250524:CLOSED;"
                    "20250525:1700-20250526:1200;20250526:1700-20250527:1600")
ES_LIQUID_HOURS = "20250522:0830-20250522:1600;20250523:0830-20250523:1600;20250524:CLOSED"
#: Thursday 2025-05-22, 10:00 US/Central: inside §9's week.
SECTION_9_WEEK = datetime(2025, 5, 22, 15, 0, tzinfo=UTC)
#: Friday 2025-01-31, 19:00 US/Eastern: ES and FX closed for the weekend, January complete.
AFTER_JANUARY = datetime(2025, 2, 1, 0, 0, tzinfo=UTC)


def _local(starts: np.ndarray, tz: ZoneInfo) -> list[datetime]:
    return [datetime.fromtimestamp(int(t), UTC).astimezone(tz) for t in starts]


# -- the session model (pure) -----------------------------------------------------------------
def test_es_full_session_has_23_hourly_bars_and_none_in_the_halt():
    week = (datetime(2025, 5, 18, 17, tzinfo=CT), datetime(2025, 5, 24, tzinfo=CT))
    starts, ends = gaps.expected_bars(FUTURE, "1 hour", *week, use_rth=False)
    local = _local(starts, CT)
    per_session = Counter(s.date for s in calendars.sessions_between(FUTURE, *week, False)
                          for t in local if s.open <= t < s.close)
    assert per_session == {date(2025, 5, d): 23 for d in (19, 20, 21, 22, 23)}
    assert not [t for t in local if t.hour == 16]  # the 16:00-17:00 halt
    assert local[0] == datetime(2025, 5, 18, 17, tzinfo=CT)  # Sunday evening opens the week
    assert max(_local(ends, CT)) == datetime(2025, 5, 23, 16, tzinfo=CT)  # Friday 16:00


def test_es_closes_early_on_memorial_day_2025():
    [session] = calendars.sessions_on_dates(FUTURE, date(2025, 5, 26), date(2025, 5, 26), False)
    assert session.open.astimezone(CT) == datetime(2025, 5, 25, 17, tzinfo=CT)
    assert session.close.astimezone(CT) == datetime(2025, 5, 26, 12, tzinfo=CT)
    starts, _ = gaps.expected_bars(FUTURE, "1 hour", session.open, session.close, False)
    assert len(starts) == 19 and _local(starts, CT)[-1].hour == 11  # the last bar: 11:00-12:00
    [liquid] = calendars.sessions_on_dates(FUTURE, date(2025, 5, 26), date(2025, 5, 26), True)
    assert (liquid.open.astimezone(CT).hour, liquid.close.astimezone(CT).hour) == (8, 12)


def test_eurusd_sessions_follow_idealpro():
    window = (datetime(2025, 5, 22, tzinfo=ET), datetime(2025, 5, 28, tzinfo=ET))
    starts, _ = gaps.expected_bars(FX, "1 min", *window, use_rth=False)
    local = _local(starts, ET)
    assert not [t for t in local if t.weekday() == 5]  # no Saturday
    assert not [t for t in local if t.hour == 17 and t.minute < 15]  # the daily pause
    sunday = [t for t in local if t.weekday() == 6]
    assert sunday[0] == datetime(2025, 5, 25, 17, 15, tzinfo=ET)
    friday = [t for t in local if t.date() == date(2025, 5, 23)]
    assert friday[-1] == datetime(2025, 5, 23, 16, 59, tzinfo=ET)
    hours, _ = gaps.expected_bars(FX, "1 hour", *window, use_rth=False)
    assert [f"{t:%a %H:%M}" for t in _local(hours, ET) if t.date() == date(2025, 5, 25)] == [
        "Sun 17:15", "Sun 18:00", "Sun 19:00", "Sun 20:00", "Sun 21:00", "Sun 22:00",
        "Sun 23:00"]


def test_a_daily_fx_bar_carries_the_date_its_session_closes():
    monday = datetime(2025, 5, 26, tzinfo=UTC)
    starts, ends = gaps.expected_bars(FX, "1 day", monday - timedelta(days=3),
                                      monday + timedelta(days=1), False)
    assert monday.timestamp() in starts  # Sunday 17:15 -> Monday 17:00 is Monday's bar
    k = int(np.flatnonzero(starts == monday.timestamp())[0])
    assert datetime.fromtimestamp(int(ends[k]), UTC) == datetime(2025, 5, 26, 17, tzinfo=ET)
    assert datetime(2025, 5, 25, tzinfo=UTC).timestamp() not in starts  # no Sunday bar


def test_nyse_regular_and_extended_hours_with_half_days():
    [half] = calendars.sessions_on_dates(STOCK, date(2025, 11, 28), date(2025, 11, 28), True)
    assert half.close.astimezone(ET).hour == 13
    [ext] = calendars.sessions_on_dates(STOCK, date(2025, 11, 28), date(2025, 11, 28), False)
    assert (ext.open.astimezone(ET).hour, ext.close.astimezone(ET).hour) == (4, 17)
    assert not calendars.sessions_on_dates(STOCK, date(2025, 11, 27), date(2025, 11, 27), False)


def _entries(text: str) -> list[tuple[str, str]]:
    """IB's form (§9): ``YYYYMMDD:HHMM-YYYYMMDD:HHMM`` or ``YYYYMMDD:CLOSED`` per entry."""
    out = []
    for entry in text.split(";"):
        assert re.fullmatch(r"\d{8}:(CLOSED|\d{4}-\d{8}:\d{4})", entry), entry
        out.append((entry[:8], entry[9:]))
    dates = [d for d, _ in out]
    assert dates == sorted(dates) and len(set(dates)) == len(dates), text  # no duplicate
    return out


def test_hours_strings_have_ibs_form():
    es = calendars.hours_string(FUTURE, SECTION_9_WEEK, use_rth=False)
    assert es.startswith(ES_TRADING_HOURS + ";")
    assert calendars.hours_string(FUTURE, SECTION_9_WEEK, use_rth=True).startswith(
        ES_LIQUID_HOURS + ";")
    for profile in (FUTURE, FX, STOCK):
        for rth in (False, True):
            entries = _entries(calendars.hours_string(profile, SECTION_9_WEEK, rth))
            first, last = (datetime.strptime(entries[i][0], "%Y%m%d") for i in (0, -1))
            assert 5 <= (last - first).days <= 8  # about a week ahead
    assert calendars.hours_disagreement(FUTURE, ES_TRADING_HOURS, "US/Central") is None


def test_hours_disagreement_names_both_sides():
    moved = ES_TRADING_HOURS.replace("20250522:1700-20250523:1600", "20250522:1700-20250523:1700")
    text = calendars.hours_disagreement(FUTURE, moved, "US/Central")
    assert "20250522:1700-20250523:1700" in text and "20250522:1700-20250523:1600" in text
    assert "IB" in text and "CME Globex Equity" in text
    with pytest.raises(ValueError, match="20250599"):
        calendars.parse_hours("20250599:1700-20250523:1600", "US/Central")
    # IB's older form: no closing date, several ranges in one entry
    sessions, closed = calendars.parse_hours("20090507:0930-1600,1700-1800;20090509:CLOSED",
                                             "US/Eastern")
    assert len(sessions) == 2 and closed == [date(2009, 5, 9)]


# -- the simulator, through ib_async ------------------------------------------------------------
@pytest.fixture
def week_gateway():
    with GatewayThread(clock=SECTION_9_WEEK + timedelta(days=7), latency="none",
                       admin_port=0) as gw:
        yield gw


def _es(ib, month: str = "202506") -> Contract:
    [cd] = ib.reqContractDetails(Contract(secType="FUT", symbol="ES", exchange="CME",
                                          lastTradeDateOrContractMonth=month))
    return cd.contract


def test_simulator_bars_follow_the_sessions(week_gateway):
    ib = connect(week_gateway)
    try:
        es = _es(ib)
        bars = ib.reqHistoricalData(es, "20250524 00:00:00 US/Central", "5 D", "1 hour",
                                    "TRADES", False, 2)
        local = [b.date.astimezone(CT) for b in bars]
        # a session is labelled with the day it closes: 17:00 and later belong to the next
        sessions = Counter(t.date() + timedelta(days=t.hour >= 17) for t in local)
        assert sessions[date(2025, 5, 21)] == sessions[date(2025, 5, 22)] == 23
        assert not [t for t in local if t.hour == 16]
        memorial = ib.reqHistoricalData(es, "20250527 00:00:00 US/Central", "2 D", "1 hour",
                                        "TRADES", False, 2)
        monday = [b.date.astimezone(CT) for b in memorial
                  if b.date.astimezone(CT).date() == date(2025, 5, 26)]
        # Memorial Day's session ends 12:00 CT; the next one opens 17:00
        assert [t.hour for t in monday if t.hour < 17][-1] == 11
        assert not [t for t in monday if 12 <= t.hour < 17]

        eur = ib.qualifyContracts(Forex("EURUSD"))[0]
        hours = ib.reqHistoricalData(eur, "20250527 00:00:00 US/Eastern", "5 D", "1 hour",
                                     "MIDPOINT", False, 2)
        local = [b.date.astimezone(ET) for b in hours]
        assert not [t for t in local if t.weekday() == 5]
        assert not [t for t in local if t.hour == 17 and t.minute < 15]
        assert [t for t in local if t.weekday() == 6][0] == datetime(2025, 5, 25, 17, 15,
                                                                      tzinfo=ET)
        days = ib.reqHistoricalData(eur, "20250528 00:00:00 US/Eastern", "1 W", "1 day",
                                    "MIDPOINT", False, 1)
        dated = [b.date for b in days]
        assert date(2025, 5, 26) in dated and date(2025, 5, 25) not in dated
        assert date(2025, 5, 24) not in dated
        # Monday's daily bar is the session Sunday 17:15 -> Monday 17:00
        [monday_bar] = [b for b in days if b.date == date(2025, 5, 26)]
        minutes = ib.reqHistoricalData(eur, "20250526 17:00:00 US/Eastern", "86400 S",
                                       "1 hour", "MIDPOINT", False, 2)
        session = [b for b in minutes
                   if b.date >= datetime(2025, 5, 25, 17, 15, tzinfo=ET)]
        assert session[0].open == monday_bar.open and session[-1].close == monday_bar.close
    finally:
        ib.disconnect()


def test_contract_details_match_ibs_form_for_a_known_week():
    with GatewayThread(clock=SECTION_9_WEEK, latency="none") as gw:
        ib = connect(gw)
        try:
            [es] = ib.reqContractDetails(Contract(secType="FUT", symbol="ES", exchange="CME",
                                                  lastTradeDateOrContractMonth="202506"))
            [aapl] = ib.reqContractDetails(Stock("AAPL", "SMART", "USD"))
            [eur] = ib.reqContractDetails(Forex("EURUSD"))
        finally:
            ib.disconnect()
    # ES: §9's real answer, entry for entry
    assert es.timeZoneId == "US/Central"
    assert es.tradingHours.startswith(ES_TRADING_HOURS + ";")
    assert es.liquidHours.startswith(ES_LIQUID_HOURS + ";")
    # AAPL: 04:00-20:00 outside RTH, 09:30-16:00 regular, Memorial Day and the weekend CLOSED
    assert aapl.timeZoneId == "US/Eastern"
    assert aapl.tradingHours.startswith(
        "20250522:0400-20250522:2000;20250523:0400-20250523:2000;20250524:CLOSED;"
        "20250525:CLOSED;20250526:CLOSED;20250527:0400-20250527:2000")
    assert aapl.liquidHours.startswith("20250522:0930-20250522:1600;20250523:0930-20250523:1600;"
                                       "20250524:CLOSED;20250525:CLOSED;20250526:CLOSED")
    # EURUSD: IDEALPRO, Sunday 17:15 to Friday 17:00 US/Eastern with the 17:00-17:15 pause
    assert eur.timeZoneId == "US/Eastern"
    assert eur.tradingHours.startswith(
        "20250521:1715-20250522:1700;20250522:1715-20250523:1700;20250524:CLOSED;"
        "20250525:1715-20250526:1700;20250526:1715-20250527:1700")
    for cd in (es, aapl, eur):
        for text in (cd.tradingHours, cd.liquidHours):
            entries = _entries(text)
            assert len(entries) >= 6
        # the details agree with the calendar the pipeline uses
        resolved = ResolvedContract.from_details(cd.contract.symbol, cd)
        assert warn_if_hours_disagree(resolved, cd) is None


def test_thanksgiving_week_contract_details():
    with GatewayThread(clock=datetime(2026, 11, 23, 15, tzinfo=UTC), latency="none") as gw:
        ib = connect(gw)
        try:
            [aapl] = ib.reqContractDetails(Stock("AAPL", "SMART", "USD"))
            [es] = ib.reqContractDetails(Contract(secType="FUT", symbol="ES", exchange="CME",
                                                  lastTradeDateOrContractMonth="202612"))
        finally:
            ib.disconnect()
    assert "20261126:CLOSED;20261127:0930-20261127:1300" in aapl.liquidHours
    assert "20261126:CLOSED;20261127:0400-20261127:1700" in aapl.tradingHours
    # CME: Thanksgiving closes 12:00, the Friday after it 12:15 (shorter sessions, §9)
    assert "20261125:1700-20261126:1200;20261126:1700-20261127:1215" in es.tradingHours


def test_a_load_logs_one_warning_when_contract_details_disagree(tmp_path, monkeypatch, caplog):
    """IB's contract details are the truth for the coming week: when they disagree with the
    calendar, the load says so once, naming both."""
    import asyncio

    from ktrdr_pipeline.loader import PipelineContext, load_partition
    from ktrdr_pipeline.settings import Settings

    real = calendars.hours_string

    def ib_says(profile, around, use_rth, days=calendars.HOURS_STRING_DAYS):
        text = real(profile, around, use_rth, days)
        return text.replace("20250522:1700-20250523:1600", "20250522:1700-20250523:1615")

    # the simulator's answer only: the comparison reads the calendar's sessions directly
    monkeypatch.setattr(calendars, "hours_string", ib_says)
    with GatewayThread(clock=SECTION_9_WEEK, latency="none") as gw:
        async def go():
            ctx = PipelineContext.from_settings(Settings(ib_port=gw.port, data_dir=tmp_path,
                                                         ib_client_id=61))
            try:
                await load_partition(ctx, "ES", "1d", "2025")
                return await load_partition(ctx, "ES", "1d", "2025")
            finally:
                await ctx.close()

        with caplog.at_level(logging.WARNING, logger="ktrdr_pipeline.ib.contracts"):
            result = asyncio.run(go())
    assert result.rows > 0
    [warning] = [r.getMessage() for r in caplog.records
                 if r.name == "ktrdr_pipeline.ib.contracts"]
    assert "20250522:1700-20250523:1615" in warning  # IB's
    assert "20250522:1700-20250523:1600" in warning and "CME Globex Equity" in warning


# -- fault injection: trading outside the calendar -------------------------------------------
def _admin(gw, method: str, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{gw.server.admin_port}{path}",
                                 method=method)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_admin_makes_the_simulator_trade_outside_the_sessions(week_gateway):
    gw = week_gateway
    ib = connect(gw)
    try:
        es = _es(ib)

        def saturday():
            return ib.reqHistoricalData(es, "20250525 00:00:00 US/Central", "2 D", "1 hour",
                                        "TRADES", False, 2)

        assert not [b for b in saturday() if b.date.astimezone(CT).weekday() == 5]
        answer = _admin(gw, "POST", "/faults/outside_sessions?symbol=ES"
                                    "&at=2025-05-24T15:00:00Z&minutes=60")
        assert answer == {"outside_sessions": {"ES": [["2025-05-24T15:00:00+00:00",
                                                       "2025-05-24T16:00:00+00:00"]]}}
        assert _admin(gw, "GET", "/status")["outside_sessions"] == answer["outside_sessions"]
        extra = [b for b in saturday() if b.date.astimezone(CT).weekday() == 5]
        assert [b.date for b in extra] == [datetime(2025, 5, 24, 15, tzinfo=UTC)]
        assert extra[0].volume > 0
        # a bar in the daily halt, on the minute grid too
        _admin(gw, "POST", "/faults/outside_sessions?symbol=ESM5&at=2025-05-22T21:30:00Z")
        # 3600 S is the last trading hour (15:00-16:00 CT, docs/ib-facts.md §2: S counts
        # trading seconds) plus what is served up to the end in the halt
        answer_bars = ib.reqHistoricalData(es, "20250522 17:00:00 US/Central", "3600 S",
                                           "1 min", "TRADES", False, 2)
        halt = [b for b in answer_bars if b.date >= datetime(2025, 5, 22, 21, tzinfo=UTC)]
        assert [b.date for b in halt] == [datetime(2025, 5, 22, 21, 30, tzinfo=UTC)]
        assert len(answer_bars) == 61
        assert _admin(gw, "DELETE", "/faults/outside_sessions") == {"outside_sessions": {}}
        assert not [b for b in saturday() if b.date.astimezone(CT).weekday() == 5]
        for bad in ("?symbol=ES", "?symbol=ES&at=2025-05-24T15:00:00",
                    "?symbol=ES&at=2025-05-24T15:00:00Z&minutes=0"):
            with pytest.raises(urllib.error.HTTPError) as info:
                _admin(gw, "POST", "/faults/outside_sessions" + bad)
            assert info.value.code == 400
    finally:
        ib.disconnect()


# -- the pipeline, through Dagster ----------------------------------------------------------
@pytest.fixture
def january(tmp_path, monkeypatch):
    """A simulator whose clock is the evening after January 2025's last session, and a
    Dagster instance whose sensors see the same clock."""
    monkeypatch.setenv("KTRDR_TIMEFRAMES", "1h")
    monkeypatch.setenv("KTRDR_CLOCK", AFTER_JANUARY.isoformat())
    data_dir = tmp_path / "data"
    with (GatewayThread(clock=AFTER_JANUARY, latency="none") as gw,
          dg.instance_for_test() as instance):
        instance.add_dynamic_partitions("symbols", ["ES", "EURUSD"])
        resources = {"ktrdr": KtrdrSettings(ib_port=gw.port, data_dir=str(data_dir),
                                            ib_client_id=62)}
        yield gw, instance, resources, data_dir


def _materialize_1h(instance, resources, symbol: str):
    tf = get_timeframe("1h")
    result = dg.materialize(
        [build_bar_asset(tf), *build_checks(tf)], instance=instance, resources=resources,
        partition_key=dg.MultiPartitionKey({"symbol": symbol, "period": "2025"}))
    assert result.success
    [mat] = result.asset_materializations_for_node("bars_1h")
    return mat.metadata, {e.check_name: e for e in result.get_asset_check_evaluations()}


def _tail_fill(instance, resources):
    sensor = build_tail_fill_sensor(300, [build_bar_job(get_timeframe("1h"))])
    return sensor(dg.build_sensor_context(instance=instance, resources=resources))


def test_a_month_of_es_and_eurusd_hours_has_no_gaps_and_nothing_stale(january):
    gw, instance, resources, data_dir = january
    store = BarStore(data_dir)
    for symbol, per_week in (("ES", 5 * 23), ("EURUSD", 5 * 24)):
        meta, checks = _materialize_1h(instance, resources, symbol)
        gap = checks["calendar_gaps"]
        assert gap.passed, gap.metadata
        assert gap.metadata["gaps"].value == 0 and gap.metadata["missing_bars"].value == 0
        assert gap.metadata["expected_bars"].value == meta["rows"].value
        assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in
                                                         checks.items()}
        assert meta["bars_outside_sessions"].value == 0
        frame = store.read("1h", symbol, "2025")
        assert frame.index[0] >= datetime(2024, 12, 31, tzinfo=UTC)
        assert frame.index[-1] < datetime(2025, 2, 1, tzinfo=UTC)
        # a full week of bars between two weekends: 23 a CME session, 24 an IDEALPRO one
        week = frame[(frame.index >= datetime(2025, 1, 26, 12, tzinfo=UTC))
                     & (frame.index < datetime(2025, 2, 1, tzinfo=UTC))]
        assert len(week) == per_week
    # MLK day: CME closes at 12:00 CT
    es = store.read("1h", "ES", "2025").index.tz_convert(CT)
    assert max(t for t in es if t.date() == date(2025, 1, 20) and t.hour < 17).hour == 11
    assert not [t for t in es if t.date() == date(2025, 1, 20) and 12 <= t.hour < 17]
    assert not [t for t in es if t.hour == 16]
    eur = store.read("1h", "EURUSD", "2025").index.tz_convert(ET)
    assert not [t for t in eur if t.weekday() == 5 or (t.hour == 17 and t.minute < 15)]
    # the tail-fill sensor, on the Dagster instance: nothing stale
    assert stale_partitions(data_dir, ["ES", "EURUSD"], [get_timeframe("1h")],
                            AFTER_JANUARY) == []
    result = _tail_fill(instance, resources)
    assert not result.run_requests
    assert result.skip_reason and result.skip_reason.skip_message.startswith(
        "0 stale partition(s)")


def test_a_bar_outside_the_calendar_is_stored_and_listed_by_the_warn_check(january):
    gw, instance, resources, data_dir = january
    saturday = datetime(2025, 1, 11, 15, tzinfo=UTC)  # 09:00 CT on a Saturday
    halt = datetime(2025, 1, 15, 22, tzinfo=UTC)  # 16:00 CT: the daily halt
    gw.trade_outside_sessions("ES", saturday, 60)
    gw.trade_outside_sessions("ES", halt, 60)
    meta, checks = _materialize_1h(instance, resources, "ES")  # the run succeeds
    stored = BarStore(data_dir).read("1h", "ES", "2025")
    assert saturday in stored.index and halt in stored.index
    assert meta["bars_outside_sessions"].value == 2
    outside = checks["bars_outside_sessions"]
    assert not outside.passed and outside.severity == dg.AssetCheckSeverity.WARN
    assert not outside.blocking
    assert outside.metadata["outside_sessions"].value == 2
    listed = outside.metadata["outside_session_bars"].value
    assert "2025-01-11 15:00:00+00:00" in listed and "2025-01-15 22:00:00+00:00" in listed
    assert outside.metadata["dates"].value == ["2025-01-11", "2025-01-15"]
    # the other checks are not fooled: no gap, sorted and unique, OHLC valid
    for name in ("ohlc_valid", "unique_sorted_in_session", "calendar_gaps", "fresh"):
        assert checks[name].passed, (name, checks[name].metadata)
    # and the Dagster instance records the warning for the partition
    key = dg.AssetCheckKey(dg.AssetKey("bars_1h"), "bars_outside_sessions")
    [execution] = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
    assert not execution.event.dagster_event.event_specific_data.passed
    # a later load keeps the bars (complete: no request) and ES is not stale (EURUSD,
    # never loaded here, gets its initial run)
    again, _ = _materialize_1h(instance, resources, "ES")
    assert again["ib_requests"].value == 0 and again["bars_outside_sessions"].value == 2
    assert [str(r.partition_key) for r in _tail_fill(instance, resources).run_requests] == [
        "2025|EURUSD"]


def test_daily_fx_bars_loaded_through_dagster_carry_the_close_date(january):
    _, instance, resources, data_dir = january
    tf = get_timeframe("1d")
    result = dg.materialize(
        [build_bar_asset(tf), *build_checks(tf)], instance=instance, resources=resources,
        partition_key=dg.MultiPartitionKey({"symbol": "EURUSD", "period": "2025"}))
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items()}
    days = [t.date() for t in BarStore(data_dir).read("1d", "EURUSD", "2025").index]
    assert date(2025, 1, 6) in days  # Monday: the session Sunday 17:15 -> Monday 17:00
    assert not [d for d in days if d.weekday() >= 5]  # no Saturday or Sunday bar
    assert len(days) == 23  # the weekdays of January 2025

"""Futures beyond CME's equity index ones: NYMEX and COMEX energy and metals and CBOT
treasuries take their own calendars (CME currency futures keep the equity one), checked
against what real IB gateways answered.

Real answers (``docs/ib-facts.md`` §9a):

- CLZ2 (NYMEX), December 2021, a pickled ib_insync ``ContractDetails`` in
  nautilus_trader (tests/integration_tests/adapters/interactive_brokers/responses/
  contracts/CLZ2.pkl at 8a651be2): ``timeZoneId`` ``US/Eastern``, the strings below.
- NGU7 (NYMEX), March 2024, raw TWS bytes in ghill2/pyfutures
  (pyfutures/tests/unit/client/test_protocol.py at 96bdc1dc): Good Friday CLOSED.
- ZCH4 (CBOT corn), December 2023, raw TWS bytes in ghill2/pyfutures
  (pyfutures/tests/adapters/interactive_brokers/unit/test_providers.py at f1c0876c): two
  sessions a day, which the session model does not hold (grains keep CME's equity hours
  and the contract look-up says so).
- ZN, ZB and EUR (6E): IB's answers of 2016-2017 (trading ``1700-1600``, liquid
  ``0830-1600``, Chicago) and IB's contract pages of 2023 (same hours).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from ib_async import Contract

from ktrdr_pipeline.defs.bars.assets import build_bar_asset
from ktrdr_pipeline.defs.bars.checks import build_checks
from ktrdr_pipeline.defs.bars.jobs import build_bar_job
from ktrdr_pipeline.defs.bars.sensors import build_tail_fill_sensor
from ktrdr_pipeline.defs.resources import KtrdrSettings
from ktrdr_pipeline.domain import calendars
from ktrdr_pipeline.domain.calendars import FUTURE, FUTURE_ENERGY_METALS, FUTURE_RATES, FX, STOCK
from ktrdr_pipeline.domain.timeframes import get_timeframe
from ktrdr_pipeline.freshness import stale_partitions
from ktrdr_pipeline.ib.contracts import ResolvedContract, cached_profile, warn_if_hours_disagree
from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.store.parquet import BarStore

from .conftest import connect

ET, CT = ZoneInfo("US/Eastern"), ZoneInfo("US/Central")
#: CLZ2's answer as captured (IB's string starts with an empty entry).
CLZ2_TRADING = (";20211205:1800-20211206:1700;20211206:1800-20211207:1700;"
                "20211207:1800-20211208:1700;20211208:1800-20211209:1700;"
                "20211209:1800-20211210:1700")
CLZ2_LIQUID = ("20211205:CLOSED;20211206:0930-20211206:1700;20211207:0930-20211207:1700;"
               "20211208:0930-20211208:1700;20211209:0930-20211209:1700;"
               "20211210:0930-20211210:1700")
NGU7_TRADING = ("20240325:1800-20240326:1700;20240326:1800-20240327:1700;"
                "20240327:1800-20240328:1700;20240329:CLOSED;20240330:CLOSED;"
                "20240331:1800-20240401:1700")
ZCH4_TRADING = ("20231205:1900-20231206:0745;20231206:0830-20231206:1320;"
                "20231206:1900-20231207:0745;20231207:0830-20231207:1320")
#: Sunday 2021-12-05, 18:30 New York: CLZ2's first session had just opened.
CLZ2_SEEN = datetime(2021, 12, 5, 23, 30, tzinfo=UTC)
AFTER_JANUARY = datetime(2025, 2, 1, 0, 0, tzinfo=UTC)


def _universe(tmp_path):
    """A simulator universe with futures of each calendar (and one stock)."""
    path = tmp_path / "universe.yaml"
    path.write_text(json.dumps({
        "stocks": [{"symbol": "AAPL", "primary_exchange": "NASDAQ", "price": 190.0}],
        "futures": [
            {"symbol": "ES", "exchange": "CME", "multiplier": "50", "price": 5900.0},
            {"symbol": "CL", "exchange": "NYMEX", "multiplier": "1000", "price": 70.0,
             "tick": 0.01, "name": "Light Sweet Crude Oil"},
            {"symbol": "GC", "exchange": "COMEX", "multiplier": "100", "price": 2600.0,
             "tick": 0.1, "name": "Gold"},
            {"symbol": "ZN", "exchange": "CBOT", "multiplier": "1000", "price": 110.0,
             "tick": 0.015625, "name": "10 Year US Treasury Note"},
            {"symbol": "EUR", "exchange": "CME", "multiplier": "125000", "price": 1.08,
             "tick": 0.00005, "name": "European Monetary Union Euro"},
            {"symbol": "ZC", "exchange": "CBOT", "multiplier": "5000", "price": 450.0,
             "tick": 0.25, "name": "Corn Futures"},
        ]}))
    return path


def _ib_sessions_held(text: str, tz: str, ib_text: str) -> list[date]:
    """Assert that every session of IB's answer ``ib_text`` (New York time) is a session
    of ``text`` (an hours string in ``tz``); returns the answer's CLOSED dates."""
    ours, _ = calendars.parse_hours(text, tz)
    theirs, closed = calendars.parse_hours(ib_text, "US/Eastern")
    assert len(theirs) == 5 and set(theirs) <= set(ours), (text, ib_text)
    return closed


def test_a_future_takes_its_exchanges_calendar():
    fut = lambda exchange, symbol: calendars.profile_for("FUT", exchange, symbol)  # noqa: E731
    assert fut("CME", "ES") is fut("CME", "NQ") is fut("CBOT", "YM") is FUTURE
    assert fut("NYMEX", "CL") is fut("NYMEX", "NG") is fut("COMEX", "GC") is FUTURE_ENERGY_METALS
    assert fut("nymex", "mcl") is FUTURE_ENERGY_METALS  # IB's codes, any case
    assert fut("CBOT", "ZN") is fut("ECBOT", "ZB") is FUTURE_RATES  # ECBOT: IB before 2018
    # currency futures: the equity calendar (the library's FX one stops at 2022)
    assert fut("CME", "EUR") is fut("GLOBEX", "JPY") is FUTURE
    # not modelled: the equity hours (wrong for them; see the module docstring)
    assert fut("CBOT", "ZC") is fut("CFE", "VIX") is FUTURE
    assert calendars.profile_for("FUT") is FUTURE  # nothing known but the type
    assert calendars.profile_for("STK", "NYMEX", "CL") is STOCK
    assert calendars.profile_for("CASH", "IDEALPRO", "EUR") is FX
    entry = {"sec_type": "FUT", "exchange": "NYMEX", "symbol": "CL"}
    assert cached_profile(entry) is FUTURE_ENERGY_METALS
    assert cached_profile({"sec_type": "FUT"}) is FUTURE  # a cache written before


def test_energy_hours_agree_with_real_ib_answers():
    clz2 = calendars.hours_disagreement(FUTURE_ENERGY_METALS, CLZ2_TRADING, "US/Eastern")
    assert clz2 is None
    assert calendars.hours_disagreement(FUTURE_ENERGY_METALS, CLZ2_LIQUID, "US/Eastern",
                                        use_rth=True) is None
    # Good Friday 2024: no session (NGU7's answer)
    assert calendars.hours_disagreement(FUTURE_ENERGY_METALS, NGU7_TRADING,
                                        "US/Eastern") is None
    # the strings the calendar gives (in Chicago time) hold the same sessions
    for text, ib_text, rth in ((calendars.hours_string(FUTURE_ENERGY_METALS, CLZ2_SEEN, False),
                                CLZ2_TRADING, False),
                               (calendars.hours_string(FUTURE_ENERGY_METALS, CLZ2_SEEN, True),
                                CLZ2_LIQUID, True)):
        closed = _ib_sessions_held(text, "US/Central", ib_text)
        assert (closed == [date(2021, 12, 5)]) == rth  # Sunday: no liquid hours
        assert text.startswith("20211205:CLOSED;20211206:0830-20211206:1600;" if rth
                               else "20211205:1700-20211206:1600;20211206:1700-")
    # the calendars part ways on exchange holidays: MLK day 2025 ends 13:30 Chicago for
    # energy, 12:00 for the equity index futures
    [energy] = calendars.sessions_on_dates(FUTURE_ENERGY_METALS, date(2025, 1, 20),
                                           date(2025, 1, 20), False)
    [equity] = calendars.sessions_on_dates(FUTURE, date(2025, 1, 20), date(2025, 1, 20),
                                           False)
    assert (equity.close.astimezone(CT).hour, equity.close.astimezone(CT).minute) == (12, 0)
    assert (energy.close.astimezone(CT).hour, energy.close.astimezone(CT).minute) == (13, 30)
    # grains are not modelled: the comparison says so, naming IB's two sessions a day
    grains = calendars.hours_disagreement(calendars.profile_for("FUT", "CBOT", "ZC"),
                                          ZCH4_TRADING, "US/Central")
    assert grains is not None and "20231206:0830-20231206:1320" in grains


def test_simulator_contract_details_follow_each_futures_calendar(tmp_path):
    with GatewayThread(clock=CLZ2_SEEN, latency="none", universe=_universe(tmp_path)) as gw:
        ib = connect(gw)
        try:
            details = {sym: ib.reqContractDetails(Contract(
                secType="FUT", symbol=sym, exchange=exchange,
                lastTradeDateOrContractMonth="202203"))[0]
                for sym, exchange in (("CL", "NYMEX"), ("GC", "COMEX"), ("ZN", "CBOT"),
                                      ("EUR", "CME"), ("ES", "CME"), ("ZC", "CBOT"))}
            cl = details["CL"].contract
            bars = ib.reqHistoricalData(cl, "20211204 00:00:00 US/Eastern", "1 W", "1 hour",
                                        "TRADES", False, 2)  # the week before
        finally:
            ib.disconnect()
    cl_details = details["CL"]
    # the same sessions as IB's CLZ2 answer (IB states them in New York time, the
    # simulator in Chicago time: see calendars' docstring)
    for text, ib_text in ((cl_details.tradingHours, CLZ2_TRADING),
                          (cl_details.liquidHours, CLZ2_LIQUID)):
        _ib_sessions_held(text, cl_details.timeZoneId, ib_text)
    assert cl_details.tradingHours.startswith("20211205:1700-20211206:1600;")
    assert details["GC"].tradingHours == cl_details.tradingHours
    for sym in ("ZN", "EUR"):
        assert details[sym].timeZoneId == "US/Central"
        assert details[sym].tradingHours.startswith("20211205:1700-20211206:1600;")
        assert details[sym].liquidHours.startswith("20211205:CLOSED;20211206:0830-20211206:1600;")
    profiles = {}
    for sym, cd in details.items():
        resolved = ResolvedContract.from_details(sym, cd)
        profiles[sym] = resolved.profile
        # what the simulator says agrees with the calendar the pipeline picks
        assert warn_if_hours_disagree(resolved, cd) is None
    assert profiles == {"CL": FUTURE_ENERGY_METALS, "GC": FUTURE_ENERGY_METALS,
                        "ZN": FUTURE_RATES, "EUR": FUTURE, "ES": FUTURE, "ZC": FUTURE}
    # CL's hourly bars: 23 a full session, none in the 17:00-18:00 New York halt
    local = [b.date.astimezone(ET) for b in bars]
    assert local and not [t for t in local if t.hour == 17]
    session = [t for t in local if datetime(2021, 12, 1, 18, tzinfo=ET) <= t
               < datetime(2021, 12, 2, 17, tzinfo=ET)]
    assert len(session) == 23 and session[0].hour == 18


@pytest.fixture
def cl_january(tmp_path, monkeypatch):
    """The simulator with CL on NYMEX after January 2025, a Dagster instance on its clock."""
    monkeypatch.setenv("KTRDR_TIMEFRAMES", "1h")
    monkeypatch.setenv("KTRDR_CLOCK", AFTER_JANUARY.isoformat())
    data_dir = tmp_path / "data"
    with (GatewayThread(clock=AFTER_JANUARY, latency="none",
                        universe=_universe(tmp_path)) as gw,
          dg.instance_for_test() as instance):
        instance.add_dynamic_partitions("symbols", ["CL"])
        resources = {"ktrdr": KtrdrSettings(ib_port=gw.port, data_dir=str(data_dir),
                                            ib_client_id=63)}
        yield instance, resources, data_dir


def test_a_month_of_cl_hours_loads_without_gaps_by_the_energy_calendar(cl_january):
    """Through Dagster: the load, the checks and the tail-fill sensor all judge CL by the
    energy calendar. MLK day 2025 tells the calendars apart: CL trades to 13:30 Chicago,
    where the equity calendar would end the session at 12:00 and count the 12:00 and 13:00
    bars as outside the sessions."""
    instance, resources, data_dir = cl_january
    tf = get_timeframe("1h")
    result = dg.materialize(
        [build_bar_asset(tf), *build_checks(tf)], instance=instance, resources=resources,
        partition_key=dg.MultiPartitionKey({"symbol": "CL", "period": "2025"}))
    assert result.success
    [mat] = result.asset_materializations_for_node("bars_1h")
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items()}
    gap = checks["calendar_gaps"]
    assert gap.metadata["gaps"].value == 0 and gap.metadata["missing_bars"].value == 0
    assert gap.metadata["expected_bars"].value == mat.metadata["rows"].value
    assert mat.metadata["bars_outside_sessions"].value == 0
    assert checks["bars_outside_sessions"].metadata["outside_sessions"].value == 0
    stored = BarStore(data_dir).read("1h", "CL", "2025").index.tz_convert(CT)
    mlk = [t for t in stored if t.date() == date(2025, 1, 20) and t.hour < 17]
    assert [t.hour for t in mlk][-2:] == [12, 13]  # the 13:00-13:30 bar is the last
    assert not [t for t in stored if t.hour == 16]
    week = [t for t in stored if datetime(2025, 1, 26, 17, tzinfo=CT) <= t
            < datetime(2025, 2, 1, tzinfo=CT)]
    assert len(week) == 5 * 23
    # the tail-fill sensor on the instance: nothing stale
    assert stale_partitions(data_dir, ["CL"], [tf], AFTER_JANUARY) == []
    sensor = build_tail_fill_sensor(300, [build_bar_job(tf)])
    tick = sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert not tick.run_requests
    assert tick.skip_reason.skip_message.startswith("0 stale partition(s)")
    assert AFTER_JANUARY - timedelta(days=1) < stored[-1].tz_convert(UTC).to_pydatetime()

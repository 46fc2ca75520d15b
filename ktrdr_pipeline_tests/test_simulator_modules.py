"""The simulator's parts on their own: rules, faults, latency, encoding, options, and the
package's import graph (no cycles)."""

from __future__ import annotations

import ast
import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from ktrdr_pipeline.domain import ib_rules
from ktrdr_pipeline.domain.calendars import STOCK
from ktrdr_pipeline.simulator import rules
from ktrdr_pipeline.simulator.audit import AuditLog
from ktrdr_pipeline.simulator.faults import ConnectionFaults, Faults
from ktrdr_pipeline.simulator.latency import LatencyModel
from ktrdr_pipeline.simulator.options import monthly_expiries
from ktrdr_pipeline.simulator.protocol import describe, format_bar_time, parse_contract
from ktrdr_pipeline.simulator.universe import build_universe

SIMULATOR = Path(__file__).resolve().parents[1] / "ktrdr_pipeline" / "simulator"
NOW = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Sibling modules ``path`` imports, at run time or under TYPE_CHECKING alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [
                    a.name for a in node.names]
                found.update(names)
            elif node.module and node.module.startswith("ktrdr_pipeline.simulator."):
                found.add(node.module.split(".")[2])
    return found & modules


def test_the_simulator_has_no_import_cycles():
    modules = {p.stem for p in SIMULATOR.glob("*.py")}
    graph = {m: _imports(SIMULATOR / f"{m}.py", modules) for m in modules}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        for d in graph[m]:
            assert d not in path, f"import cycle: {' -> '.join([*path, d])}"
            if d not in done:
                visit(d, [*path, d])
        done.add(m)

    for m in sorted(modules):
        visit(m, [m])
    assert "server" not in graph["admin"] and "server" not in graph["session"]


def test_faults_add_and_take():
    faults = Faults()
    assert faults.add("stall", 2) == 2 and faults.add("stall") == 3
    assert faults.take("stall") and faults.stall == 2
    assert not faults.take("pacing")
    with pytest.raises(ValueError, match="unknown fault 'nope'"):
        faults.add("nope")
    with pytest.raises(ValueError, match=">= 0"):
        faults.add("pacing", -1)


class _Conn:
    def __init__(self) -> None:
        self.errors: list[int] = []
        self.closed = False

    def error(self, req_id: int, code: int, message: str) -> None:
        self.errors.append(code)

    def close(self) -> None:
        self.closed = True


def test_connection_faults_nightly_reset_and_disconnect():
    conns = [_Conn(), _Conn()]
    faults = ConnectionFaults(lambda: conns, AuditLog(None))

    async def main() -> bool:
        reset = asyncio.ensure_future(faults.nightly_reset(0.05, "1102"))
        await asyncio.sleep(0.01)
        held = not await _ready(faults.farm_available())
        await reset
        return held and await _ready(faults.farm_available())

    assert asyncio.run(main())
    assert all(c.errors == [ib_rules.ERR_CONNECTIVITY_LOST,
                            ib_rules.ERR_RESTORED_DATA_MAINTAINED] for c in conns)
    assert faults.disconnect_all() == 2 and all(c.closed for c in conns)
    with pytest.raises(ValueError):
        asyncio.run(faults.nightly_reset(0, "never"))


async def _ready(coro) -> bool:
    try:
        await asyncio.wait_for(coro, 0.01)
        return True
    except TimeoutError:
        return False


def test_latency_model():
    realistic = LatencyModel.named("realistic")
    assert realistic.bars_delay(1000) == pytest.approx(0.25 + 0.1 * (1 + 1000 / 20_000))
    # the anchors of simulator/latency.py: a day of 1-min bars well under a second, 10 D
    # (IB's sample) under a second, a year of 1-min RTH bars (252 x 390) just under
    # ib_async's default 60 s timeout, more than in proportion to the bars
    assert realistic.bars_delay(390) < 0.5
    assert realistic.bars_delay(3900) < 1.0
    assert 45 < realistic.bars_delay(252 * 390) < 60
    assert realistic.bars_delay(252 * 390) > 10 * realistic.bars_delay(252 * 39)
    assert LatencyModel.named("none").bars_delay(10**6) == 0
    assert realistic.throttle() is not None
    assert LatencyModel.named("none").throttle() is None
    with pytest.raises(ValueError):
        LatencyModel.named("slow")


def test_open_requests_limit_and_release():
    open_requests = rules.OpenRequests()
    for i in range(ib_rules.MAX_OPEN_HISTORICAL_REQUESTS):
        open_requests.claim(1 if i % 2 else 2, "hist", i)
    with pytest.raises(rules.RequestError) as exc:
        open_requests.claim(3, "hist", 99)
    assert exc.value.code == ib_rules.ERR_PROCESSING
    open_requests.release(2, "hist", 0)
    open_requests.release_all(1)
    assert len(open_requests) == ib_rules.MAX_OPEN_HISTORICAL_REQUESTS // 2 - 1


def test_bars_request_rules():
    assert rules.check_bars_request("1 hour", "2 D", "TRADES", "1", "2").span == timedelta(days=2)
    for args, marker in ((("7 mins", "1 D", "TRADES", "1", "2"), "'bP'"),
                         (("1 hour", "2 X", "TRADES", "1", "2"), "'bQ'"),
                         (("1 hour", "1 D", "QUOTES", "1", "2"), "'bS'"),
                         (("1 hour", "1 D", "TRADES", "2", "2"), "'bR'")):
        with pytest.raises(rules.RequestError, match=marker):
            rules.check_bars_request(*args)
    # IB's current limits (docs/ib-facts.md §2): 162 "Time length exceed max.", not 321;
    # the old step-size table (1 min -> 1 D) is no rule
    with pytest.raises(rules.RequestError) as exc:
        rules.check_max_duration(ib_rules.parse_duration("2 D"), "1 secs")
    assert (exc.value.code, exc.value.message) == (ib_rules.ERR_HMDS,
                                                   ib_rules.MSG_TIME_LENGTH_EXCEEDED)
    rules.check_max_duration(ib_rules.parse_duration("365 D"), "1 min")
    start, end = rules.bars_window(STOCK, NOW + timedelta(days=1), NOW,
                                   ib_rules.parse_duration("1 Y"), "1 secs", True)
    assert end == NOW and start == NOW - ib_rules.SMALL_BAR_HISTORY
    # durations in sessions (§2): 5 D ending Friday 2025-01-10 16:00 ET opens on Jan 3
    et = ZoneInfo("US/Eastern")
    friday = datetime(2025, 1, 10, 16, tzinfo=et)
    assert rules.bars_window(STOCK, friday, NOW, ib_rules.parse_duration("5 D"), "1 day",
                             True) == (datetime(2025, 1, 3, 9, 30, tzinfo=et), friday)
    assert rules.parse_end_datetime("20261117-16:00:00", NOW) == datetime(
        2026, 11, 17, 16, tzinfo=UTC)


def test_contract_resolution_and_data_availability():
    universe = build_universe(NOW.date())
    aapl = rules.resolve_contract(universe, {"symbol": "AAPL", "secType": "STK"}, False, NOW)
    assert aapl.symbol == "AAPL"
    with pytest.raises(rules.RequestError, match="No security definition"):
        rules.resolve_contract(universe, {"symbol": "NOPE", "secType": "STK"}, False, NOW)
    [eurusd] = universe.by_symbol("EUR", "CASH")
    assert not rules.has_bars(eurusd, "TRADES") and rules.has_bars(eurusd, "MIDPOINT")
    assert not rules.has_head_timestamp(eurusd, "TRADES")
    assert rules.no_data(aapl, "TRADES").code == ib_rules.ERR_HMDS
    paced = rules.bars_paced(aapl, {"exchange": ""}, "BID_ASK", "", "1 D", "1 secs", "1")
    assert paced.weight == 2


def test_contract_fields_and_bar_times():
    contract = parse_contract(["265598", "AAPL", "STK", "", "0", "", "", "SMART", "", "USD"])
    assert contract["conId"] == "265598" and contract["currency"] == "USD"
    assert "localSymbol" not in contract
    assert describe(contract) == "AAPL STK SMART USD"
    t = datetime(2026, 11, 17, 15, 30, tzinfo=UTC)
    ny = ZoneInfo("US/Eastern")
    assert format_bar_time(t, "1", ny, daily=True) == "20261117"
    assert format_bar_time(t, "2", ny, daily=False) == str(int(t.timestamp()))
    assert format_bar_time(t, "1", ny, daily=False) == "20261117 10:30:00 US/Eastern"


def test_monthly_expiries_skip_the_near_month():
    assert monthly_expiries(date(2026, 11, 18)) == [date(2026, 12, 18), date(2027, 1, 15)]
    assert monthly_expiries(date(2026, 10, 25)) == [date(2026, 11, 20), date(2026, 12, 18)]

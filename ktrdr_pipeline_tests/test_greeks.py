"""Portfolio Greeks snapshots against the gateway simulator, in both IB_API_MODEs."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ib_async import OptionComputation

from ktrdr_pipeline.greeks.bridges import (
    BridgeUnavailable,
    PortalBridge,
    PortalClient,
    SocketBridge,
    make_bridge,
    portal_number,
)
from ktrdr_pipeline.greeks.cli import add_greeks_parser
from ktrdr_pipeline.greeks.config import GreeksConfig
from ktrdr_pipeline.greeks.model import GREEKS, Snapshot
from ktrdr_pipeline.greeks.runner import (
    RunStats,
    SnapshotRunner,
    TickClaims,
    default_greeks_timeout,
    open_store,
    run_snapshots,
)
from ktrdr_pipeline.greeks.store import GreeksStore, read_rows
from ktrdr_pipeline.simulator.server import GatewayThread

from .lockholder import DuckDBLockHolder as Holder

#: A Saturday: markets are shut, so prices stay put between the simulator serving a value
#: and the test recomputing it (the Greeks still decay with time, by ~1e-7 per second).
WEEKEND = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
MODES = ("SOCKET", "PORTAL")


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayThread]:
    with GatewayThread(clock=WEEKEND, latency="none", portal_port=0, portal_tls=True,
                       tick_interval=0.2) as g:
        yield g


def env_for(gw: GatewayThread, data_dir: Path, mode: str, **extra: str) -> dict[str, str]:
    return {
        "KTRDR_DATA_DIR": str(data_dir), "IB_API_MODE": mode, "IB_PORT": str(gw.port),
        "IB_PORTAL_URL": gw.server._portal.base_url,
        "IB_PORTAL_VERIFY": str(gw.server.portal_cert_path),
        "BRIDGE_POLL_INTERVAL": "1", **extra,
    }


def config(gw: GatewayThread, data_dir: Path, mode: str, **extra: str) -> GreeksConfig:
    return GreeksConfig.from_env(env_for(gw, data_dir, mode, **extra))


class CountingStore(GreeksStore):
    """Records every stored snapshot's tick, in write order."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ticks: list[float] = []
        self.outcomes: list[str] = []

    def write_snapshot(self, snapshot: Snapshot) -> str:
        outcome = super().write_snapshot(snapshot)
        self.ticks.append(snapshot.tick_time.timestamp())
        self.outcomes.append(outcome)
        return outcome


def counting_store(cfg: GreeksConfig) -> CountingStore:
    store = CountingStore(cfg.db_path, cfg.buffer_path, flush_interval=cfg.flush_interval,
                          mode=cfg.mode)
    store.bootstrap()
    return store


def stored_ticks(cfg: GreeksConfig) -> list[float]:
    return [r["tick_time"].timestamp() for r in read_rows(
        cfg.db_path, "SELECT tick_time FROM portfolio_greeks WHERE con_id = 0 ORDER BY rowid")]


def expected_positions(gw: GatewayThread, at: datetime) -> dict[int, dict[str, float]]:
    """Per position, the values the simulator serves at simulator time ``at``."""
    book, universe = gw.server.book, gw.server.universe
    out = {}
    for pos in universe.positions:
        inst = universe.instruments[pos.con_id]
        mult = inst.multiplier_value
        if inst.sec_type == "OPT":
            g = book.greeks(inst, at)
            unit = {"delta": g.delta, "gamma": g.gamma, "vega": g.vega, "theta": g.theta}
            und = book.price(book.underlying_of(inst), at)
        else:
            unit = {"delta": 1.0, "gamma": 0.0, "vega": 0.0, "theta": 0.0}
            und = book.price(inst, at)
        out[inst.con_id] = {"position": pos.quantity, "multiplier": mult, "underlying": und,
                            **{f"unit_{k}": v for k, v in unit.items()},
                            **{k: pos.quantity * mult * v for k, v in unit.items()}}
    return out


# -- contents ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_snapshot_equals_the_greeks_the_simulator_served(gw, tmp_path, mode):
    cfg = config(gw, tmp_path, mode)
    sim_before = gw.server.clock.now()
    _, snap = asyncio.run(run_snapshots(cfg, once=True, claims=False))
    sim_now = gw.server.clock.now()
    assert snap is not None and snap.mode == mode and snap.account == "DU0000001"
    if mode == "PORTAL":
        # _updated is the simulator time at which every value was computed: exact, and
        # taken during this run (it is stamped in whole milliseconds)
        at, rel = snap.data_time, 1e-9
        assert at is not None
        assert sim_before - timedelta(milliseconds=1) <= at <= sim_now
    else:
        at, rel = sim_now, 1e-6  # the last model-Greeks tick is at most a moment older
    want = expected_positions(gw, at)
    assert snap.missing_greeks == 0
    assert {p.con_id for p in snap.positions} == set(want)
    options = 0
    for p in snap.positions:
        w = want[p.con_id]
        options += p.is_option
        assert p.position == w["position"] and p.multiplier == w["multiplier"]
        for g in GREEKS:
            assert getattr(p, f"unit_{g}") == pytest.approx(w[f"unit_{g}"], rel=rel, abs=1e-12)
            assert p.exposure(g) == pytest.approx(w[g], rel=rel, abs=1e-9)
        assert p.underlying_price == pytest.approx(w["underlying"], rel=1e-9)
    assert options == 4
    totals = snap.totals()
    for g in GREEKS:
        assert totals[g] == pytest.approx(sum(w[g] for w in want.values()), rel=rel)
    # and the database holds exactly that snapshot
    rows = read_rows(cfg.db_path, "SELECT * FROM portfolio_greeks ORDER BY rowid")
    assert len(rows) == 1 + len(want)
    agg = rows[0]
    assert agg["symbol"] == "PORTFOLIO" and agg["con_id"] == 0 and agg["mode"] == mode
    assert agg["account"] == "DU0000001" and agg["missing_greeks"] == 0
    assert agg["positions"] == len(want)
    for g in GREEKS:
        assert agg[g] == pytest.approx(totals[g], rel=1e-12)
    for row in rows[1:]:
        w = want[row["con_id"]]
        assert row["delta"] == pytest.approx(w["delta"], rel=rel, abs=1e-9)
        assert row["unit_vega"] == pytest.approx(w["unit_vega"], rel=rel, abs=1e-12)
        assert row["underlying_price"] == pytest.approx(w["underlying"], rel=1e-9)
        assert row["snapshot_id"] == agg["snapshot_id"]
    events = [r["event"] for r in read_rows(cfg.db_path, "SELECT event FROM api_logs "
                                                         "ORDER BY ts")]
    assert events == ["connect", "disconnect"]


def test_socket_sentinels_count_as_missing(gw, tmp_path):
    cfg = config(gw, tmp_path, "SOCKET")
    store = open_store(cfg)

    async def go() -> Snapshot:
        bridge = SocketBridge(cfg, store, greeks_timeout=0.3)
        await bridge.start()
        try:
            con_id = next(p.contract.conId for p in bridge.ib.positions()
                          if p.contract.secType == "OPT")
            real = bridge._tickers[con_id]
            # vega and theta "not computed": ib_async leaves them at -2.0
            bridge._tickers[con_id] = SimpleNamespace(
                contract=real.contract, time=datetime.now(UTC), marketPrice=lambda: math.nan,
                modelGreeks=OptionComputation(0, 0.3, 0.5, 2.0, 0.0, 0.01, -2.0, -2.0, 250.0))
            return await bridge.snapshot(datetime.now(UTC))
        finally:
            await bridge.close()

    snap = asyncio.run(go())
    assert snap.missing_greeks == 1
    bad = [p for p in snap.positions if p.missing]
    assert len(bad) == 1 and bad[0].unit_vega is None and bad[0].unit_theta is None
    assert bad[0].unit_delta == 0.5 and bad[0].unit_gamma == 0.01
    rest = [p for p in snap.positions if not p.missing]
    assert snap.totals()["vega"] == pytest.approx(sum(p.exposure("vega") for p in rest))
    assert snap.rows()[0]["missing_greeks"] == 1


# -- the poll grid --------------------------------------------------------------------------------
async def run_until_stored(cfg: GreeksConfig, store: CountingStore, n: int,
                           **kwargs: Any) -> RunStats:
    """A live run, stopped once ``store`` holds ``n`` snapshots (deadline: a minute)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_snapshots(cfg, stop=stop, store=store, **kwargs))
    try:
        await wait_for(lambda: len(store.ticks) >= n or task.done(), f"{n} snapshots", 60)
    finally:
        stop.set()
    stats, _ = await task
    return stats


def assert_on_the_grid(ticks: list[float], stats: RunStats, interval: float = 1.0) -> None:
    """Every tick on the grid, stored once, in order; each grid slot between the first and
    the last either taken or counted as missed (a loaded machine may make the runner skip
    a tick it woke up too late for; the skips are the only gaps)."""
    assert all(t == int(t) for t in ticks)  # multiples of the interval since the epoch
    steps = [round((b - a) / interval) for a, b in zip(ticks, ticks[1:], strict=False)]
    assert [s * interval for s in steps] == [b - a for a, b in zip(ticks, ticks[1:],
                                                                    strict=False)]
    assert all(s >= 1 for s in steps), ticks  # in order, none twice
    assert sum(s - 1 for s in steps) <= stats.missed


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_consecutive_snapshots_one_interval_apart_on_the_grid(gw, tmp_path, mode):
    """Snapshots on the grid, one interval apart unless a tick was skipped (and counted).

    How close to its tick a snapshot is taken depends on the machine's load: that drift is
    a figure of ``benchmarks/bench_greeks.py`` (target under 1 s), not asserted here; the
    runner's timing logic is checked exactly, on a fake clock, by
    ``test_the_runner_never_drifts_and_skips_what_it_overran``.
    """
    cfg = config(gw, tmp_path, mode)
    store = counting_store(cfg)
    stats = asyncio.run(run_until_stored(cfg, store, 3))
    assert stats.snapshots == stats.ticks >= 3 and stats.failed == 0
    rows = read_rows(cfg.db_path, "SELECT tick_time, snapshot_time FROM portfolio_greeks "
                                  "WHERE con_id = 0 ORDER BY rowid")
    ticks = [r["tick_time"].timestamp() for r in rows]
    assert ticks == store.ticks and len(ticks) == stats.ticks
    assert_on_the_grid(ticks, stats)
    drifts = [(r["snapshot_time"] - r["tick_time"]).total_seconds() for r in rows]
    assert all(0 <= d for d in drifts), drifts  # never before its tick
    assert stats.max_drift_s == pytest.approx(max(drifts), abs=1e-3)


class FakeBridge:
    mode = "SOCKET"
    available = True

    def __init__(self, clock: list[float], durations: dict[int, float]):
        self.clock = clock
        self.durations = durations
        self.calls: list[float] = []

    async def snapshot(self, tick_time: datetime) -> Snapshot:
        self.calls.append(self.clock[0])
        self.clock[0] += self.durations.get(len(self.calls), 0.05)
        t = datetime.fromtimestamp(self.clock[0], UTC)
        return Snapshot(account="DU1", mode="SOCKET", tick_time=tick_time, snapshot_time=t)


def test_the_runner_never_drifts_and_skips_what_it_overran(tmp_path):
    clock = [1_800_000_000.37]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds + 0.004  # every wake-up a little late

    bridge = FakeBridge(clock, {3: 2.6})  # the third snapshot takes 2.6 s
    store = GreeksStore(tmp_path / "g.duckdb", tmp_path / "b.jsonl")
    runner = SnapshotRunner(bridge, store, 1.0, clock=lambda: clock[0], sleep=sleep)
    until = datetime.fromtimestamp(1_800_000_010, UTC)
    stats = asyncio.run(runner.run(until=until))
    starts = [c - 1_800_000_000 for c in bridge.calls]
    # ticks 1, 2, 3 on time; 3 overran into 5.6: 4 and 5 skipped, 6..9 on time again
    assert [round(s, 3) for s in starts] == [1.004, 2.004, 3.004, 6.004, 7.004, 8.004, 9.004]
    assert stats.missed == 2 and stats.snapshots == 7 and stats.ticks == 7
    assert stored_ticks(SimpleNamespace(db_path=tmp_path / "g.duckdb")) == [
        1_800_000_000 + k for k in (1, 2, 3, 6, 7, 8, 9)]


@pytest.mark.slow
def test_overlapping_runs_take_each_tick_once(gw, tmp_path):
    """Two runs on one data directory: every tick either of them reached is stored once.

    Both runs normally reach every tick (one takes it, the other finds it taken); on a
    loaded machine one may wake up too late for a tick and skip it (counted as missed),
    which must not make a tick stored twice or lost for the other run.
    """
    cfg = config(gw, tmp_path, "PORTAL")
    stores = [counting_store(cfg), counting_store(cfg)]
    bridges = [make_bridge(cfg, st, greeks_timeout=default_greeks_timeout(cfg))
               for st in stores]

    def stored() -> int:
        return sum(len(st.ticks) for st in stores)

    async def both() -> list[RunStats]:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(run_snapshots(cfg, stop=stop, store=st, bridge=br))
                 for st, br in zip(stores, bridges, strict=True)]
        try:
            # both connected, then three ticks (each of which both runs want)
            await wait_for(lambda: all(br.available for br in bridges)
                           or any(t.done() for t in tasks), "both bridges connected", 60)
            connected = stored()
            await wait_for(lambda: stored() >= connected + 3 or any(t.done() for t in tasks),
                           "3 snapshots", 60)
        finally:
            stop.set()
        return [s for s, _ in await asyncio.gather(*tasks)]

    a, b = asyncio.run(both())
    assert a.failed == b.failed == 0
    assert a.snapshots + b.snapshots >= 3
    for run, st in ((a, stores[0]), (b, stores[1])):
        assert run.ticks == run.snapshots + run.taken_elsewhere  # taken here or there
        assert len(st.ticks) == run.snapshots
    # each tick taken by one run: those a run found taken are the other run's
    assert not set(stores[0].ticks) & set(stores[1].ticks)
    assert a.taken_elsewhere <= b.snapshots and b.taken_elsewhere <= a.snapshots
    assert a.taken_elsewhere + b.taken_elsewhere >= 1  # the runs really overlapped
    ticks = stored_ticks(cfg)
    assert len(ticks) == len(set(ticks)) == a.snapshots + b.snapshots
    assert sorted(ticks) == sorted(stores[0].ticks + stores[1].ticks)
    assert_on_the_grid(sorted(ticks), SimpleNamespace(missed=a.missed + b.missed))
    claims = TickClaims(tmp_path / "c")
    assert claims.claim(10.0) and not claims.claim(10.0) and not claims.claim(5.0)
    assert claims.claim(15.0)


# -- the outage buffer with a live bridge -------------------------------------------------------
async def wait_for(predicate: Callable[[], bool], what: str, deadline: float) -> None:
    """Poll ``predicate`` on the running loop until it holds; fail clearly after
    ``deadline`` seconds."""
    give_up = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"not reached within {deadline:g} s: {what}")
        await asyncio.sleep(0.05)


def _locked_run(gw: GatewayThread, tmp_path: Path, mode: str, buffered: int,
                flush_s: float) -> tuple[GreeksConfig, CountingStore, RunStats]:
    """A live run: one snapshot written, then another process holds the database until
    ``buffered`` snapshots went to the outage buffer, then lets go; the run stops once it
    has flushed the buffer itself and written again."""
    cfg = config(gw, tmp_path, mode, BRIDGE_FLUSH_INTERVAL=str(flush_s))
    store = counting_store(cfg)

    async def scenario() -> RunStats:
        stop = asyncio.Event()
        task = asyncio.create_task(run_snapshots(cfg, stop=stop, store=store))
        try:
            await wait_for(lambda: "written" in store.outcomes, "a first snapshot written",
                           60)
            holder = await asyncio.to_thread(Holder, cfg.db_path)  # another process, r/w
            try:
                await wait_for(lambda: store.outcomes.count("buffered") >= buffered,
                               f"{buffered} snapshots buffered while the database is held",
                               buffered * 3 + 60)
            finally:
                await asyncio.to_thread(holder.release)
            held = len(store.outcomes)
            await wait_for(lambda: store.buffer.size() == 0
                           and "written" in store.outcomes[held:],
                           "the run flushed the buffer and wrote again", flush_s + 60)
        finally:
            stop.set()
        stats, _ = await task
        return stats

    return cfg, store, asyncio.run(scenario())


def _assert_nothing_lost(cfg: GreeksConfig, store: CountingStore, stats: RunStats) -> None:
    assert "buffered" in store.outcomes and store.outcomes[-1] == "written"
    assert stats.failed == 0 and stats.snapshots == stats.ticks
    assert store.buffer.size() == 0
    ticks = stored_ticks(cfg)
    assert ticks == store.ticks  # every snapshot, once, in the order it was taken
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks) == stats.ticks
    events = [r["event"] for r in read_rows(cfg.db_path, "SELECT event FROM api_logs "
                                                         "ORDER BY ts")]
    assert "db_unavailable" in events and "buffer_flushed" in events


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_locked_database_loses_nothing_and_keeps_order(gw, tmp_path, mode):
    cfg, store, stats = _locked_run(gw, tmp_path, mode, buffered=3, flush_s=1.0)
    _assert_nothing_lost(cfg, store, stats)
    assert store.outcomes.count("buffered") >= 3


@pytest.mark.slow
def test_a_database_locked_for_25_seconds_loses_nothing(gw, tmp_path):
    cfg, store, stats = _locked_run(gw, tmp_path, "SOCKET", buffered=25, flush_s=10.0)
    _assert_nothing_lost(cfg, store, stats)
    assert store.outcomes.count("buffered") >= 25


# -- Client Portal specifics ----------------------------------------------------------------------
def test_portal_tls_is_verified_by_default(gw, tmp_path):
    env = env_for(gw, tmp_path, "PORTAL")
    del env["IB_PORTAL_VERIFY"]
    cfg = GreeksConfig.from_env(env)
    assert cfg.portal_verify is True
    with pytest.raises(BridgeUnavailable, match="IB_PORTAL_VERIFY"):
        asyncio.run(run_snapshots(cfg, once=True, claims=False))
    errors = read_rows(cfg.db_path, "SELECT message FROM api_logs WHERE event = 'error'")
    assert errors and "IB_PORTAL_VERIFY" in errors[0]["message"]
    off = GreeksConfig.from_env({**env, "IB_PORTAL_VERIFY": "false"})
    _, snap = asyncio.run(run_snapshots(off, once=True, claims=False))
    assert snap is not None and len(snap.positions) == 8


@pytest.mark.slow
def test_portal_keeps_the_session_and_reprimes_after_a_reset(gw, tmp_path):
    cfg = config(gw, tmp_path, "PORTAL")
    portal = gw.server._portal
    store = counting_store(cfg)
    bridge = PortalBridge(cfg, store, tickle_interval=0.5, greeks_timeout=0.6)
    tickles = portal.tickles

    async def scenario() -> RunStats:
        stop = asyncio.Event()
        task = asyncio.create_task(run_snapshots(cfg, stop=stop, store=store, bridge=bridge))
        try:
            await wait_for(lambda: len(store.ticks) >= 2 or task.done(),
                           "2 snapshots before the reset", 60)
            await asyncio.to_thread(gw.call, portal.reset_session)  # as after IB's nightly reset
            await wait_for(lambda: len(store.ticks) >= 4 and portal.tickles - tickles >= 3
                           or task.done(), "2 snapshots after the reset, 3 tickles", 60)
        finally:
            stop.set()
        stats, _ = await task
        return stats

    stats = asyncio.run(scenario())
    assert stats.failed == 0 and stats.snapshots == stats.ticks >= 4
    assert portal.tickles - tickles >= 3
    rows = read_rows(cfg.db_path, "SELECT tick_time, missing_greeks FROM portfolio_greeks "
                                  "WHERE con_id = 0 ORDER BY rowid")
    assert [r["missing_greeks"] for r in rows] == [0] * len(rows)


class FakeSession:
    def __init__(self, pages: list[list[dict]]):
        self.pages = pages
        self.urls: list[str] = []
        self.headers: dict[str, str] = {}

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        self.urls.append(url)
        page = int(url.rsplit("/", 1)[1])
        body = json.dumps(self.pages[page] if page < len(self.pages) else []).encode()
        return SimpleNamespace(status_code=200, content=body, text=body.decode(),
                               json=lambda: json.loads(body))

    def close(self) -> None:
        pass


def test_portal_positions_are_paginated():
    pages = [[{"conid": i, "position": 1} for i in range(100)],
             [{"conid": 100 + i, "position": 1} for i in range(100)],
             [{"conid": 200 + i, "position": 1} for i in range(7)]]
    session = FakeSession(pages)
    client = PortalClient("https://gw/v1/api", session=session)
    got = client.positions("DU1")
    assert [p["conid"] for p in got] == list(range(207))
    assert [u.rsplit("/", 1)[1] for u in session.urls] == ["0", "1", "2"]
    assert portal_number("C123.5") == 123.5 and portal_number("28.1%") == pytest.approx(0.281)
    assert portal_number("1,234.5") == 1234.5 and portal_number("") is None
    assert portal_number(None) is None and portal_number("-0.25") == -0.25


# -- the command ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_greeks_run_once_command(gw, tmp_path, monkeypatch, capsys, mode):
    for k, v in env_for(gw, tmp_path, mode).items():
        monkeypatch.setenv(k, v)
    parser = argparse.ArgumentParser()
    add_greeks_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["greeks", "run", "--once"])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["symbol"] == "PORTFOLIO" and len(rows) == 9
    assert rows[0]["mode"] == mode
    assert stored_ticks(GreeksConfig.from_env(env_for(gw, tmp_path, mode))) == [
        datetime.fromisoformat(rows[0]["tick_time"]).timestamp()]


def test_socket_once_fails_clearly_when_the_gateway_is_down(tmp_path):
    cfg = GreeksConfig.from_env({"KTRDR_DATA_DIR": str(tmp_path), "IB_PORT": "1",
                                 "IB_API_MODE": "SOCKET"})
    with pytest.raises(BridgeUnavailable, match="cannot reach"):
        asyncio.run(run_snapshots(cfg, once=True, claims=False))
    errors = read_rows(cfg.db_path, "SELECT message FROM api_logs WHERE event = 'error'")
    assert len(errors) == 1

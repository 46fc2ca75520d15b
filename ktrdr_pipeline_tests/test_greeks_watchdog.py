"""The socket bridge's watchdog: reset window, backoff, api_logs rows (fake clock), and a
real disconnect injected into the simulator."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from ktrdr_pipeline.greeks.bridges import make_bridge
from ktrdr_pipeline.greeks.config import GreeksConfig
from ktrdr_pipeline.greeks.runner import run_snapshots
from ktrdr_pipeline.greeks.store import GreeksStore, read_rows
from ktrdr_pipeline.greeks.watchdog import Watchdog
from ktrdr_pipeline.simulator.server import GatewayThread

from .conftest import read_audit

ET = ZoneInfo("US/Eastern")
WEEKEND = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, start: datetime):
        self.t = start
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += timedelta(seconds=seconds)


class FlakyConnect:
    """Fails ``failures`` times, then connects; records the fake time of each call."""

    def __init__(self, clock: FakeClock, failures: int):
        self.clock = clock
        self.failures = failures
        self.calls: list[datetime] = []

    async def __call__(self) -> None:
        self.calls.append(self.clock.now())
        if len(self.calls) <= self.failures:
            raise ConnectionRefusedError(f"gateway down (call {len(self.calls)})")


def _store(tmp_path: Path) -> GreeksStore:
    store = GreeksStore(tmp_path / "greeks.duckdb", tmp_path / "buf.jsonl", mode="SOCKET")
    store.bootstrap()
    return store


def _logs(store: GreeksStore) -> list[dict]:
    return read_rows(store.db_path, "SELECT ts, event, attempt, delay_s, message FROM api_logs "
                                    "ORDER BY ts, rowid")


def test_backoff_5_10_20_then_20_with_log_rows(tmp_path):
    clock = FakeClock(datetime(2026, 11, 18, 12, 0, tzinfo=ET))
    store = _store(tmp_path)
    connect = FlakyConnect(clock, failures=5)
    dog = Watchdog(connect, store.log_event, clock=clock.now, sleep=clock.sleep)
    assert asyncio.run(dog.recover("disconnected")) == 6
    assert clock.sleeps == [5, 10, 20, 20, 20, 20]
    start = datetime(2026, 11, 18, 12, 0, tzinfo=ET)
    assert [(c - start).total_seconds() for c in connect.calls] == [5, 15, 35, 55, 75, 95]
    rows = _logs(store)
    attempts = [r for r in rows if r["event"] == "reconnect_attempt"]
    assert [r["attempt"] for r in attempts] == [1, 2, 3, 4, 5, 6]
    assert [r["delay_s"] for r in attempts] == [5, 10, 20, 20, 20, 20]
    assert [r["ts"] for r in attempts] == connect.calls  # logged at the fake time
    errors = [r for r in rows if r["event"] == "error"]
    assert [r["attempt"] for r in errors] == [1, 2, 3, 4, 5]
    assert "gateway down (call 1)" in errors[0]["message"]
    assert rows[-1]["event"] == "connect" and rows[-1]["attempt"] == 6


@pytest.mark.parametrize("hhmm", [(23, 40), (23, 45), (23, 59)])
def test_inside_the_reset_window_waits_until_0005_eastern(tmp_path, hhmm):
    start = datetime(2026, 11, 18, *hhmm, tzinfo=ET)
    clock = FakeClock(start)
    store = _store(tmp_path)
    connect = FlakyConnect(clock, failures=1)
    dog = Watchdog(connect, store.log_event, clock=clock.now, sleep=clock.sleep)
    asyncio.run(dog.recover())
    five_past = datetime(2026, 11, 19, 0, 5, tzinfo=ET)
    assert connect.calls[0] == five_past  # the first attempt at 00:05, not before
    assert clock.sleeps[0] == (five_past - start).total_seconds()
    assert clock.sleeps[1:] == [5]  # after the window, the normal backoff
    rows = _logs(store)
    assert [r["event"] for r in rows] == ["reset_wait", "reconnect_attempt", "error",
                                          "reconnect_attempt", "connect"]
    assert rows[0]["ts"] == start and "00:05" in rows[0]["message"]


def test_a_backoff_that_runs_into_the_window_waits_for_its_end(tmp_path):
    start = datetime(2026, 11, 18, 23, 39, 57, tzinfo=ET)
    clock = FakeClock(start)
    store = _store(tmp_path)
    connect = FlakyConnect(clock, failures=0)
    dog = Watchdog(connect, store.log_event, clock=clock.now, sleep=clock.sleep)
    asyncio.run(dog.recover())
    assert connect.calls == [datetime(2026, 11, 19, 0, 5, tzinfo=ET)]
    assert clock.sleeps[0] == 5


def test_plan_outside_and_inside_the_window():
    dog = Watchdog(FlakyConnect(FakeClock(WEEKEND), 0), lambda *a, **k: None)
    assert dog.plan(datetime(2026, 11, 18, 23, 39, 59, tzinfo=ET), 0) == ("backoff", 5.0)
    assert dog.plan(datetime(2026, 11, 18, 23, 50, tzinfo=ET), 0) == ("reset_wait", 900.0)
    assert dog.plan(datetime(2026, 11, 19, 0, 6, tzinfo=ET), 2) == ("backoff", 20.0)
    assert dog.plan(datetime(2026, 11, 19, 12, 0, tzinfo=ET), 9) == ("backoff", 20.0)
    # US/Eastern, not UTC: 23:45 UTC is 18:45 ET
    assert dog.plan(datetime(2026, 11, 18, 23, 45, tzinfo=UTC), 1) == ("backoff", 10.0)


# -- a real disconnect ---------------------------------------------------------------------------
class CountingStore(GreeksStore):
    """Records the tick of every snapshot it stores (no need to read the file meanwhile)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticks: list[float] = []

    def write_snapshot(self, snapshot):
        self.ticks.append(snapshot.tick_time.timestamp())
        return super().write_snapshot(snapshot)


@pytest.mark.slow
def test_a_simulator_disconnect_is_recovered(tmp_path):
    audit = tmp_path / "audit.jsonl"
    with GatewayThread(clock=WEEKEND, latency="none", tick_interval=0.2, audit_log=audit) as gw:
        cfg = GreeksConfig.from_env({"KTRDR_DATA_DIR": str(tmp_path), "IB_PORT": str(gw.port),
                                     "IB_API_MODE": "SOCKET", "BRIDGE_POLL_INTERVAL": "1"})
        store = CountingStore(cfg.db_path, cfg.buffer_path, mode="SOCKET")
        store.bootstrap()

        async def scenario():
            stop = asyncio.Event()
            task = asyncio.create_task(run_snapshots(cfg, stop=stop, store=store))
            await _wait_for(lambda: len(store.ticks) >= 2, 10)
            cut = time.time()
            assert await asyncio.to_thread(gw.disconnect_all) == 1
            await _wait_for(lambda: sum(t > cut + 1 for t in store.ticks) >= 2, 20)
            stop.set()
            return await task, cut

        (stats, _), cut = asyncio.run(scenario())
    logs = read_rows(cfg.db_path, "SELECT event, attempt, delay_s FROM api_logs ORDER BY ts")
    events = [r["event"] for r in logs]
    assert events[:1] == ["connect"]
    i = events.index("disconnect")
    assert events[i:i + 3] == ["disconnect", "reconnect_attempt", "connect"]
    assert logs[i + 1]["attempt"] == 1 and logs[i + 1]["delay_s"] == 5.0
    assert stats.snapshots >= 4 and stats.failed >= 3  # the ticks of the 5 s backoff
    got = read_rows(cfg.db_path, "SELECT tick_time FROM portfolio_greeks WHERE con_id = 0 "
                                 "ORDER BY rowid")
    times = [r["tick_time"].timestamp() for r in got]
    assert times == store.ticks and times == sorted(times) and len(set(times)) == len(times)
    assert any(t > cut + 5 for t in times)  # snapshots again after the reconnect
    starts = [e for e in read_audit(audit) if e.get("message") == "startApi"]
    assert len(starts) == 2


async def _wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


@pytest.mark.slow
def test_a_reset_that_closes_the_socket_leaves_no_unretrieved_future(tmp_path, caplog,
                                                                     monkeypatch):
    """After a reset ending in 1102, ib_async re-requests the account summary (which the
    simulator, made a slow gateway here, leaves unanswered); a later reset ending in a
    close fails that request. The bridge retrieves it: no "Future exception was never
    retrieved" (asyncio logs it at ERROR when the failed future is collected)."""
    from ktrdr_pipeline.simulator.session import ClientSession

    # the simulator answers reqAccountSummary (issue 12); a slow gateway does not yet
    monkeypatch.setitem(ClientSession.HANDLERS, 62, lambda session, fields: None)
    with GatewayThread(clock=WEEKEND, latency="none", tick_interval=0.2) as gw:
        cfg = GreeksConfig.from_env({"KTRDR_DATA_DIR": str(tmp_path), "IB_PORT": str(gw.port),
                                     "IB_API_MODE": "SOCKET", "BRIDGE_POLL_INTERVAL": "1",
                                     "KTRDR_RESET_WINDOW": "off"})
        store = CountingStore(cfg.db_path, cfg.buffer_path, mode="SOCKET")
        store.bootstrap()
        bridge = make_bridge(cfg, store, backoff=(0.1,))

        async def scenario():
            stop = asyncio.Event()
            task = asyncio.create_task(run_snapshots(cfg, stop=stop, store=store,
                                                     bridge=bridge))
            await _wait_for(lambda: len(store.ticks) >= 1, 10)
            restored = bridge.ib.wrapper._futures.copy()
            await asyncio.to_thread(lambda: gw.reset(0.2, "1102").result(10))
            # the account summary re-request is pending (the simulator does not answer it)
            await _wait_for(lambda: len(bridge.ib.wrapper._futures) > len(restored), 10)
            cut = time.time()
            await asyncio.to_thread(lambda: gw.reset(0.2, "close").result(10))
            await _wait_for(lambda: sum(t > cut for t in store.ticks) >= 1, 20)  # reconnected
            gc.collect()  # an unretrieved failed future is reported when it is collected
            stop.set()
            return await task

        with caplog.at_level(logging.DEBUG):
            stats, _ = asyncio.run(scenario())
            gc.collect()
    assert stats.snapshots >= 2
    logs = read_rows(cfg.db_path, "SELECT event FROM api_logs ORDER BY ts")
    assert "disconnect" in [r["event"] for r in logs]  # the close did happen
    assert "account summary request ended: ConnectionError('Socket disconnect')" in caplog.text
    assert "never retrieved" not in caplog.text
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]

"""Takes snapshots on a wall-clock grid and stores them.

Poll ticks are the multiples of ``BRIDGE_POLL_INTERVAL`` seconds since the epoch (every
:00, :05, :10... for 5 s). Before each tick the runner computes the delay from the wall
clock and sleeps until the tick, so lateness never accumulates. When the runner wakes up
more than ``max_late`` after a tick (default the smaller of 1 s and half the interval: a
snapshot overran, the machine was suspended), it skips to the next tick (the skipped ones
are counted as missed) rather than taking stale ticks late or in a burst.

Several processes may share a data directory (a scheduled run overlapping the next one, a
standing ``ktrdr-pipeline greeks run``): each tick is *claimed* in
``KTRDR_DATA_DIR/greeks_ticks.claim`` under an exclusive lock and taken by the first
process that claims it, so a tick costs IB one snapshot; the snapshot id (account + tick)
makes a tick stored once even if it were taken twice. A process claims a tick only while
its bridge is connected, so a run that is still connecting leaves the tick to one that is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..locking import exclusive_file_lock
from .bridges import Bridge, BridgeUnavailable, make_bridge
from .config import GreeksConfig
from .model import Snapshot
from .store import GreeksStore

log = logging.getLogger(__name__)

#: A claim this far ahead of a tick is stale (a clock set back), not a live claim.
_STALE_CLAIM_S = 3600.0


def next_tick(now_ts: float, interval: float) -> float:
    """The first grid tick at or after ``now_ts`` (epoch seconds)."""
    k = math.ceil(now_ts / interval - 1e-9)
    return k * interval


class TickClaims:
    """The newest tick any process has taken, in a small file under an exclusive lock."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def claim(self, tick_ts: float) -> bool:
        """True if this process may take ``tick_ts`` (nobody has taken it or a later tick)."""
        with exclusive_file_lock(self.path) as fd:
            raw = os.pread(fd, 64, 0).decode(errors="replace").strip()
            try:
                last = float(raw) if raw else float("-inf")
            except ValueError:
                last = float("-inf")
            if last >= tick_ts - 1e-6 and last - tick_ts < _STALE_CLAIM_S:
                return False
            data = repr(float(tick_ts)).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            return True


@dataclass
class RunStats:
    """What a run did; ``drifts`` are snapshot time minus tick time, in seconds."""

    ticks: int = 0
    written: int = 0
    buffered: int = 0
    failed: int = 0
    missed: int = 0
    taken_elsewhere: int = 0
    drifts: list[float] = field(default_factory=list)
    first_tick: datetime | None = None
    last_tick: datetime | None = None

    @property
    def snapshots(self) -> int:
        return self.written + self.buffered

    def count_tick(self, tick: datetime) -> None:
        """A tick the run tried to take (taken, failed or taken by another process)."""
        self.ticks += 1
        self.first_tick = self.first_tick or tick
        self.last_tick = tick

    @property
    def max_drift_s(self) -> float:
        return max(self.drifts, default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks, "snapshots": self.snapshots, "written": self.written,
            "buffered": self.buffered, "failed": self.failed, "missed": self.missed,
            "taken_elsewhere": self.taken_elsewhere,
            "max_drift_s": round(self.max_drift_s, 4),
            "first_tick": self.first_tick.isoformat() if self.first_tick else None,
            "last_tick": self.last_tick.isoformat() if self.last_tick else None,
        }


class SnapshotRunner:
    """Snapshots every ``interval`` seconds on the wall-clock grid."""

    def __init__(
        self,
        bridge: Bridge,
        store: GreeksStore,
        interval: float,
        *,
        claims: TickClaims | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        max_late: float | None = None,
    ):
        if not interval > 0:
            raise ValueError("the poll interval must be > 0")
        #: a tick is skipped when the runner wakes up later than this after it
        self.max_late = min(1.0, interval / 2) if max_late is None else max_late
        self.bridge = bridge
        self.store = store
        self.interval = interval
        self.claims = claims
        self.clock = clock
        self.sleep = sleep
        self.last_failure = ""

    async def _sleep_until(self, ts: float, stop: asyncio.Event | None) -> bool:
        """Sleep until wall-clock ``ts``; False if ``stop`` was set meanwhile."""
        while True:
            if stop is not None and stop.is_set():
                return False
            delay = ts - self.clock()
            if delay <= 0:
                return True
            if stop is None:
                await self.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def take(self, tick_ts: float, stats: RunStats) -> Snapshot | None:
        """One snapshot for tick ``tick_ts``, stored; None when IB could not answer."""
        tick = datetime.fromtimestamp(tick_ts, UTC)
        try:
            snap = await self.bridge.snapshot(tick)
        except BridgeUnavailable as exc:
            stats.failed += 1
            if str(exc) != self.last_failure:
                log.warning("no snapshot at %s: %s", tick.isoformat(), exc)
            self.last_failure = str(exc)
            return None
        except Exception as exc:
            stats.failed += 1
            log.exception("snapshot at %s failed", tick.isoformat())
            self.last_failure = f"{type(exc).__name__}: {exc}"
            return None
        self.last_failure = ""
        outcome = self.store.write_snapshot(snap)
        if outcome == "written":
            stats.written += 1
        else:
            stats.buffered += 1
        stats.drifts.append((snap.snapshot_time - tick).total_seconds())
        log.debug("snapshot %s %s: %s", snap.snapshot_id, outcome, dict(snap.summary()))
        return snap

    async def once(self, stats: RunStats | None = None) -> Snapshot | None:
        """One snapshot now (its tick time is now, off the grid); no claim. It counts as
        the run's one tick in ``stats``."""
        stats = stats if stats is not None else RunStats()
        tick_ts = self.clock()
        stats.count_tick(datetime.fromtimestamp(tick_ts, UTC))
        return await self.take(tick_ts, stats)

    async def run(self, until: datetime | None = None,
                  stop: asyncio.Event | None = None) -> RunStats:
        """Snapshots at every grid tick before ``until`` (forever when None) or until
        ``stop`` is set."""
        stats = RunStats()
        until_ts = until.timestamp() if until is not None else math.inf
        tick = next_tick(self.clock(), self.interval)
        while tick < until_ts:
            if not await self._sleep_until(tick, stop):
                break
            now = self.clock()
            if now - tick > self.max_late:  # overran: skip to the next tick, never burst
                following = next_tick(now, self.interval)
                skipped = round((following - tick) / self.interval)
                stats.missed += skipped
                log.warning("%d poll tick(s) skipped: the runner was %.2f s late", skipped,
                            now - tick)
                tick = following
                continue
            stats.count_tick(datetime.fromtimestamp(tick, UTC))
            if not self.bridge.available:
                stats.failed += 1
            elif self.claims is not None and not self.claims.claim(tick):
                stats.taken_elsewhere += 1
            else:
                await self.take(tick, stats)
            self.store.flush_if_due()
            tick += self.interval
        return stats


def open_store(config: GreeksConfig) -> GreeksStore:
    """The store for ``config``, with its schema created (idempotent)."""
    store = GreeksStore(config.db_path, config.buffer_path,
                        flush_interval=config.flush_interval, mode=config.mode)
    store.bootstrap()
    return store


def default_greeks_timeout(config: GreeksConfig) -> float:
    """How long a snapshot waits for missing Greeks: 3 s, less for short intervals."""
    return max(0.2, min(3.0, 0.6 * config.poll_interval))


async def run_snapshots(
    config: GreeksConfig,
    *,
    until: datetime | None = None,
    once: bool = False,
    stop: asyncio.Event | None = None,
    store: GreeksStore | None = None,
    bridge: Bridge | None = None,
    claims: bool = True,
    connect_wait: float = 10.0,
) -> tuple[RunStats, Snapshot | None]:
    """Start the bridge ``config.mode`` selects, take snapshots (until ``until``, for
    ever, or ``once``), stop. Returns the run's statistics and the last snapshot of a
    ``once`` run."""
    store = store or open_store(config)
    if bridge is None:
        kwargs = {"greeks_timeout": default_greeks_timeout(config)}
        if once and config.mode == "SOCKET":
            kwargs["keep_trying"] = False
        bridge = make_bridge(config, store, **kwargs)
    runner = SnapshotRunner(bridge, store, config.poll_interval,
                            claims=TickClaims(config.claims_path) if claims else None)
    log.info("Greeks bridge %s: %s, every %g s into %s", config.mode,
             "one snapshot" if once else f"until {until.isoformat()}" if until else "for ever",
             config.poll_interval, config.db_path)
    stats = RunStats()
    snap = None
    try:
        await bridge.start()
        if once:
            if not bridge.available and hasattr(bridge, "wait_connected"):
                await bridge.wait_connected(connect_wait)
            snap = await runner.once(stats)
            if snap is None:
                raise BridgeUnavailable(runner.last_failure or "no snapshot could be taken")
        else:
            stats = await runner.run(until=until, stop=stop)
    finally:
        with contextlib.suppress(Exception):
            await bridge.close()
        store.flush()
        pending = store.buffer.size()
        if pending:
            log.warning("%s still holds buffered rows (the database is unavailable); the "
                        "next run writes them", store.buffer.path)
    log.info("Greeks bridge %s done: %s", config.mode, stats.as_dict())
    return stats, snap

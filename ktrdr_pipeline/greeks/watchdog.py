"""Reconnects the socket bridge after a disconnect, minding IB's nightly reset.

Before each reconnect attempt the watchdog waits: until the reset window is over when
the attempt would fall inside it (``KTRDR_RESET_WINDOW``, default 23:40-00:05 US/Eastern:
a disconnect at 23:40-23:59 waits until 00:05, then tries at once), otherwise 5, 10, 20 s,
then 20 s for every further attempt. Every wait, attempt, failure and the final reconnect is a row in
``api_logs``. The clock and the sleep are injectable, so tests run the whole sequence on a
fake clock in no time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from ..domain.reset_window import ResetWindow

log = logging.getLogger(__name__)

BACKOFF_S: tuple[float, ...] = (5.0, 10.0, 20.0)
DEFAULT_WINDOW = ResetWindow()  # KTRDR_RESET_WINDOW's default

#: ``log_event(event, *, message, attempt, delay_s, code, ts)``; e.g.
#: :meth:`~ktrdr_pipeline.greeks.store.GreeksStore.log_event`.
EventLog = Callable[..., object]


class Watchdog:
    """Brings a connection back: ``await watchdog.recover()`` returns once ``connect()``
    succeeded; it retries for ever (a bridge without IB has nothing better to do)."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[object]],
        log_event: EventLog,
        *,
        window: ResetWindow = DEFAULT_WINDOW,
        backoff: Sequence[float] = BACKOFF_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ):
        if not backoff:
            raise ValueError("backoff needs at least one delay")
        self.connect = connect
        self.log_event = log_event
        self.window = window
        self.backoff = tuple(float(b) for b in backoff)
        self.clock = clock
        self.sleep = sleep
        self.attempts = 0  # over the watchdog's life

    def backoff_delay(self, steps: int) -> float:
        """The backoff wait after ``steps`` earlier backoff waits: 5, 10, 20, 20... s."""
        return self.backoff[min(steps, len(self.backoff) - 1)]

    def plan(self, now: datetime, steps: int) -> tuple[str, float]:
        """What to do before the next attempt: ``("reset_wait", seconds)`` inside the reset
        window (until it ends), else ``("backoff", seconds)`` after ``steps`` earlier
        backoff waits."""
        if self.window.contains(now):
            until = self.window.ends_after(now)
            return "reset_wait", max((until - now).total_seconds(), 0.0)
        return "backoff", self.backoff_delay(steps)

    def _log(self, event: str, **fields: object) -> None:
        try:
            self.log_event(event, ts=self.clock(), **fields)
        except Exception:  # logging must never stop a reconnect
            log.exception("cannot record watchdog event %s", event)

    async def recover(self, reason: str = "") -> int:
        """Reconnect; returns the number of attempts it took."""
        failures = 0
        steps = 0  # backoff waits so far: 5, 10, 20, 20... s
        while True:
            kind, delay = self.plan(self.clock(), steps)
            if kind == "reset_wait":
                until = self.window.ends_after(self.clock())
                local = f"{until.astimezone(ZoneInfo(self.window.tz)):%H:%M} {self.window.tz}"
                log.info("disconnected inside IB's reset window; waiting %.0f s until %s",
                         delay, local)
                self._log("reset_wait", delay_s=delay,
                          message=f"inside IB's reset window; waiting until {local} "
                                  f"({until.isoformat()})")
                await self.sleep(delay)
            else:
                steps += 1
                await self.sleep(delay)
                if self.window.contains(self.clock()):
                    continue  # the wait ran into the reset window: wait for its end
            self.attempts += 1
            attempt = failures + 1
            log.info("reconnect attempt %d (after waiting %.0f s)", attempt, delay)
            self._log("reconnect_attempt", attempt=attempt, delay_s=delay,
                      message=reason or None)
            try:
                await self.connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("reconnect attempt %d failed: %s", attempt, exc)
                self._log("error", attempt=attempt, message=f"reconnect failed: {exc}")
                continue
            log.info("reconnected after %d attempt(s)", attempt)
            self._log("connect", attempt=attempt, message="reconnected")
            return attempt

"""The simulator's market clock."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class SimClock:
    """The market's current time: starts at ``start`` (default: real time) and advances
    in real time. Pacing and latency never use this clock, only real elapsed time."""

    def __init__(self, start: datetime | None = None):
        if start is not None and start.tzinfo is None:
            raise ValueError("the simulator clock needs a timezone-aware start time")
        self._start = start
        self._mono0 = time.monotonic()

    def now(self) -> datetime:
        if self._start is None:
            return datetime.now(UTC)
        return (self._start + timedelta(seconds=time.monotonic() - self._mono0)).astimezone(UTC)

    def shift(self, seconds: float) -> None:
        """Move the market clock (tests only); real-time pacing is unaffected."""
        self._start = self.now() + timedelta(seconds=seconds)
        self._mono0 = time.monotonic()

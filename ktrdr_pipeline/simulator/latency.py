"""How long the simulator takes to answer: IB's historical data farm, or nothing at all."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyModel:
    """How long answers take. ``realistic`` approximates IB's historical data farm:

    - every historical answer waits ``base_s`` plus ``per_bar_s`` per bar returned;
    - bars of 1 min and larger pass a soft throttle: at most ``concurrent_large``
      requests are served at once, the rest queue (IB's "soft" pacing);
    - contract details and head timestamps wait ``lookup_s``.
    """

    base_s: float = 0.0
    per_bar_s: float = 0.0
    lookup_s: float = 0.0
    concurrent_large: int = 0  # 0 = no throttle

    @classmethod
    def named(cls, name: str) -> LatencyModel:
        if name == "none":
            return cls()
        if name == "realistic":
            return cls(base_s=0.25, per_bar_s=0.0001, lookup_s=0.05, concurrent_large=4)
        raise ValueError(f"unknown latency model {name!r}; allowed: realistic, none")

    def bars_delay(self, bars: int) -> float:
        """Seconds before a historical answer of ``bars`` bars goes out."""
        return self.base_s + self.per_bar_s * bars

    def throttle(self) -> asyncio.Semaphore | None:
        """The soft throttle of large-bar requests (None: no throttle); create it on the
        loop that serves the requests."""
        return asyncio.Semaphore(self.concurrent_large) if self.concurrent_large else None


async def delay(seconds: float) -> None:
    """Sleep ``seconds`` (no yield at all for zero, so ``latency none`` answers at once)."""
    if seconds > 0:
        await asyncio.sleep(seconds)

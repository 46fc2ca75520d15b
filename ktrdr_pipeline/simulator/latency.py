"""How long the simulator takes to answer: IB's historical data farm, or nothing at all.

The ``realistic`` model's numbers come from answer times users of real gateways published
(``docs/ib-facts.md`` §2 cites the first two):

=================================================  =========  ==================  ==========
report                                             bars       measured            model
=================================================  =========  ==================  ==========
ib_async #140 (2025, DEBUG log): 8 D of daily      8          0.20 s              0.25 s
ib_insync #268 (2020): 1 D of 15-min bars          26         0.28 s              0.25 s
ib_insync #268: 1 D of 1-min bars                  390        0.59 s              0.29 s
LEAN IB brokerage PR #62 (2023): minute history,   ~2,700     ~0.8 s per request  0.56 s
  17,970 bars in 5.37 s (LEAN asks ≤ 7 D a time)
scmhub/ibsync #26 (2026, IBKR API log): 30 days    ~2,300     ≤ 0.3 s             0.51 s
  of 5-min bars
ib_insync #268: 5 D of 1-min bars, busy day        1,950      8.31 s              0.46 s
ib_insync #268: 6 D of 1-min bars, same busy day   2,340      > 60 s (timeout)    0.51 s
ib_insync #490 (2022): 3 months of 1-min bars      ~24,500    answered            5.7 s
ib_insync #490: 2 years of 1-min bars              ~197,000   connection closed   ~210 s
=================================================  =========  ==================  ==========

So on a normal day an answer costs about a quarter of a second plus a fraction of a
millisecond per bar, and IB serves several thousand bars in about a second; a very large
answer slows down more than in proportion (a year of 1-min bars in one request answers
near ib_async's default 60 s timeout, two years not at all). The model:
``delay = base_s + per_bar_s × bars × (1 + bars / congestion_bars)`` with 250 ms,
0.1 ms and 20,000 bars. Busy days at IB are far slower (#268's 5 D took 8 s); the
simulator models the normal day and leaves the rest to injected faults (stalls).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyModel:
    """How long answers take. ``realistic`` approximates IB's historical data farm:

    - every historical answer waits ``base_s`` plus ``per_bar_s`` per bar returned, that
      per-bar cost growing with the answer's size (``1 + bars / congestion_bars``) so that
      a huge request is slow as at IB (numbers and sources: the module docstring);
    - bars of 1 min and larger pass a soft throttle: at most ``concurrent_large``
      requests are served at once, the rest queue (IB's "soft" pacing);
    - contract details and head timestamps wait ``lookup_s``.
    """

    base_s: float = 0.0
    per_bar_s: float = 0.0
    congestion_bars: int = 0  # 0 = the per-bar cost does not grow with the answer's size
    lookup_s: float = 0.0
    concurrent_large: int = 0  # 0 = no throttle

    @classmethod
    def named(cls, name: str) -> LatencyModel:
        if name == "none":
            return cls()
        if name == "realistic":
            return cls(base_s=0.25, per_bar_s=0.0001, congestion_bars=20_000, lookup_s=0.05,
                       concurrent_large=4)
        raise ValueError(f"unknown latency model {name!r}; allowed: realistic, none")

    def bars_delay(self, bars: int) -> float:
        """Seconds before a historical answer of ``bars`` bars goes out."""
        growth = 1.0 + bars / self.congestion_bars if self.congestion_bars else 1.0
        return self.base_s + self.per_bar_s * bars * growth

    def throttle(self) -> asyncio.Semaphore | None:
        """The soft throttle of large-bar requests (None: no throttle); create it on the
        loop that serves the requests."""
        return asyncio.Semaphore(self.concurrent_large) if self.concurrent_large else None


async def delay(seconds: float) -> None:
    """Sleep ``seconds`` (no yield at all for zero, so ``latency none`` answers at once)."""
    if seconds > 0:
        await asyncio.sleep(seconds)

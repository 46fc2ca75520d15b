"""Pure evaluation of IB's hard pacing rules (``docs/ib-facts.md`` §1).

One implementation serves both sides: the gateway simulator asks :meth:`PacingWindow.violation`
to decide whether to answer 162, and the client's governor asks
:meth:`PacingWindow.next_allowed` how long to wait so that it never provokes one.
Times are plain floats in seconds (monotonic or epoch: the caller picks, consistently).

An event at ``at`` is inside a window of length ``w`` at time ``t`` while ``t < at + w``. Every
rule and bound below uses exactly that comparison (never ``t - at < w``): floating-point
subtraction can round ``(at + w) - at`` below ``w``, which used to make a request sent at the
time :meth:`PacingWindow.next_allowed` returned still count as a violation.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .ib_rules import BID_ASK, PacingLimits


@dataclass(frozen=True)
class PacedRequest:
    """What the pacing rules look at in one request.

    ``identity`` covers contract, end, duration, bar size, whatToShow and useRTH;
    ``tick_key`` covers contract + exchange + whatToShow.
    """

    identity: str
    tick_key: str
    weight: int = 1  # 2 for BID_ASK


def _weight(what_to_show: str) -> int:
    """BID_ASK counts twice in every pacing rule (``docs/ib-facts.md`` §1)."""
    return PacingLimits.bid_ask_weight if what_to_show.upper() == BID_ASK else 1


def _tick_key(contract_key: str, exchange: str, what_to_show: str) -> str:
    return f"{contract_key}|{exchange.upper()}|{what_to_show.upper()}"


def bars_pacing_key(
    contract_key: str,
    exchange: str,
    end: str,
    duration: str,
    bar_size: str,
    what_to_show: str,
    use_rth: bool,
) -> PacedRequest:
    """The pacing key of a historical bars request (BID_ASK weighs 2).

    The only builder of it: the client's governor and the simulator's rules both call it.
    ``contract_key`` must identify the contract uniquely (e.g. the conId); ``end`` is the
    endDateTime string exactly as sent. Only bars of 30 secs or less are under the hard
    rules: for larger bars the governor takes ``None`` instead.
    """
    identity = "|".join(
        ("bars", contract_key, exchange.upper(), end, duration, bar_size, what_to_show.upper())
        + (str(int(use_rth)),)
    )
    return PacedRequest(
        identity, _tick_key(contract_key, exchange, what_to_show), _weight(what_to_show)
    )


def head_timestamp_pacing_key(
    contract_key: str, exchange: str, what_to_show: str, use_rth: bool
) -> PacedRequest:
    """The pacing key of a ``reqHeadTimeStamp``: IB paces it like a small-bar request
    (``docs/ib-facts.md`` §1), BID_ASK counting twice as for bars."""
    identity = "|".join(
        ("head", contract_key, exchange.upper(), what_to_show.upper(), str(int(use_rth)))
    )
    return PacedRequest(
        identity, _tick_key(contract_key, exchange, what_to_show), _weight(what_to_show)
    )


@dataclass(frozen=True)
class PacingEvent:
    at: float
    identity: str
    tick_key: str
    weight: int


class PacingWindow:
    """The recent history of paced requests and the rules over it."""

    def __init__(self, limits: PacingLimits | None = None, events: Iterable[PacingEvent] = ()):
        self.limits = limits or PacingLimits()
        self._events: deque[PacingEvent] = deque(sorted(events, key=lambda e: e.at))

    @property
    def events(self) -> list[PacingEvent]:
        return list(self._events)

    def prune(self, now: float) -> None:
        """Forget events that no window reaches any more at ``now`` or later."""
        lim = self.limits
        horizon = max(lim.global_window, lim.identical_window, lim.same_contract_window)
        while self._events and not _inside(self._events[0].at, horizon, now):
            self._events.popleft()

    def record(self, request: PacedRequest, now: float) -> None:
        event = PacingEvent(now, request.identity, request.tick_key, request.weight)
        if self._events and now < self._events[-1].at:
            # Out of order (e.g. events merged from several clients): keep the deque sorted,
            # which prune() and _bound() rely on.
            at = [e.at for e in self._events]
            self._events.insert(bisect.bisect_right(at, now), event)
        else:
            self._events.append(event)
        self.prune(now)

    def violation(self, request: PacedRequest, now: float) -> str | None:
        """Which rule sending ``request`` at ``now`` would break, or None."""
        lim = self.limits
        global_weight = 0
        tick_weight = 0
        for e in self._events:
            if _inside(e.at, lim.global_window, now):
                global_weight += e.weight
            if e.tick_key == request.tick_key and _inside(e.at, lim.same_contract_window, now):
                tick_weight += e.weight
            if e.identity == request.identity and _inside(e.at, lim.identical_window, now):
                return f"identical request within {lim.identical_window:.3g} s"
        if tick_weight + request.weight > lim.same_contract_max:
            return (
                "6 or more requests for one contract and tick type within "
                f"{lim.same_contract_window:.3g} s"
            )
        if global_weight + request.weight > lim.global_max:
            return f"more than {lim.global_max} requests within {lim.global_window:.3g} s"
        return None

    def next_allowed(self, request: PacedRequest, now: float) -> float:
        """The earliest time ≥ ``now`` at which ``request`` breaks no rule.

        Raises ValueError for a request heavier than a rule's whole budget (it can never go).
        """
        lim = self.limits
        if request.weight > min(lim.same_contract_max, lim.global_max):
            raise ValueError(
                f"request weight {request.weight} exceeds the pacing budget "
                f"({lim.same_contract_max} per contract, {lim.global_max} in total)"
            )
        t = now
        # Each rule yields a lower bound; the bounds only move forward, so iterate to a fixpoint.
        for _ in range(len(self._events) + 3):
            start = t
            for e in self._events:
                if e.identity == request.identity and _inside(e.at, lim.identical_window, t):
                    t = max(t, e.at + lim.identical_window)
            t = max(
                t,
                self._bound(
                    request.weight,
                    lim.same_contract_max,
                    lim.same_contract_window,
                    [e for e in self._events if e.tick_key == request.tick_key],
                    t,
                ),
            )
            t = max(
                t,
                self._bound(
                    request.weight, lim.global_max, lim.global_window, list(self._events), t
                ),
            )
            if t == start:
                return t
        return t

    @staticmethod
    def _bound(weight: int, cap: int, window: float, events: list[PacingEvent], t: float) -> float:
        """Earliest time ≥ t at which the weight inside ``window`` leaves room for ``weight``."""
        inside = [e for e in events if _inside(e.at, window, t)]
        total = sum(e.weight for e in inside)
        if total + weight <= cap:
            return t
        # Drop the oldest events until there is room; the window must slide past the last dropped.
        excess = total + weight - cap
        for e in inside:  # events are kept in time order
            excess -= e.weight
            if excess <= 0:
                return e.at + window
        return t  # unreachable when weight <= cap


def _inside(at: float, window: float, t: float) -> bool:
    """Whether an event at ``at`` still counts in a window of length ``window`` at time ``t``."""
    return t < at + window

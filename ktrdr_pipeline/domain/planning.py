"""Plan IB historical-data requests: which requests cover a range's trading hours.

Pure functions only (no I/O, no IB): given an hours profile, a bar size and a UTC range,
:func:`plan_requests` returns the fewest :class:`HistoricalRequest` objects whose spans
cover every trading second of the range, each within this project's maximum duration per
request (``ib_rules.MAX_DURATION``); :func:`plan_ranges` does the same for several
ranges, sharing requests between nearby ones. :func:`trading_intervals` gives the trading
time a plan must cover (gap analysis works on the bar grid:
:mod:`ktrdr_pipeline.domain.gaps`).

Semantics of one IB request (``docs/ib-facts.md`` §2): it returns the bars whose start
``t`` satisfies ``end - span <= t < end``, where ``span`` is the duration's wall-clock
length (``ib_rules.DURATION_UNIT_SECONDS``). Bar timestamps are whole seconds, so all the
arithmetic here is done in integer epoch seconds; a bound with a fractional second is
rounded *up*, which keeps exactly the same whole-second bar starts inside ``[start, end)``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from . import grid, ib_rules
from .calendars import SCHEDULE_START, HoursProfile, resolve_profile, schedule
from .ib_rules import (
    BAR_SIZE_SECONDS,
    MAX_DURATION,
    SMALL_BAR_HISTORY,
    duration_for,
    is_daily_or_larger,
    is_small_bar,
    parse_duration,
)

logger = logging.getLogger(__name__)

#: Every ``whatToShow`` value the planner accepts.
WHAT_TO_SHOW = ib_rules.WHAT_TO_SHOW

#: What IB serves for forex (§2: FX TRADES answers 162 "no data").
_FX_WHAT_TO_SHOW = frozenset({"MIDPOINT", "BID", "ASK", "BID_ASK"})

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)

Interval = tuple[datetime, datetime]


# --- conversions -------------------------------------------------------------------------


def _require_aware(name: str, t: datetime) -> None:
    if not isinstance(t, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(t).__name__}")
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(
            f"{name}={t!r} is a naive datetime: pass timezone-aware datetimes (UTC inside)"
        )


def _ceil_seconds(t: datetime) -> int:
    """Epoch seconds of ``t``, rounded up (exact integer arithmetic, no float)."""
    seconds, rest = divmod(t - _EPOCH, _SECOND)
    return int(seconds) + (1 if rest else 0)


def _utc(seconds: int) -> datetime:
    return _EPOCH + timedelta(seconds=int(seconds))




# --- the request -------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoricalRequest:
    """One ``reqHistoricalData`` call.

    ``start`` is informational (``end`` minus the duration's span: where IB's answer
    begins). ``covers`` is the trading time this request is responsible for; across a plan
    the ``covers`` ranges do not overlap and together hold all the planned trading time
    (they may contain closed hours between sessions). Both default from ``end`` and
    ``duration`` when the request is built by hand.
    """

    end: datetime
    duration: str
    bar_size: str
    what_to_show: str
    use_rth: bool
    start: datetime = None  # type: ignore[assignment]  # filled in __post_init__
    covers: Interval = None  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        _require_aware("end", self.end)
        _check_bar_size(self.bar_size)
        _check_what_to_show(self.what_to_show)
        span = parse_duration(self.duration).span  # DurationError is a ValueError
        object.__setattr__(self, "end", self.end.astimezone(UTC))
        if self.start is None:
            object.__setattr__(self, "start", self.end - span)
        else:
            _require_aware("start", self.start)
            object.__setattr__(self, "start", self.start.astimezone(UTC))
        if self.covers is None:
            object.__setattr__(self, "covers", (self.start, self.end))
        else:
            lo, hi = self.covers
            _require_aware("covers[0]", lo)
            _require_aware("covers[1]", hi)
            object.__setattr__(self, "covers", (lo.astimezone(UTC), hi.astimezone(UTC)))

    @property
    def span(self) -> timedelta:
        """The wall-clock length of ``duration``."""
        return parse_duration(self.duration).span

    def ib_end_string(self) -> str:
        """``endDateTime`` in IB's UTC form ``YYYYMMDD-HH:MM:SS``.

        Seconds are truncated; the planner only produces whole-second ends.
        """
        return self.end.strftime("%Y%m%d-%H:%M:%S")


# --- validation --------------------------------------------------------------------------


def _check_bar_size(bar_size: str) -> None:
    if bar_size not in BAR_SIZE_SECONDS:
        raise ValueError(
            f"unknown bar size {bar_size!r}; allowed: {', '.join(map(repr, BAR_SIZE_SECONDS))}"
        )


def _check_what_to_show(what_to_show: str) -> None:
    if what_to_show not in WHAT_TO_SHOW:
        raise ValueError(f"unknown whatToShow {what_to_show!r}; allowed: {', '.join(WHAT_TO_SHOW)}")


# --- trading intervals -------------------------------------------------------------------


def _clamp_bounds(
    start: datetime, end: datetime, head_timestamp: datetime | None, now: datetime | None
) -> tuple[int, int]:
    _require_aware("start", start)
    _require_aware("end", end)
    lo, hi = _ceil_seconds(start), _ceil_seconds(end)
    if head_timestamp is not None:
        _require_aware("head_timestamp", head_timestamp)
        lo = max(lo, _ceil_seconds(head_timestamp))
    if now is not None:
        _require_aware("now", now)
        hi = min(hi, _ceil_seconds(now))
    return lo, hi


def _sessions(
    profile: HoursProfile, lo: int, hi: int, use_rth: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label dates, opens and closes (epoch s, unclipped) of the sessions overlapping [lo, hi)."""
    sch = schedule(profile.name)
    opens, closes = sch.bounds(use_rth)
    if lo < hi:
        first_open, last_close = int(opens[0]), int(closes[-1])
        if lo < first_open or hi > last_close:
            logger.warning(
                "range %s..%s reaches outside the %s schedule (%s..%s): no sessions there",
                _utc(lo),
                _utc(hi),
                profile.name,
                SCHEDULE_START,
                _utc(last_close),
            )
    i = int(np.searchsorted(closes, lo, side="right"))
    j = max(i, int(np.searchsorted(opens, hi, side="left")))
    o, c, d = opens[i:j], closes[i:j], sch.dates[i:j]
    keep = c > o  # e.g. futures liquid hours cut away by an early close
    return d[keep], o[keep], c[keep]


def _trading_arrays(
    profile: HoursProfile, lo: int, hi: int, use_rth: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Merged trading intervals clipped to [lo, hi), as epoch-second arrays."""
    if lo >= hi:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    _, o, c = _sessions(profile, lo, hi, use_rth)
    o = np.maximum(o, lo)
    c = np.minimum(c, hi)
    keep = c > o
    o, c = o[keep], c[keep]
    if o.size == 0:
        return o, c
    # Sessions that abut (24/5 FX days, Globex evenings) merge into one interval.
    new_group = np.ones(o.size, dtype=bool)
    new_group[1:] = o[1:] > c[:-1]
    starts = o[new_group]
    last_of_group = np.append(np.flatnonzero(new_group)[1:] - 1, o.size - 1)
    return starts.astype(np.int64), c[last_of_group].astype(np.int64)


def trading_intervals(
    profile: HoursProfile | str,
    start: datetime,
    end: datetime,
    use_rth: bool,
    head_timestamp: datetime | None = None,
    now: datetime | None = None,
) -> list[Interval]:
    """The profile's trading time inside [start, end), as sorted, disjoint UTC intervals.

    Sessions are clipped to ``[max(start, head_timestamp), min(end, now))``; sessions that
    touch (close == next open) are merged into one interval. ``use_rth`` picks regular
    or all hours.
    """
    lo, hi = _clamp_bounds(start, end, head_timestamp, now)
    starts, ends = _trading_arrays(resolve_profile(profile), lo, hi, use_rth)
    return [(_utc(a), _utc(b)) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


# --- planning ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def max_span_seconds(bar_size: str) -> int:
    """The longest span (whole seconds) whose ``duration_for`` still fits ``MAX_DURATION``.

    Usually ``MAX_DURATION[bar_size]`` itself, but ``duration_for`` rounds up (to days,
    then years of 366 days), so e.g. a 366-day span becomes ``2 Y`` and does not fit the
    1-year limit; this finds the largest span that does. ``duration_for`` is monotonic,
    so the spans that fit form a prefix and a bisection finds its end.
    """
    _check_bar_size(bar_size)
    limit = MAX_DURATION[bar_size]

    def fits(seconds: int) -> bool:
        return duration_for(timedelta(seconds=seconds)).span <= limit

    hi = int(limit.total_seconds())
    if fits(hi):
        return hi
    lo = 1  # a 1-second span is "1 S", which fits every limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _request(
    end: int,
    first: int,
    covers: tuple[int, int],
    bar_size: str,
    what_to_show: str,
    use_rth: bool,
) -> HistoricalRequest:
    duration = duration_for(timedelta(seconds=end - first))
    if duration.span > MAX_DURATION[bar_size]:  # guarded by max_span_seconds; never expected
        raise AssertionError(f"planned {duration} exceeds the {bar_size} maximum")
    end_dt = _utc(end)
    return HistoricalRequest(
        end=end_dt,
        duration=str(duration),
        bar_size=bar_size,
        what_to_show=what_to_show,
        use_rth=use_rth,
        start=end_dt - duration.span,
        covers=(_utc(covers[0]), _utc(covers[1])),
    )


def _backward_starts(starts: np.ndarray, ends: np.ndarray, span: int) -> np.ndarray:
    """Starts (ascending) of the windows a right-to-left greedy cover places.

    The right-to-left greedy is optimal for every suffix of the trading time, so the
    fewest requests covering the trading time from a trading second ``x`` on is
    ``1 + (number of these starts > x)``.
    """
    out: list[int] = []
    starts_l, ends_l = starts.tolist(), ends.tolist()
    j = len(starts_l) - 1
    edge = ends_l[j]
    while True:
        left = edge - span
        out.append(left)
        while j >= 0 and starts_l[j] >= left:
            j -= 1
        if j < 0:
            break
        edge = min(ends_l[j], left)
    return np.array(out[::-1], dtype=np.int64)


def _plan_intraday(
    starts: np.ndarray,
    ends: np.ndarray,
    bar_size: str,
    what_to_show: str,
    use_rth: bool,
) -> list[HistoricalRequest]:
    """Fewest windows of at most the maximum span covering the trading time.

    Each request starts at the first trading second not yet covered. Left to right, a
    window reaching as far as the span allows is the classic optimal greedy; among the
    optimal plans this one prefers ending a request at the close of the last whole
    interval it reaches, and cuts a session only when a session is longer than the span
    (chunks of exactly the span, a multiple of the bar size, from the session's open) or
    when stopping at a close would cost an extra request. The backward greedy tells how
    many requests the rest needs, which is what decides that.
    """
    if starts.size == 0:
        return []
    bar = BAR_SIZE_SECONDS[bar_size]
    span = max(bar, max_span_seconds(bar_size) // bar * bar)
    back = _backward_starts(starts, ends, span)

    def need(x: int) -> int:
        return 1 + back.size - int(np.searchsorted(back, x, side="right"))

    starts_l, ends_l = starts.tolist(), ends.tolist()
    requests: list[HistoricalRequest] = []
    i, n, first = 0, len(starts_l), starts_l[0]
    while i < n:
        reach = first + span
        k = int(np.searchsorted(starts, reach, side="left")) - 1  # last interval reached
        if ends_l[k] <= reach:  # the window ends in closed hours after interval k
            to, i = ends_l[k], k + 1
            nxt = starts_l[i] if i < n else to
        elif k > i and need(starts_l[k]) == need(first) - 1:  # stopping at a close is free
            to, i = ends_l[k - 1], k
            nxt = starts_l[k]
        else:  # cut inside interval k; the next request starts at the cut
            to, i = reach, k
            nxt = reach
        requests.append(_request(to, first, (first, to), bar_size, what_to_show, use_rth))
        first = nxt
    return requests


def _plan_daily(
    profile: HoursProfile,
    lo: int,
    hi: int,
    now: int | None,
    bar_size: str,
    what_to_show: str,
    use_rth: bool,
) -> list[HistoricalRequest]:
    """Greedy packing of whole sessions (whole weeks / months for those bar sizes).

    A daily bar is stamped with its session, so each request ends at the close of its last
    session (or ``now`` if that is earlier) and its span reaches back to the open of its
    first session even when the range's start clipped that session.
    """
    dates, opens, closes = _sessions(profile, lo, hi, use_rth)
    if dates.size == 0:
        return []
    ends = closes if now is None else np.minimum(closes, now)
    c_open, c_close = np.maximum(opens, lo), np.minimum(closes, hi)  # covered (clipped) time
    # Units: runs of consecutive sessions of one bar -> [first index, last index].
    unit_first = grid.first_of_each_period(dates, bar_size).tolist()
    unit_last = [k - 1 for k in unit_first[1:]] + [len(dates) - 1]
    span = max_span_seconds(bar_size)
    requests: list[HistoricalRequest] = []
    u, n_units = 0, len(unit_first)
    while u < n_units:
        s0 = unit_first[u]
        first = int(opens[s0])
        v = u
        while v + 1 < n_units and int(ends[unit_last[v + 1]]) - first <= span:
            v += 1
        s1 = unit_last[v]
        if int(ends[s1]) - first > span:  # one unit alone too long; cannot happen for IB sizes
            raise AssertionError(f"a single {bar_size} bar spans more than one request")
        covers = (int(c_open[s0]), int(c_close[s1]))
        requests.append(_request(int(ends[s1]), first, covers, bar_size, what_to_show, use_rth))
        u = v + 1
    return requests


def plan_requests(
    profile: HoursProfile | str,
    bar_size: str,
    start: datetime,
    end: datetime,
    what_to_show: str,
    use_rth: bool,
    head_timestamp: datetime | None = None,
    now: datetime | None = None,
) -> list[HistoricalRequest]:
    """The fewest requests covering the trading hours of [start, end), oldest first.

    The range is clamped to ``head_timestamp`` (nothing earlier) and ``now`` (nothing
    later); for small bars (30 secs or less) also to ``now - SMALL_BAR_HISTORY`` when
    ``now`` is given, since IB keeps no older small bars. Weekends, holidays and closed
    hours come from the profile's calendar (``use_rth``: regular vs all hours). Every
    request's duration fits ``MAX_DURATION[bar_size]``; the ``covers`` ranges of the plan
    are disjoint and hold exactly the trading time of :func:`trading_intervals`.

    Raises ``ValueError`` for an unknown bar size or whatToShow, naive datetimes, or
    ``start >= end``. A range left empty by the clamps gives an empty plan.
    """
    _check_bar_size(bar_size)
    _check_what_to_show(what_to_show)
    _require_aware("start", start)
    _require_aware("end", end)
    if start >= end:
        raise ValueError(f"start {start.isoformat()} must be before end {end.isoformat()}")
    prof = resolve_profile(profile)
    if prof.name == "fx" and what_to_show not in _FX_WHAT_TO_SHOW:
        logger.warning(
            "whatToShow %s is not served for forex (IB answers 162 no data); use one of %s",
            what_to_show,
            ", ".join(sorted(_FX_WHAT_TO_SHOW)),
        )
    if now is not None and is_small_bar(bar_size):
        _require_aware("now", now)
        start = max(start, now - SMALL_BAR_HISTORY)
    lo, hi = _clamp_bounds(start, end, head_timestamp, now)
    if lo >= hi:
        return []
    if is_daily_or_larger(bar_size):
        now_s = None if now is None else _ceil_seconds(now)
        plan = _plan_daily(prof, lo, hi, now_s, bar_size, what_to_show, use_rth)
    else:
        starts, ends = _trading_arrays(prof, lo, hi, use_rth)
        plan = _plan_intraday(starts, ends, bar_size, what_to_show, use_rth)
    logger.debug(
        "planned %d %s %s request(s) for %s..%s (rth=%s)",
        len(plan),
        bar_size,
        what_to_show,
        _utc(lo),
        _utc(hi),
        use_rth,
    )
    return plan


def plan_ranges(
    profile: HoursProfile | str,
    bar_size: str,
    ranges: Sequence[Interval],
    what_to_show: str,
    use_rth: bool,
    head_timestamp: datetime | None = None,
    now: datetime | None = None,
) -> list[HistoricalRequest]:
    """Requests covering several ranges (sorted, disjoint), oldest first.

    IB paces requests, not bars: when the newest request planned so far can be stretched
    to cover the next range with fewer requests than planning that range on its own, it
    is (re-fetching the bars in between costs nothing in pacing terms). A thin
    instrument's scattered missing bars thus cost about one request per maximum duration,
    not one each. Every request still fits the limits; the ``covers`` of the plan stay
    disjoint and hold every range's trading time.
    """
    plan: list[HistoricalRequest] = []
    for start, end in ranges:
        alone = plan_requests(profile, bar_size, start, end, what_to_show, use_rth,
                              head_timestamp, now)
        if plan and alone:
            stretched = plan_requests(profile, bar_size, plan[-1].covers[0], end, what_to_show,
                                      use_rth, head_timestamp, now)
            if len(stretched) < 1 + len(alone):
                plan[-1:] = stretched
                continue
        plan += alone
    return plan

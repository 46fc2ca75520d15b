"""Plan IB historical-data requests: the fewest requests that stay fast.

Pure functions only (no I/O, no IB): given an hours profile, a bar size and UTC ranges,
:func:`plan_ranges` (one range: :func:`plan_requests`) returns the fewest
:class:`HistoricalRequest` objects that cover every trading second of the ranges under a
**per-request bar budget** (``max_bars``), each within IB's limits (``ib_rules``:
365 D / 68 Y, 86400 S, 1 secs 2000 S). :func:`split_request` re-plans one request smaller
(the fetcher's answer to slow or timed-out requests). :func:`trading_intervals` gives the
trading time a plan must cover (gap analysis works on the bar grid:
:mod:`ktrdr_pipeline.domain.gaps`).

What a request returns is :mod:`ktrdr_pipeline.domain.durations`' statement of IB's
semantics (``docs/ib-facts.md`` §2): the bars whose start lies in ``[start, end)`` with
``start = durations.request_start(profile, end, duration, use_rth)``.

**The budget.** IB accepts up to 365 D of 1-min bars, but the cost of a big request is
IB's service time and the client's timeout, not a rule (§2): IB's own sample asks for
``10 D`` of 1-min bars, LEAN for up to ``7 D``; a user reports ``5 D`` of 1-min RTH bars
(1,950 bars) answering normally and ``6 D`` (2,340) hitting a 60 s timeout on a busy day
(ib_insync #268). Service time grows with the bars in an answer, so the budget counts
bars: :data:`DEFAULT_MAX_BARS_PER_REQUEST` = 7 × 390 = 2,730, LEAN's 7 D of regular-hours
minute bars (all hours: about 2.8 sessions of 1-min stock bars, 1.9 of FX). The fetcher
shrinks it when answers slow toward its timeout.

**Bars of 1 min and larger: whole sessions.** Each request ends at the close of its
newest session, so ``N D`` means exactly the N sessions before it; the only exception is
the session in progress at ``now``, whose request ends at ``now`` (IB has nothing later,
and durations.py counts a session in progress as one). A request holds as many whole
sessions as the budget and 365 D allow; one session is the atom (a session with more bars
than the budget is still one ``1 D`` request). ``1 week``/``1 month`` bars take whole
weeks/months of sessions. When the budget allows more than 365 sessions (daily bars:
2,730 sessions ≈ 10.8 years), ``N Y`` is used if its calendar start falls between two
sessions (so the answer is still whole sessions).

**Bars of 30 secs or less: trading seconds.** ``N S`` counts trading seconds back from the
end (durations.py), at most 86400 S (1 secs: 2000 S) and the budget × bar size, a
multiple of the bar size so that every cut falls on the bar grid. The newest request of a
range ends where the range's trading time ends (a bar end, a session close or ``now``);
each older one ends where the next newer one begins, which may be inside a session: the
documented exception to "ends at a session close", unambiguous because ``S`` counts
trading seconds from any instant. IB keeps such bars about six months (§2).

**Minimal.** Working backwards from the newest needed session, each request reaches as
far back as the budget and IB's limits allow; the reach of a request ending later is never
shorter, so by the classic exchange argument no plan (of requests ending at session
closes, covering whole sessions) needs fewer requests. The tests check this against a
brute-force search. Request answers never overlap; ``covers`` (the trading time a request
is responsible for) are disjoint and together hold all the ranges' trading time.

Bar timestamps are whole seconds, so the arithmetic is in integer epoch seconds; a bound
with a fractional second is rounded *up*.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from . import durations, grid, ib_rules
from .calendars import SCHEDULE_START, HoursProfile, resolve_profile, schedule
from .ib_rules import (
    BAR_SIZE_SECONDS,
    MAX_DURATION_COUNT,
    ONE_SECOND_BARS_MAX_S,
    SMALL_BAR_HISTORY,
    Duration,
    exceeds_max_duration,
    is_daily_or_larger,
    is_small_bar,
    parse_duration,
)
from .request_budget import DEFAULT_MAX_BARS_PER_REQUEST

logger = logging.getLogger(__name__)

#: Every ``whatToShow`` value the planner accepts.
WHAT_TO_SHOW = ib_rules.WHAT_TO_SHOW

#: What IB serves for forex (§2: FX TRADES answers 162 "no data").
_FX_WHAT_TO_SHOW = frozenset({"MIDPOINT", "BID", "ASK", "BID_ASK"})

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)

Interval = tuple[datetime, datetime]


#: A request of 30-secs-or-smaller bars is not split below this many bars (the fetcher
#: halves a timed-out request; this is its floor, the analogue of one session).
MIN_SPLIT_BARS = 120


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

    ``start`` is where IB's answer begins (:func:`durations.request_start`; the answer holds
    the bars starting in ``[start, end)``). ``covers`` is the trading time this request is
    responsible for; across a plan the ``covers`` do not overlap and together hold all the
    planned trading time (they may contain closed hours between sessions). ``profile``
    (the hours profile's name) and ``bars`` (the most bars the answer can hold, from the
    schedule) let the fetcher split the request. A request built by hand without a
    ``profile`` has no ``start``; its ``covers`` default to everything before ``end``.
    """

    end: datetime
    duration: str
    bar_size: str
    what_to_show: str
    use_rth: bool
    start: datetime | None = None
    covers: Interval = None  # type: ignore[assignment]  # filled in __post_init__
    profile: str | None = None
    bars: int | None = None

    def __post_init__(self) -> None:
        _require_aware("end", self.end)
        _check_bar_size(self.bar_size)
        _check_what_to_show(self.what_to_show)
        duration = parse_duration(self.duration)  # DurationError is a ValueError
        if exceeds_max_duration(duration, self.bar_size):
            raise ValueError(f"{duration} is longer than IB accepts for {self.bar_size} bars "
                             f"(162 Time length exceed max.; docs/ib-facts.md §2)")
        object.__setattr__(self, "end", self.end.astimezone(UTC))
        if self.profile is not None:
            object.__setattr__(self, "profile", resolve_profile(self.profile).name)
        if self.start is None:
            if self.profile is not None:
                object.__setattr__(self, "start", durations.request_start(
                    self.profile, self.end, duration, self.use_rth))
        else:
            _require_aware("start", self.start)
            object.__setattr__(self, "start", self.start.astimezone(UTC))
        if self.covers is None:
            lo = self.start if self.start is not None else _EPOCH
            object.__setattr__(self, "covers", (lo, self.end))
        else:
            lo, hi = self.covers
            _require_aware("covers[0]", lo)
            _require_aware("covers[1]", hi)
            object.__setattr__(self, "covers", (lo.astimezone(UTC), hi.astimezone(UTC)))

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


@dataclass(frozen=True)
class _Atoms:
    """The planner's indivisible units for one profile, hours and bar size: sessions, or
    whole weeks/months of sessions for ``1 week``/``1 month`` bars (non-empty sessions
    only, as :mod:`durations` counts them). Epoch-second arrays over the whole schedule."""

    opens: np.ndarray  # first session's open
    closes: np.ndarray  # last session's close
    first_session: np.ndarray  # index (in session_opens) of the atom's first session
    unit_of_session: np.ndarray  # atom index of every session
    session_opens: np.ndarray
    session_closes: np.ndarray
    cum_bars: np.ndarray  # cum_bars[i] = bars of atoms 0..i-1
    whole_sessions: bool  # False for week/month units: calendar units would cut a bar


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


def _session_bar_counts(opens: np.ndarray, closes: np.ndarray, size: int, tz: str) -> np.ndarray:
    """Bars of ``size`` seconds in each session, on :mod:`grid`'s bar grid (vectorised
    :func:`grid.session_bars`)."""
    origin = (grid.local_midnights(opens, tz) if grid.counts_from_midnight(size)
              else np.zeros_like(opens))
    first = origin + _ceil_div(opens - origin, size) * size  # first grid point >= open
    on = np.where(first < closes, _ceil_div(closes - first, size), 0)
    return (on + (first != opens)).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _atoms(profile_name: str, use_rth: bool, bar_size: str) -> _Atoms:
    profile = resolve_profile(profile_name)
    sch = schedule(profile.name)
    o, c = sch.bounds(use_rth)
    keep = c > o
    o, c, dates = o[keep].astype(np.int64), c[keep].astype(np.int64), sch.dates[keep]
    if bar_size in ("1 week", "1 month"):
        first = grid.first_of_each_period(dates, bar_size).astype(np.int64)
        last = np.r_[first[1:], len(dates)] - 1
        unit = np.repeat(np.arange(first.size), np.diff(np.r_[first, len(dates)]))
        bars = np.ones(first.size, dtype=np.int64)
        return _Atoms(o[first], c[last], first, unit, o, c, np.r_[0, np.cumsum(bars)], False)
    if is_daily_or_larger(bar_size):
        bars = np.ones(o.size, dtype=np.int64)
    else:
        bars = _session_bar_counts(o, c, BAR_SIZE_SECONDS[bar_size], profile.tz)
    index = np.arange(o.size, dtype=np.int64)
    return _Atoms(o, c, index, index, o, c, np.r_[0, np.cumsum(bars)], True)


def _merge_intervals(starts: list[np.ndarray], ends: list[np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Union of sorted-or-not intervals as sorted, disjoint arrays (touching ones merge)."""
    if not starts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    s, e = np.concatenate(starts), np.concatenate(ends)
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    out_s: list[int] = []
    out_e: list[int] = []
    for a, b in zip(s.tolist(), e.tolist(), strict=True):
        if out_e and a <= out_e[-1]:
            out_e[-1] = max(out_e[-1], b)
        else:
            out_s.append(a)
            out_e.append(b)
    return np.array(out_s, dtype=np.int64), np.array(out_e, dtype=np.int64)


def _covers(need_s: np.ndarray, need_e: np.ndarray, lo: int, hi: int) -> tuple[int, int] | None:
    """The hull of the needed trading time inside [lo, hi), or None."""
    i = int(np.searchsorted(need_e, lo, side="right"))
    j = int(np.searchsorted(need_s, hi, side="left"))
    if i >= j:
        return None
    a, b = max(int(need_s[i]), lo), min(int(need_e[j - 1]), hi)
    return (a, b) if a < b else None


def _make(end: int, duration: Duration, start: int, covers: tuple[int, int], bars: int,
          profile: HoursProfile, bar_size: str, what_to_show: str,
          use_rth: bool) -> HistoricalRequest:
    if exceeds_max_duration(duration, bar_size):  # guarded by the planner; never expected
        raise AssertionError(f"planned {duration} exceeds IB's maximum for {bar_size}")
    return HistoricalRequest(end=_utc(end), duration=str(duration), bar_size=bar_size,
                             what_to_show=what_to_show, use_rth=use_rth, start=_utc(start),
                             covers=(_utc(covers[0]), _utc(covers[1])), profile=profile.name,
                             bars=int(bars))


def _year_reach(atoms: _Atoms, profile: HoursProfile, end: int, floor: int, target: int
                ) -> tuple[int, int] | None:
    """The farthest reach (first atom index, years) of an ``N Y`` request ending at
    ``end`` that starts between two sessions and reaches no further back than atom
    ``floor`` (the budget); stops at the first N reaching ``target``. None: none fits."""
    best = None
    for n in range(1, MAX_DURATION_COUNT["Y"] + 1):
        start = durations.calendar_back(profile, _utc(end), Duration(n, "Y"))
        s = _ceil_seconds(start)
        j = int(np.searchsorted(atoms.opens, s, side="left"))
        if j < floor:
            break
        if j > 0 and atoms.opens[j - 1] < s < atoms.closes[j - 1]:
            continue  # starts inside a session: the answer would not be whole sessions
        best = (j, n)
        if j <= target:
            break
    return best


def _plan_sessions(profile: HoursProfile, need_s: np.ndarray, need_e: np.ndarray,
                   now: int | None, bar_size: str, what_to_show: str, use_rth: bool,
                   max_bars: int) -> list[HistoricalRequest]:
    """Whole-session requests (``N D``, or ``N Y`` beyond 365 sessions), newest first
    in the making, returned oldest first."""
    atoms = _atoms(profile.name, use_rth, bar_size)
    # needed atoms: those holding a session with needed trading time
    so, sc = atoms.session_opens, atoms.session_closes
    idx: list[np.ndarray] = []
    for a, b in zip(need_s.tolist(), need_e.tolist(), strict=True):
        i = int(np.searchsorted(sc, a, side="right"))
        j = int(np.searchsorted(so, b, side="left"))
        idx.append(np.arange(i, j, dtype=np.int64))
    if not idx:
        return []
    needed = np.unique(atoms.unit_of_session[np.concatenate(idx)])
    if needed.size == 0:
        return []
    cb = atoms.cum_bars
    max_d = MAX_DURATION_COUNT["D"]
    plan: list[HistoricalRequest] = []
    p = needed.size - 1
    while p >= 0:
        k = int(needed[p])
        end = int(atoms.closes[k]) if now is None else min(int(atoms.closes[k]), now)
        n_end = int(np.searchsorted(so, end, side="left"))  # sessions opening before end
        end = min(end, int(sc[n_end - 1]))  # a week in progress: its last session so far
        # the budget's reach (at least atom k itself), then 365 sessions'
        floor = min(k, int(np.searchsorted(cb, cb[k + 1] - max_bars, side="left")))
        reach = floor
        while n_end - int(atoms.first_session[reach]) > max_d:
            reach += 1  # rare: at most a few steps past the budget's reach
            if reach > k:
                raise AssertionError("one atom holds more than 365 sessions")
        years = None
        q = int(np.searchsorted(needed, reach, side="left"))
        if q > 0 and floor < reach and atoms.whole_sessions:
            found = _year_reach(atoms, profile, end, floor, int(needed[0]))
            if found is not None and found[0] < reach:
                reach, years = found
                q = int(np.searchsorted(needed, reach, side="left"))
        first = int(needed[q])
        count = n_end - int(atoms.first_session[first])
        if years is not None and count > max_d:
            duration = Duration(years, "Y")
            start = _ceil_seconds(durations.calendar_back(profile, _utc(end), duration))
            bars = int(cb[k + 1] - cb[reach])
        else:
            duration = Duration(count, "D")
            start = int(atoms.opens[first])
            bars = int(cb[k + 1] - cb[first])
        covers = _covers(need_s, need_e, start, end)
        if covers is None:  # cannot happen: atom k holds needed trading time
            raise AssertionError(f"request ending {_utc(end)} covers nothing")
        plan.append(_make(end, duration, start, covers, bars, profile, bar_size,
                          what_to_show, use_rth))
        p = q - 1
    return plan[::-1]


def _trading_seconds(profile: HoursProfile, use_rth: bool, lo: int, hi: int) -> int:
    """Trading seconds (per useRTH) in [lo, hi)."""
    so = _atoms(profile.name, use_rth, "1 secs").session_opens
    sc = _atoms(profile.name, use_rth, "1 secs").session_closes
    i = int(np.searchsorted(sc, lo, side="right"))
    j = int(np.searchsorted(so, hi, side="left"))
    if i >= j:
        return 0
    o, c = np.maximum(so[i:j], lo), np.minimum(sc[i:j], hi)
    return int(np.clip(c - o, 0, None).sum())


def _plan_seconds(profile: HoursProfile, need_s: np.ndarray, need_e: np.ndarray,
                  bar_size: str, what_to_show: str, use_rth: bool,
                  max_bars: int) -> list[HistoricalRequest]:
    """``N S`` requests (bars of 30 secs or less), each as long as the budget and IB's
    limit allow, a multiple of the bar size so every cut falls on the bar grid."""
    if need_s.size == 0:
        return []
    bar = BAR_SIZE_SECONDS[bar_size]
    limit = ONE_SECOND_BARS_MAX_S if bar == 1 else MAX_DURATION_COUNT["S"]
    cap = max(bar, min(limit, max_bars * bar) // bar * bar)
    plan: list[HistoricalRequest] = []
    first_needed = int(need_s[0])
    end = int(need_e[-1])
    while True:
        r = end % bar  # the newest request may end mid-bar (now): keep the cuts on the grid
        longest = cap if r == 0 else r + (cap - r) // bar * bar
        rest = _trading_seconds(profile, use_rth, first_needed, end)
        seconds = longest
        if rest <= longest:  # the oldest request: just enough to reach the range's start
            seconds = rest + (r - rest) % bar
        start = _ceil_seconds(durations.trading_seconds_back(profile, _utc(end), seconds,
                                                             use_rth))
        covers = _covers(need_s, need_e, start, end)
        if covers is None:
            raise AssertionError(f"request ending {_utc(end)} covers nothing")
        plan.append(_make(end, Duration(seconds, "S"), start, covers,
                          _ceil_div(np.int64(seconds), bar).item(), profile, bar_size,
                          what_to_show, use_rth))
        j = int(np.searchsorted(need_s, start, side="left"))  # needed intervals before start
        if j == 0:
            break
        end = min(start, int(need_e[j - 1]))
    return plan[::-1]


def plan_requests(
    profile: HoursProfile | str,
    bar_size: str,
    start: datetime,
    end: datetime,
    what_to_show: str,
    use_rth: bool,
    head_timestamp: datetime | None = None,
    now: datetime | None = None,
    max_bars: int = DEFAULT_MAX_BARS_PER_REQUEST,
) -> list[HistoricalRequest]:
    """The fewest requests covering the trading hours of [start, end), oldest first.

    The range is clamped to ``head_timestamp`` (nothing earlier) and ``now`` (nothing
    later); for small bars (30 secs or less) also to ``now - SMALL_BAR_HISTORY`` when
    ``now`` is given, since IB keeps no older small bars. Weekends, holidays and closed
    hours come from the profile's calendar (``use_rth``: regular vs all hours). See the
    module docstring for the budget ``max_bars`` and the shape of the requests.

    Raises ``ValueError`` for an unknown bar size or whatToShow, naive datetimes,
    ``start >= end`` or a budget below one bar. A range left empty by the clamps gives an
    empty plan.
    """
    _require_aware("start", start)
    _require_aware("end", end)
    if start >= end:
        raise ValueError(f"start {start.isoformat()} must be before end {end.isoformat()}")
    return plan_ranges(profile, bar_size, [(start, end)], what_to_show, use_rth,
                       head_timestamp, now, max_bars)


def plan_ranges(
    profile: HoursProfile | str,
    bar_size: str,
    ranges: Sequence[Interval],
    what_to_show: str,
    use_rth: bool,
    head_timestamp: datetime | None = None,
    now: datetime | None = None,
    max_bars: int = DEFAULT_MAX_BARS_PER_REQUEST,
) -> list[HistoricalRequest]:
    """The fewest requests covering the trading time of several ranges, oldest first.

    IB paces requests, not bars: one request may span the stored bars between two ranges
    when that saves a request (it counts against the budget like any other bar). The
    ``covers`` of the plan are disjoint and hold every range's trading time (clamped as in
    :func:`plan_requests`); answers never overlap.
    """
    _check_bar_size(bar_size)
    _check_what_to_show(what_to_show)
    if not isinstance(max_bars, int) or max_bars < 1:
        raise ValueError(f"max_bars must be a positive number of bars, got {max_bars!r}")
    prof = resolve_profile(profile)
    if prof.name == "fx" and what_to_show not in _FX_WHAT_TO_SHOW:
        logger.warning(
            "whatToShow %s is not served for forex (IB answers 162 no data); use one of %s",
            what_to_show,
            ", ".join(sorted(_FX_WHAT_TO_SHOW)),
        )
    if now is not None:
        _require_aware("now", now)
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for start, end in ranges:
        if now is not None and is_small_bar(bar_size):
            start = max(start, now - SMALL_BAR_HISTORY)
        lo, hi = _clamp_bounds(start, end, head_timestamp, now)
        a, b = _trading_arrays(prof, lo, hi, use_rth)
        starts.append(a)
        ends.append(b)
    need_s, need_e = _merge_intervals(starts, ends)
    if is_small_bar(bar_size):
        plan = _plan_seconds(prof, need_s, need_e, bar_size, what_to_show, use_rth, max_bars)
    else:
        now_s = None if now is None else _ceil_seconds(now)
        plan = _plan_sessions(prof, need_s, need_e, now_s, bar_size, what_to_show, use_rth,
                              max_bars)
    logger.debug("planned %d %s %s request(s) for %d range(s) (rth=%s, budget %d bars)",
                 len(plan), bar_size, what_to_show, len(ranges), use_rth, max_bars)
    return plan


def can_split(req: HistoricalRequest) -> bool:
    """Whether :func:`split_request` can make ``req`` smaller: it holds more than one
    session (or, for ``S`` requests, more than twice :data:`MIN_SPLIT_BARS` bars)."""
    if req.profile is None or req.bars is None:
        return False
    d = parse_duration(req.duration)
    if d.unit == "S":
        return req.bars >= 2 * MIN_SPLIT_BARS
    return len(split_request(req)) > 1


def split_request(req: HistoricalRequest, max_bars: int | None = None
                  ) -> list[HistoricalRequest]:
    """``req``'s trading time re-planned as smaller requests, oldest first: each at most
    ``max_bars`` bars, or (None) ``req`` halved (two requests, the smallest budget that
    makes two: about half the sessions each). A request that cannot be made smaller (one
    session; an ``S`` request near :data:`MIN_SPLIT_BARS`; a hand-built request without
    profile) comes back alone."""
    if req.profile is None or req.bars is None:
        return [req]
    floor = MIN_SPLIT_BARS if parse_duration(req.duration).unit == "S" else 1
    if max_bars is not None:
        parts = _replan(req, max(floor, max_bars))
        return parts if len(parts) > 1 else [req]
    lo, hi = max(floor, -(-req.bars // 2)), req.bars - 1
    if lo > hi or req.bars < 2 * floor:
        return [req]
    parts = _replan(req, hi)
    if len(parts) < 2:
        return [req]
    while lo < hi:  # the smallest budget still giving at most two parts (monotone)
        mid = (lo + hi) // 2
        if len(_replan(req, mid)) <= 2:
            hi = mid
        else:
            lo = mid + 1
    return _replan(req, hi)


def _replan(req: HistoricalRequest, budget: int) -> list[HistoricalRequest]:
    lo, hi = req.covers
    # ``now`` = the request's end: a request ending inside the session in progress keeps
    # ending there; one ending at a close is unaffected
    return plan_ranges(req.profile or "", req.bar_size, [(lo, hi)], req.what_to_show,
                       req.use_rth, now=req.end, max_bars=budget)

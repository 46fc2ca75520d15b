"""What an IB request duration means: the trading time one historical answer covers.

IB does not read ``durationStr`` as a wall-clock span (``docs/ib-facts.md`` §2, verified
against live gateways by rust-ibapi PRs #835/#837; IB's docs say the same of ``D``):

- ``N S``: N seconds of **trading time** going back from the end (regular or all hours,
  per useRTH); ``86400 S`` of RTH hourly bars reaches back about 3.7 regular sessions.
- ``N D``: the N **trading sessions** that end at or before the end time (a session in
  progress at the end time counts as one; a holiday is no session). ``2 D`` ending on a
  Monday at 00:00 gets Thursday and Friday.
- ``N W`` / ``N M`` / ``N Y``: calendar weeks, months, years back from the end, counted in
  the exchange's time zone.

End times are whole seconds at IB (``endDateTime`` has no fraction). An answer holds
the bars whose start ``t`` lies in ``[start, end)`` (a daily bar starts at its session's
open), with ``start`` given by :func:`request_start`. This is the one
statement of those semantics: the planner plans with it and the simulator answers with it.
Everything is UTC inside; the exchange time zone is used only for calendar units.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
from dateutil.relativedelta import relativedelta

from .calendars import HoursProfile, resolve_profile, schedule
from .ib_rules import Duration, parse_duration

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_seconds(t: datetime) -> int:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"naive datetime {t!r}: pass timezone-aware datetimes (UTC inside)")
    seconds, rest = divmod(t - _EPOCH, timedelta(seconds=1))
    return int(seconds) + (1 if rest else 0)


def _utc(seconds: int) -> datetime:
    return _EPOCH + timedelta(seconds=int(seconds))


def _sessions_before(profile: HoursProfile, end: int, use_rth: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Opens and closes (epoch s) of the non-empty sessions that open before ``end``,
    the last one cut at ``end`` (a session in progress counts up to the end time)."""
    opens, closes = schedule(profile.name).bounds(use_rth)
    j = int(np.searchsorted(opens, end, side="left"))
    o, c = opens[:j], np.minimum(closes[:j], end)
    keep = c > o  # empty sessions (e.g. liquid hours cut away by an early close)
    return o[keep], c[keep]


def sessions_back(profile: HoursProfile | str, end: datetime, count: int,
                  use_rth: bool) -> datetime:
    """Open of the earliest of the ``count`` sessions ending at or before ``end``.

    When the schedule holds fewer sessions, the open of its first session.
    """
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    o, _ = _sessions_before(resolve_profile(profile), _epoch_seconds(end), use_rth)
    if o.size == 0:
        return end.astimezone(UTC)
    return _utc(int(o[max(0, o.size - count)]))


def trading_seconds_back(profile: HoursProfile | str, end: datetime, seconds: int,
                         use_rth: bool) -> datetime:
    """The instant ``seconds`` of trading time (per useRTH) before ``end``.

    Closed hours are skipped; when the schedule runs out, the open of its first session.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    o, c = _sessions_before(resolve_profile(profile), _epoch_seconds(end), use_rth)
    if o.size == 0:
        return end.astimezone(UTC)
    # Cumulative trading time from the end backwards, session by session.
    lengths = (c - o)[::-1]
    total = np.cumsum(lengths)
    k = int(np.searchsorted(total, seconds, side="left"))
    if k >= lengths.size:
        return _utc(int(o[0]))
    session = o.size - 1 - k
    before = int(total[k - 1]) if k else 0
    return _utc(int(c[session]) - (seconds - before))


def calendar_back(profile: HoursProfile | str, end: datetime, duration: Duration) -> datetime:
    """``end`` minus ``duration`` (unit W, M or Y) in calendar terms, in exchange time."""
    tz = ZoneInfo(resolve_profile(profile).tz)
    step = {"W": relativedelta(weeks=duration.count),
            "M": relativedelta(months=duration.count),
            "Y": relativedelta(years=duration.count)}.get(duration.unit)
    if step is None:
        raise ValueError(f"{duration} is not a calendar duration (W, M or Y)")
    local = end.astimezone(tz)
    # Wall-clock arithmetic in the exchange zone, then back to UTC (DST-safe).
    naive = local.replace(tzinfo=None) - step
    return naive.replace(tzinfo=tz).astimezone(UTC)


def request_start(profile: HoursProfile | str, end: datetime, duration: Duration | str,
                  use_rth: bool) -> datetime:
    """Where IB's answer to a request ending at ``end`` with ``duration`` begins (UTC).

    The answer holds the bars whose start lies in ``[request_start(...), end)``.
    """
    d = parse_duration(duration) if isinstance(duration, str) else duration
    if d.unit == "S":
        return trading_seconds_back(profile, end, d.count, use_rth)
    if d.unit == "D":
        return sessions_back(profile, end, d.count, use_rth)
    return calendar_back(profile, end, d)

"""Trading sessions per instrument, from ``exchange_calendars``.

Three hour profiles cover the product's instruments:

- ``stock``: the NYSE calendar (holidays, half days). Regular hours are the calendar's
  session; all hours run 04:00–20:00 US/Eastern on session days (17:00 on half days).
- ``fx``: the 24/5 calendar (UTC days Monday–Friday); regular hours are all hours.
- ``future``: the CME Globex calendar (17:00 US/Central the evening before to 17:00);
  regular (liquid) hours are 08:30–15:00 US/Central, cut at an early close.

Everything is UTC inside; the exchange time zone is used only to build the schedule.
Schedules are computed once per profile as epoch-second arrays and searched with numpy,
so finding the sessions of a range costs microseconds.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import exchange_calendars as xcals
import numpy as np
import pandas as pd

#: First session the schedules cover. Head timestamps must not be earlier.
SCHEDULE_START = "2004-01-02"


@dataclass(frozen=True)
class HoursProfile:
    name: str
    calendar: str
    tz: str


STOCK = HoursProfile("stock", "XNYS", "US/Eastern")
FX = HoursProfile("fx", "24/5", "UTC")
FUTURE = HoursProfile("future", "CMES", "US/Central")
PROFILES = {p.name: p for p in (STOCK, FX, FUTURE)}

PROFILE_BY_SECTYPE = {"STK": STOCK, "CASH": FX, "FUT": FUTURE, "OPT": STOCK, "IND": STOCK}


def resolve_profile(profile: HoursProfile | str) -> HoursProfile:
    """``profile`` itself, or the profile of that name."""
    if isinstance(profile, HoursProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(
            f"unknown hours profile {profile!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None


def profile_for(sec_type: str) -> HoursProfile:
    try:
        return PROFILE_BY_SECTYPE[sec_type]
    except KeyError:
        raise ValueError(
            f"no trading calendar for security type {sec_type!r}; "
            f"known: {', '.join(sorted(PROFILE_BY_SECTYPE))}"
        ) from None


@dataclass(frozen=True)
class Session:
    """One trading session: its label date and its UTC open and close (close exclusive)."""

    date: date
    open: datetime
    close: datetime


@dataclass(frozen=True)
class Schedule:
    """All sessions of a profile as parallel arrays (epoch seconds, UTC)."""

    dates: np.ndarray  # datetime64[D]
    rth_open: np.ndarray
    rth_close: np.ndarray
    all_open: np.ndarray
    all_close: np.ndarray

    def bounds(self, use_rth: bool) -> tuple[np.ndarray, np.ndarray]:
        return (self.rth_open, self.rth_close) if use_rth else (self.all_open, self.all_close)


def _epoch(values: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    if isinstance(values, pd.Series):
        values = values.array
    return (pd.DatetimeIndex(values).as_unit("s").asi8).astype(np.int64)


def schedule_end() -> str:
    """Schedules run to the end of 2030 or two years past today, whichever is later, so
    results do not depend on the day the code runs (calendar rules project forward)."""
    return max(date(2030, 12, 31), date.today() + timedelta(days=730)).isoformat()


@functools.lru_cache(maxsize=8)
def _calendar(name: str) -> xcals.ExchangeCalendar:
    with warnings.catch_warnings():
        # exchange_calendars reads Series.values, which pandas 3 deprecates for tz-aware data
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if hasattr(pd.errors, "Pandas4Warning"):
            warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
        return xcals.get_calendar(name, start=SCHEDULE_START, end=schedule_end())


@functools.lru_cache(maxsize=8)
def schedule(profile_name: str) -> Schedule:
    profile = PROFILES[profile_name]
    cal = _calendar(profile.calendar)
    sched = cal.schedule
    labels = pd.DatetimeIndex(sched.index)
    opens, closes = sched["open"], sched["close"]
    cal_open, cal_close = _epoch(opens), _epoch(closes)
    dates = labels.values.astype("datetime64[D]")
    if profile is STOCK:
        tz = ZoneInfo(profile.tz)
        ext_open = [datetime.combine(d.date(), time(4, 0), tz) for d in labels]
        early = (closes.dt.tz_convert(profile.tz).dt.hour < 16).to_numpy()
        ext_close = [
            datetime.combine(d.date(), time(17 if e else 20, 0), tz)
            for d, e in zip(labels, early, strict=True)
        ]
        all_open = np.array([int(x.timestamp()) for x in ext_open], dtype=np.int64)
        all_close = np.array([int(x.timestamp()) for x in ext_close], dtype=np.int64)
        return Schedule(dates, cal_open, cal_close, all_open, all_close)
    if profile is FUTURE:
        tz = ZoneInfo(profile.tz)
        liq_open = np.array(
            [int(datetime.combine(d.date(), time(8, 30), tz).timestamp()) for d in labels],
            dtype=np.int64,
        )
        liq_close = np.array(
            [int(datetime.combine(d.date(), time(15, 0), tz).timestamp()) for d in labels],
            dtype=np.int64,
        )
        liq_close = np.minimum(liq_close, cal_close)
        liq_open = np.minimum(liq_open, liq_close)
        return Schedule(dates, liq_open, liq_close, cal_open, cal_close)
    return Schedule(dates, cal_open, cal_close, cal_open, cal_close)


def _to_epoch(t: datetime) -> int:
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t!r}: pass timezone-aware datetimes (UTC inside)")
    return int(t.timestamp())


def session_index_range(profile: HoursProfile, start: datetime, end: datetime,
                        use_rth: bool) -> tuple[int, int]:
    """Indices [i, j) of the sessions whose hours overlap [start, end)."""
    sch = schedule(profile.name)
    lo, hi = sch.bounds(use_rth)
    s, e = _to_epoch(start), _to_epoch(end)
    i = int(np.searchsorted(hi, s, side="right"))
    j = int(np.searchsorted(lo, e, side="left"))
    return i, max(i, j)


def sessions_between(profile: HoursProfile, start: datetime, end: datetime,
                     use_rth: bool) -> list[Session]:
    """The sessions overlapping [start, end), with their full (unclipped) hours."""
    i, j = session_index_range(profile, start, end, use_rth)
    return _sessions(profile, use_rth, i, j)


def sessions_on_dates(profile: HoursProfile, first: date, last: date,
                      use_rth: bool) -> list[Session]:
    """The sessions whose label date lies in [first, last] (inclusive)."""
    sch = schedule(profile.name)
    i = int(np.searchsorted(sch.dates, np.datetime64(first, "D"), side="left"))
    j = int(np.searchsorted(sch.dates, np.datetime64(last, "D"), side="right"))
    return _sessions(profile, use_rth, i, j)


def _sessions(profile: HoursProfile, use_rth: bool, i: int, j: int) -> list[Session]:
    """Sessions ``i``..``j - 1`` of the profile's schedule (skipping empty ones)."""
    sch = schedule(profile.name)
    lo, hi = sch.bounds(use_rth)
    return [
        Session(
            pd.Timestamp(sch.dates[k]).date(),
            datetime.fromtimestamp(int(lo[k]), UTC),
            datetime.fromtimestamp(int(hi[k]), UTC),
        )
        for k in range(i, j)
        if hi[k] > lo[k]
    ]


def session_at(profile: HoursProfile, t: datetime, use_rth: bool) -> Session | None:
    """The session open at ``t``, or None when the market is closed."""
    found = sessions_between(profile, t, t + timedelta(seconds=1), use_rth)
    if found and found[0].open <= t < found[0].close:
        return found[0]
    return None


def hours_string(profile: HoursProfile, around: datetime, use_rth: bool, days: int = 10) -> str:
    """IB's ``tradingHours``/``liquidHours`` format in the profile's time zone.

    ``20250324:0930-20250324:1600;20250329:CLOSED;…`` for the session dates from
    ``around``'s local date on; dates without a session say CLOSED.
    """
    tz = ZoneInfo(profile.tz)
    local_day = around.astimezone(tz).date()
    first, last = local_day - timedelta(days=1), local_day + timedelta(days=days)
    found = sessions_on_dates(profile, first, last + timedelta(days=1), use_rth)
    by_day: dict[date, Session] = {}
    for s in found:
        by_day[s.date] = s
    parts = []
    for n in range(days):
        d = local_day + timedelta(days=n)
        s = by_day.get(d)
        if s is None:
            parts.append(f"{d:%Y%m%d}:CLOSED")
        else:
            o, c = s.open.astimezone(tz), s.close.astimezone(tz)
            parts.append(f"{o:%Y%m%d:%H%M}-{c:%Y%m%d:%H%M}")
    return ";".join(parts)

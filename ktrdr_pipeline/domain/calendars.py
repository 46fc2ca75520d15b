"""Trading sessions per instrument, as IB trades them: the one owner of sessions.

IB's own word on an instrument's sessions is its contract details' ``tradingHours`` and
``liquidHours`` (``docs/ib-facts.md`` §9); they reach about a week ahead, so older history
and the days ahead come from an exchange calendar library. Hour profiles cover the
product's instruments (§9's table):

- ``stock`` (US stocks, ``US/Eastern``): the NYSE calendar (holidays, half days). Regular
  hours 09:30–16:00 (13:00 on half days), all hours 04:00–20:00 (17:00 on half days): the
  calendar's ``pre``/``market_open``/``market_close``/``post`` times.
- ``future`` (CME equity index futures ES, NQ; ``US/Central``): the CME Globex equity
  calendar, 17:00 the evening before to 16:00, so the daily 16:00–17:00 halt lies between
  two sessions (23 hourly bars a full session) and CME holidays close early (12:00 CT on
  2025-05-26). Liquid hours run from 08:30 to the session's close, cut at an early close —
  IB's ES ``liquidHours`` ``20250522:0830-20250522:1600`` (§9).
- Other CME Group futures keep that shape (a session from the evening before to the
  afternoon, a daily one-hour halt, liquid hours from 08:30 Chicago to the close) with
  their own holiday calendars, chosen by exchange and root (:func:`future_profile`;
  ``docs/ib-facts.md`` §9a has the answers):

  - ``future_energy_metals`` (NYMEX, COMEX: CL, NG, GC, SI, MCL, MGC, …):
    "CMEGlobex_EnergyAndMetals", 17:00–16:00 Chicago. IB states these contracts in New
    York time — CLZ2 in December 2021 (nautilus_trader, tests/integration_tests/adapters/
    interactive_brokers/responses/contracts/CLZ2.pkl at 8a651be2): ``timeZoneId``
    ``US/Eastern``, ``tradingHours`` ``20211206:1800-20211207:1700;…``, ``liquidHours``
    ``20211206:0930-20211206:1700;…``; NGU7 in March 2024 (ghill2/pyfutures, pyfutures/
    tests/unit/client/test_protocol.py at 96bdc1dc), Good Friday ``20240329:CLOSED`` —
    the same instants. The profile keeps Chicago time: the grid of 2-, 3-, 4- and 8-hour
    bars counts from local midnight, and whether IB counts from New York's or Chicago's
    for these contracts is unverified, so the grid their stored bars were validated on
    stays (the simulator answers them in Chicago time).
  - ``future_rates`` (CBOT treasury futures ZT, ZF, ZN, TN, ZB, UB): "CME Globex Fixed
    Income", 17:00–16:00 Chicago (IB's answers of 2016 and 2017 and its contract pages of
    2023 for ZN and ZB: trading 1700-1600, liquid 0830-1600).

  CME's currency futures (IB's EUR, GBP, JPY, …: 1700-1600, liquid 0830-1600 in IB's
  answers) keep the equity calendar: the library's "CMEGlobex_FX" is "accurate 2020-2022
  inclusive" by its own account and has no holiday early closes after that. Any other
  future (CBOT grains, CFE's VIX, …) takes the CME equity hours too, which are wrong for
  it: grains trade 19:00–07:45 and 08:30–13:20 Chicago (IB's ZCH4 answer, pyfutures'
  test_providers.py at f1c0876c), two sessions a day that this model does not hold.
  Resolving such a contract logs IB's hours next to the calendar's
  (``ib.contracts.warn_if_hours_disagree``); its bars load all the same. The early closes
  of every calendar on exchange holidays come from the library, not from IB answers.
- ``fx`` (IDEALPRO, ``US/Eastern``): IB's hours, Sunday 17:15 to Friday 17:00 with a daily
  pause 17:00–17:15 (§9, IB's exchange hours page): a session opens 17:15 the day before
  and closes 17:00 on the weekday it is labelled with. The weekdays come from the
  library's 24/5 calendar; no library has IDEALPRO's hours. Liquid hours are all hours.

A session of a 24-hour market spans two calendar days and is labelled with the date it
closes: its daily bar carries that date (the FX session Sunday 17:15 → Monday 17:00 is
Monday's).

**Why pandas_market_calendars.** Compared against §9 (both libraries, 2024–2031):

- CME equity futures: ``pandas_market_calendars``' "CME Globex Equity" is 17:00–16:00
  US/Central with the early closes of CME holidays (12:00 on 2025-05-26, Juneteenth;
  12:15 on July 3rd, the Friday after Thanksgiving and Christmas Eve; Good Friday's short
  session when payrolls are published). ``exchange_calendars``' CMES runs 17:00–17:00 —
  no halt, so every session would end an hour late — closes every early day at 12:00, has
  no Juneteenth early close and closes Good Friday altogether.
- NYSE: the same sessions in both, but only ``pandas_market_calendars`` has the
  extended hours (04:00 pre-market, 20:00 post-market, 17:00 on half days) that IB's
  outside-RTH ``tradingHours`` show.
- FX: neither has IDEALPRO's 17:15 open. ``pandas_market_calendars``' "FX" calendar runs
  17:00–17:00 New York and also holds a session from Saturday 17:00 (its week includes
  Sunday labels); both 24/5 calendars are UTC days. So FX takes the weekdays of the 24/5
  calendar and IB's published times.

Everything is UTC inside; the exchange time zone is used only to build the schedule and
IB's hours strings. Schedules are computed once per profile as epoch-second arrays and
searched with numpy, so finding the sessions of a range costs microseconds.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd
import pandas_market_calendars as pmc

#: First session the schedules cover. Head timestamps must not be earlier.
SCHEDULE_START = "2004-01-02"

#: IDEALPRO's hours (docs/ib-facts.md §9): a session opens at 17:15 US/Eastern the day
#: before the weekday it closes on, at 17:00.
FX_OPEN = time(17, 15)
FX_CLOSE = time(17, 0)
#: How many days IB's ``tradingHours``/``liquidHours`` reach ("about a week ahead", §9).
HOURS_STRING_DAYS = 7


@dataclass(frozen=True)
class HoursProfile:
    """An instrument class's sessions: the calendar (a ``pandas_market_calendars`` name)
    and the exchange time zone (IB's ``timeZoneId``); for futures, the local time their
    liquid hours (IB's ``liquidHours``, what ``useRTH=1`` covers) open each session day —
    they end with the session."""

    name: str
    calendar: str
    tz: str
    liquid_open: time | None = None


STOCK = HoursProfile("stock", "NYSE", "US/Eastern")
FX = HoursProfile("fx", "24/5", "US/Eastern")
FUTURE = HoursProfile("future", "CME Globex Equity", "US/Central", time(8, 30))
FUTURE_ENERGY_METALS = HoursProfile("future_energy_metals", "CMEGlobex_EnergyAndMetals",
                                    "US/Central", time(8, 30))
FUTURE_RATES = HoursProfile("future_rates", "CME Globex Fixed Income", "US/Central",
                            time(8, 30))
PROFILES = {p.name: p for p in (STOCK, FX, FUTURE, FUTURE_ENERGY_METALS, FUTURE_RATES)}

PROFILE_BY_SECTYPE = {"STK": STOCK, "CASH": FX, "FUT": FUTURE, "OPT": STOCK, "IND": STOCK}

#: IB's exchange codes of NYMEX and COMEX futures (energy and metals).
ENERGY_METALS_EXCHANGES = frozenset({"NYMEX", "COMEX"})
#: CBOT's treasury futures (IB's symbols), and the codes IB gives CBOT (ECBOT before 2018).
TREASURY_ROOTS = frozenset({"ZT", "ZF", "ZN", "TN", "ZB", "UB"})
CBOT_EXCHANGES = frozenset({"CBOT", "ECBOT"})


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


def profile_for(sec_type: str, exchange: str = "", symbol: str = "") -> HoursProfile:
    """The hours profile of an instrument: by security type, and for futures by exchange
    and root (IB's ``exchange`` and ``symbol``; see :func:`future_profile`)."""
    try:
        profile = PROFILE_BY_SECTYPE[sec_type]
    except KeyError:
        raise ValueError(
            f"no trading calendar for security type {sec_type!r}; "
            f"known: {', '.join(sorted(PROFILE_BY_SECTYPE))}"
        ) from None
    return future_profile(exchange, symbol) if profile is FUTURE else profile


def future_profile(exchange: str, symbol: str) -> HoursProfile:
    """A future's hours profile from IB's exchange code and root symbol: NYMEX and COMEX
    energy and metals, CBOT treasuries, and CME's equity index hours for every other
    future (the module docstring says for which that is right)."""
    exchange, symbol = (exchange or "").upper(), (symbol or "").upper()
    if exchange in ENERGY_METALS_EXCHANGES:
        return FUTURE_ENERGY_METALS
    if exchange in CBOT_EXCHANGES and symbol in TREASURY_ROOTS:
        return FUTURE_RATES
    return FUTURE


@dataclass(frozen=True)
class Session:
    """One trading session: its label date (the date it closes) and its UTC open and
    close (close exclusive)."""

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


def _library_schedule(name: str, market_times: str | None = None) -> pd.DataFrame:
    """The calendar's sessions from :data:`SCHEDULE_START` (UTC times, label index)."""
    with warnings.catch_warnings():
        # the libraries read Series.values, which pandas 3 deprecates for tz-aware data
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        if hasattr(pd.errors, "Pandas4Warning"):
            warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
        return pmc.get_calendar(name).schedule(SCHEDULE_START, schedule_end(),
                                               market_times=market_times)


def _local_epoch(days: pd.DatetimeIndex, at: time, tz: str, shift_days: int = 0) -> np.ndarray:
    """Epoch seconds of local time ``at`` on each of ``days`` (+ ``shift_days``) in ``tz``."""
    naive = pd.DatetimeIndex(days).tz_localize(None).normalize() + pd.Timedelta(
        days=shift_days, hours=at.hour, minutes=at.minute)
    return _epoch(naive.tz_localize(tz))


@functools.lru_cache(maxsize=16)
def schedule(profile_name: str) -> Schedule:
    """Every session of the profile from :data:`SCHEDULE_START` (see the module docstring
    for each profile's hours)."""
    profile = PROFILES[profile_name]
    if profile is STOCK:
        sched = _library_schedule(profile.calendar, market_times="all")
        return Schedule(_dates(sched), _epoch(sched["market_open"]),
                        _epoch(sched["market_close"]), _epoch(sched["pre"]),
                        _epoch(sched["post"]))
    sched = _library_schedule(profile.calendar)
    labels = pd.DatetimeIndex(sched.index)
    if profile.liquid_open is not None:  # futures
        all_open, all_close = _epoch(sched["market_open"]), _epoch(sched["market_close"])
        liq_open = _local_epoch(labels, profile.liquid_open, profile.tz)
        # cut at an early close (an 08:15 close leaves no liquid hours: an empty session)
        liq_open = np.minimum(np.maximum(liq_open, all_open), all_close)
        return Schedule(_dates(sched), liq_open, all_close.copy(), all_open, all_close)
    # FX: the library's weekdays, IB's IDEALPRO times
    all_open = _local_epoch(labels, FX_OPEN, profile.tz, shift_days=-1)
    all_close = _local_epoch(labels, FX_CLOSE, profile.tz)
    return Schedule(_dates(sched), all_open, all_close, all_open, all_close)


def _dates(sched: pd.DataFrame) -> np.ndarray:
    return pd.DatetimeIndex(sched.index).tz_localize(None).values.astype("datetime64[D]")


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


def outside_sessions(profile: HoursProfile, t: np.ndarray, use_rth: bool) -> np.ndarray:
    """Which instants ``t`` (int64 epoch seconds) lie outside every session."""
    t = np.asarray(t, dtype=np.int64)
    if len(t) == 0:
        return np.zeros(0, dtype=bool)
    lo, hi = schedule(profile.name).bounds(use_rth)
    k = np.searchsorted(lo, t, side="right") - 1
    inside = k >= 0
    inside[inside] = t[inside] < hi[k[inside]]
    return ~inside


# -- IB's hours strings ---------------------------------------------------------------------
def hours_string(profile: HoursProfile, around: datetime, use_rth: bool,
                 days: int = HOURS_STRING_DAYS) -> str:
    """IB's ``tradingHours`` (``use_rth=False``) or ``liquidHours`` in the profile's time
    zone, as a contract-details answer at ``around`` shows them (docs/ib-facts.md §9).

    One entry per session, keyed by the local date it opens —
    ``20250521:1700-20250522:1600;20250522:1700-20250523:1600;20250524:CLOSED;
    20250525:1700-20250526:1200;…`` for ES on 2025-05-22 — for the sessions overlapping
    the ``days`` local days from ``around``'s (the session in progress included); a day
    that no session touches says CLOSED, an early close is a shorter session, and no date
    appears twice.
    """
    tz = ZoneInfo(profile.tz)
    first = around.astimezone(tz).date()
    lo = datetime.combine(first, time(0), tz)
    hi = datetime.combine(first + timedelta(days=days), time(0), tz)
    entries: list[tuple[date, str]] = []
    covered: set[date] = set()
    for s in sessions_between(profile, lo, hi, use_rth):
        o, c = s.open.astimezone(tz), s.close.astimezone(tz)
        entries.append((o.date(), f"{o:%Y%m%d:%H%M}-{c:%Y%m%d:%H%M}"))
        d, last = o.date(), (c - timedelta(seconds=1)).date()
        while d <= last:
            covered.add(d)
            d += timedelta(days=1)
    for n in range(days):
        d = first + timedelta(days=n)
        if d not in covered:
            entries.append((d, f"{d:%Y%m%d}:CLOSED"))
    return ";".join(text for _, text in sorted(entries))


_ENTRY = re.compile(r"^(\d{8}):(.*)$")
_RANGE = re.compile(r"^(\d{4})-(?:(\d{8}):)?(\d{4})$")


def parse_hours(text: str, tz: str) -> tuple[list[tuple[datetime, datetime]], list[date]]:
    """IB's ``tradingHours``/``liquidHours`` as UTC (open, close) pairs and the CLOSED
    dates. Accepts IB's form ``20250521:1700-20250522:1600`` and the older one without
    the closing date (``20090507:0930-1600,1700-1800``); raises ValueError naming the
    entry it cannot read."""
    zone = ZoneInfo(tz)
    sessions: list[tuple[datetime, datetime]] = []
    closed: list[date] = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        try:
            found, day = _parse_entry(entry, zone)
        except ValueError as exc:
            raise ValueError(f"cannot read hours entry {entry!r} ({exc}): expected "
                             "YYYYMMDD:HHMM-YYYYMMDD:HHMM or YYYYMMDD:CLOSED") from None
        sessions += found
        if day is not None:
            closed.append(day)
    return sessions, closed


def _parse_entry(entry: str, zone: ZoneInfo) -> tuple[list[tuple[datetime, datetime]],
                                                      date | None]:
    """One entry of an hours string: its sessions, or its date when CLOSED."""
    m = _ENTRY.match(entry)
    if not m:
        raise ValueError("no YYYYMMDD: prefix")
    day = datetime.strptime(m.group(1), "%Y%m%d").date()
    if m.group(2) == "CLOSED":
        return [], day
    found = []
    for part in m.group(2).split(","):
        r = _RANGE.match(part)
        if not r:
            raise ValueError(f"range {part!r}")
        end_day = datetime.strptime(r.group(2), "%Y%m%d").date() if r.group(2) else day
        o = datetime.combine(day, datetime.strptime(r.group(1), "%H%M").time(), zone)
        c = datetime.combine(end_day, datetime.strptime(r.group(3), "%H%M").time(), zone)
        found.append((o.astimezone(UTC), c.astimezone(UTC)))
    return found, None


def hours_disagreement(profile: HoursProfile, trading_hours: str, tz: str | None = None,
                       use_rth: bool = False) -> str | None:
    """How IB's hours string (``tradingHours``, or ``liquidHours`` with ``use_rth``)
    disagrees with the profile's calendar over the days it covers, in words naming both
    sides; None when they agree (or the string holds no day). ``tz`` is the contract's
    ``timeZoneId`` (the profile's when missing or unknown)."""
    try:
        zone_name = tz or profile.tz
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        zone_name, zone = profile.tz, ZoneInfo(profile.tz)
    ib_sessions, closed = parse_hours(trading_hours, zone_name)
    days = [o.astimezone(zone).date() for o, _ in ib_sessions] + closed
    if not days:
        return None
    first, last = min(days), max(days)
    lo = datetime.combine(first, time(0), zone)
    hi = datetime.combine(last + timedelta(days=1), time(0), zone)
    ours = {(s.open, s.close) for s in sessions_between(profile, lo, hi, use_rth)
            if first <= s.open.astimezone(zone).date() <= last}
    theirs = set(ib_sessions)
    if ours == theirs:
        return None

    def show(pairs: set[tuple[datetime, datetime]]) -> str:
        return ";".join(f"{o.astimezone(zone):%Y%m%d:%H%M}-{c.astimezone(zone):%Y%m%d:%H%M}"
                        for o, c in sorted(pairs)) or "none"

    return (f"{first:%Y-%m-%d}..{last:%Y-%m-%d} ({zone_name}): only IB's contract details "
            f"have {show(theirs - ours)}; only the {profile.calendar!r} calendar "
            f"({profile.name} profile) has {show(ours - theirs)}")

"""IB's duration semantics (domain/durations.py), from docs/ib-facts.md §2.

The cases named in issue 12 come from IB's documented meaning of the units (``D`` =
trading sessions ending at or before the end, ``S`` = trading seconds, ``W/M/Y`` =
calendar), as verified against live gateways by rust-ibapi PRs #835/#837.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktrdr_pipeline.domain import calendars, durations

ET = ZoneInfo("US/Eastern")


def _session_dates(start: datetime, end: datetime, use_rth: bool) -> list[date]:
    """Label dates of the sessions that have trading time in [start, end)."""
    return [s.date for s in calendars.sessions_between(calendars.STOCK, start, end, use_rth)
            if max(s.open, start) < min(s.close, end)]


def test_five_days_of_daily_bars_skip_the_market_closure() -> None:
    # 5 D ending Friday 2025-01-10 16:00 ET: Jan 3, 6, 7, 8, 10 (Jan 9 NYSE closed).
    end = datetime(2025, 1, 10, 16, 0, tzinfo=ET)
    start = durations.request_start("stock", end, "5 D", use_rth=True)
    assert _session_dates(start, end, True) == [
        date(2025, 1, 3), date(2025, 1, 6), date(2025, 1, 7), date(2025, 1, 8),
        date(2025, 1, 10)]
    assert start == datetime(2025, 1, 3, 9, 30, tzinfo=ET)


def test_two_days_ending_monday_midnight_are_wednesday_and_friday() -> None:
    end = datetime(2025, 1, 13, 0, 0, tzinfo=ET)
    start = durations.request_start("stock", end, "2 D", use_rth=True)
    assert _session_dates(start, end, True) == [date(2025, 1, 8), date(2025, 1, 10)]


def test_a_day_in_progress_counts_as_one_session() -> None:
    end = datetime(2025, 1, 10, 12, 0, tzinfo=ET)
    assert durations.request_start("stock", end, "1 D", True) == datetime(
        2025, 1, 10, 9, 30, tzinfo=ET)
    assert _session_dates(durations.request_start("stock", end, "2 D", True), end, True) == [
        date(2025, 1, 8), date(2025, 1, 10)]


def test_86400_seconds_of_rth_reach_about_3_7_sessions_back() -> None:
    end = datetime(2025, 1, 17, 16, 0, tzinfo=ET)  # Friday close
    start = durations.request_start("stock", end, "86400 S", use_rth=True)
    # 24 h of 6.5-h sessions: Fri, Thu, Wed whole (19.5 h), 4.5 h of Tuesday.
    assert start == datetime(2025, 1, 14, 11, 30, tzinfo=ET)
    sessions = len(_session_dates(start, end, True))
    assert sessions == 4
    assert 86400 / (6.5 * 3600) == pytest.approx(3.69, abs=0.01)


def test_seconds_over_all_hours_skip_the_night() -> None:
    end = datetime(2025, 1, 14, 6, 0, tzinfo=ET)  # 2 h into Tuesday's 04:00 pre-market
    start = durations.request_start("stock", end, "10800 S", use_rth=False)
    assert start == datetime(2025, 1, 13, 19, 0, tzinfo=ET)


def test_calendar_units_count_in_exchange_time() -> None:
    end = datetime(2025, 3, 10, 16, 0, tzinfo=ET)  # the Monday after the DST change
    assert durations.request_start("stock", end, "1 W", True) == datetime(
        2025, 3, 3, 16, 0, tzinfo=ET)
    assert durations.request_start("stock", end, "1 M", True) == datetime(
        2025, 2, 10, 16, 0, tzinfo=ET)
    assert durations.request_start("stock", end, "2 Y", True) == datetime(
        2023, 3, 10, 16, 0, tzinfo=ET)


def test_naive_end_and_bad_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        durations.request_start("stock", datetime(2025, 1, 10), "1 D", True)
    with pytest.raises(ValueError, match="S, D, W, M or Y"):
        durations.request_start("stock", datetime(2025, 1, 10, tzinfo=UTC), "1 Q", True)


@settings(max_examples=60, deadline=None)
@given(end=st.datetimes(min_value=datetime(2010, 1, 1), max_value=datetime(2029, 1, 1),
                        timezones=st.just(UTC)).map(lambda t: t.replace(microsecond=0)),
       sessions=st.integers(1, 30), use_rth=st.booleans(),
       profile=st.sampled_from(sorted(calendars.PROFILES)))
def test_n_days_are_exactly_n_sessions(end: datetime, sessions: int, use_rth: bool,
                                       profile: str) -> None:
    start = durations.request_start(profile, end, f"{sessions} D", use_rth)
    found = [s for s in calendars.sessions_between(calendars.resolve_profile(profile),
                                                   start, end, use_rth)
             if max(s.open, start) < min(s.close, end)]
    assert len(found) == sessions
    assert found[0].open == start


@settings(max_examples=60, deadline=None)
@given(end=st.datetimes(min_value=datetime(2010, 1, 1), max_value=datetime(2029, 1, 1),
                        timezones=st.just(UTC)).map(lambda t: t.replace(microsecond=0)),
       seconds=st.integers(1, 86400), use_rth=st.booleans(),
       profile=st.sampled_from(sorted(calendars.PROFILES)))
def test_n_seconds_are_n_trading_seconds(end: datetime, seconds: int, use_rth: bool,
                                         profile: str) -> None:
    start = durations.request_start(profile, end, f"{seconds} S", use_rth)
    trading = sum(
        ((min(s.close, end) - max(s.open, start)) for s in calendars.sessions_between(
            calendars.resolve_profile(profile), start, end, use_rth)
         if max(s.open, start) < min(s.close, end)), timedelta())
    assert trading == timedelta(seconds=seconds)


@pytest.mark.parametrize(("bar_size", "duration", "exceeds"), [
    ("1 secs", "2000 S", False), ("1 secs", "2001 S", True), ("1 secs", "1 D", True),
    ("5 secs", "86400 S", False), ("1 min", "10 D", False), ("1 min", "365 D", False),
    ("1 hour", "52 W", False), ("1 hour", "53 W", True), ("1 day", "12 M", False),
    ("1 day", "13 M", True), ("1 day", "68 Y", False), ("1 month", "69 Y", True),
])
def test_ib_current_maximum_durations(bar_size: str, duration: str, exceeds: bool) -> None:
    # docs/ib-facts.md §2: 1 secs up to 2000 S; every other size up to
    # 86400 S / 365 D / 52 W / 12 M / 68 Y (IB's TWS API docs, max duration per bar size).
    from ktrdr_pipeline.domain.ib_rules import exceeds_max_duration, parse_duration
    assert exceeds_max_duration(parse_duration(duration), bar_size) is exceeds

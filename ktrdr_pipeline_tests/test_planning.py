"""Tests for ktrdr_pipeline.domain.planning: request planning and gap analysis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktrdr_pipeline.domain.calendars import FUTURE, FX, STOCK, HoursProfile, sessions_between
from ktrdr_pipeline.domain.ib_rules import (
    BAR_SIZE_SECONDS,
    MAX_DURATION,
    SMALL_BAR_HISTORY,
    duration_for,
    is_daily_or_larger,
    is_small_bar,
    parse_duration,
)
from ktrdr_pipeline.domain.planning import (
    WHAT_TO_SHOW,
    HistoricalRequest,
    max_span_seconds,
    plan_requests,
    trading_intervals,
)

ET = ZoneInfo("US/Eastern")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- independent helpers -------------------------------------------------------------------


def merge(intervals: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    for a, b in sorted(i for i in intervals if i[0] < i[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def intersect(cover, trading):
    return [(max(a, cover[0]), min(b, cover[1])) for a, b in trading]


def ceil_second(t: datetime) -> datetime:
    floored = t.replace(microsecond=0)
    return floored if floored == t else floored + timedelta(seconds=1)


def naive_trading(profile, start, end, use_rth, head=None, now=None):
    """Trading intervals straight from sessions_between, merged (datetimes only)."""
    lo, hi = ceil_second(start), ceil_second(end)
    if head is not None:
        lo = max(lo, ceil_second(head))
    if now is not None:
        hi = min(hi, ceil_second(now))
    if lo >= hi:
        return []
    clipped = [
        (max(s.open, lo), min(s.close, hi)) for s in sessions_between(profile, lo, hi, use_rth)
    ]
    return merge(clipped)


def greedy_count(trading, span: timedelta) -> int:
    """Optimal number of fixed-length windows covering the trading time (textbook greedy)."""
    count, idx = 0, 0
    t = trading[0][0] if trading else None
    while t is not None:
        count += 1
        reach = t + span
        t = None
        while idx < len(trading):
            a, b = trading[idx]
            if b > reach:
                t = max(a, reach)
                break
            idx += 1
    return count


def check_plan(plan, profile, bar_size, start, end, use_rth, head, now):
    """Invariants every plan must satisfy."""
    eff_start = start
    if now is not None and is_small_bar(bar_size):
        eff_start = max(start, now - SMALL_BAR_HISTORY)
    trading = trading_intervals(profile, eff_start, end, use_rth, head, now)
    assert trading == naive_trading(profile, eff_start, end, use_rth, head, now)
    limit = MAX_DURATION[bar_size]

    # covers: sorted, disjoint, each holding trading time, together exactly the trading time
    for a, b in zip(plan, plan[1:], strict=False):
        assert a.covers[1] <= b.covers[0]
    for r in plan:
        assert merge(intersect(r.covers, trading)), f"{r} covers no trading time"
    assert merge([x for r in plan for x in intersect(r.covers, trading)]) == trading

    for r in plan:
        span = parse_duration(r.duration).span
        assert span <= limit, r
        assert r.end - span <= r.covers[0]
        assert r.covers[1] <= r.end
        assert r.start == r.end - span
        assert r.end.microsecond == 0
        assert (r.bar_size, r.use_rth) == (bar_size, use_rth)
        if now is not None:
            assert r.end <= ceil_second(now)
        if head is not None:
            assert r.covers[0] >= head
        if not is_daily_or_larger(bar_size):
            assert r.end == r.covers[1]
        else:
            first = sessions_between(
                profile, r.covers[0], r.covers[0] + timedelta(seconds=1), use_rth
            )[0]
            assert r.end - span <= first.open, "daily span must reach the first session's open"
            last = sessions_between(
                profile, r.covers[1] - timedelta(seconds=1), r.covers[1], use_rth
            )[-1]
            assert r.end == (last.close if now is None else min(last.close, ceil_second(now)))

    # minimality
    if not is_daily_or_larger(bar_size):
        span = MAX_DURATION[bar_size]
        assert len(plan) == greedy_count(trading, span)
        for a, b in zip(plan, plan[1:], strict=False):
            assert b.covers[1] - a.covers[0] > span, "two consecutive requests could merge"
    else:
        for a, b in zip(plan, plan[1:], strict=False):
            first = sessions_between(
                profile, a.covers[0], a.covers[0] + timedelta(seconds=1), use_rth
            )[0]
            assert duration_for(b.end - first.open).span > limit, "could merge"
    return trading


# --- property tests ------------------------------------------------------------------------

PROFILES = st.sampled_from([STOCK, FX, FUTURE])
BAR_SIZES = st.sampled_from(list(BAR_SIZE_SECONDS))


@st.composite
def scenarios(draw):
    profile: HoursProfile = draw(PROFILES)
    bar_size = draw(BAR_SIZES)
    use_rth = draw(st.booleans())
    start = draw(
        st.datetimes(
            min_value=datetime(2005, 1, 1), max_value=datetime(2022, 12, 31), timezones=st.just(UTC)
        )
    )
    unit = MAX_DURATION[bar_size] / 3
    length = unit * draw(st.integers(1, 12)) + timedelta(seconds=draw(st.integers(0, 3 * 86400)))
    end = start + length
    head = now = None
    if draw(st.booleans()):
        head = start + length * draw(st.floats(0, 0.5))
    if draw(st.booleans()):
        now = start + length * draw(st.floats(0.3, 1.2))
    return profile, bar_size, start, end, use_rth, head, now


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_plan_invariants(scenario):
    profile, bar_size, start, end, use_rth, head, now = scenario
    plan = plan_requests(profile, bar_size, start, end, "MIDPOINT", use_rth, head, now)
    check_plan(plan, profile, bar_size, start, end, use_rth, head, now)


@pytest.mark.parametrize("bar_size", list(BAR_SIZE_SECONDS))
@pytest.mark.parametrize("profile", [STOCK, FX, FUTURE], ids=lambda p: p.name)
@pytest.mark.parametrize("use_rth", [True, False])
def test_plan_invariants_every_bar_size(bar_size, profile, use_rth):
    start = utc(2024, 2, 27, 13, 17, 5)  # crosses DST (2024-03-10) and Good Friday
    end = start + MAX_DURATION[bar_size] * 4 + timedelta(days=3)
    now = start + MAX_DURATION[bar_size] * 3
    for n in (None, now):
        plan = plan_requests(profile, bar_size, start, end, "BID", use_rth, now=n)
        assert plan
        check_plan(plan, profile, bar_size, start, end, use_rth, None, n)


@pytest.mark.parametrize("bar_size", list(BAR_SIZE_SECONDS))
def test_max_span_fits_limit(bar_size):
    span = max_span_seconds(bar_size)
    limit = MAX_DURATION[bar_size]
    assert duration_for(timedelta(seconds=span)).span <= limit
    if span < limit.total_seconds():
        assert duration_for(timedelta(seconds=span + 1)).span > limit
    if not is_daily_or_larger(bar_size):
        assert span == limit.total_seconds()
        assert span % BAR_SIZE_SECONDS[bar_size] == 0


# --- holidays, weekends, hours -------------------------------------------------------------

THANKSGIVING_WEEK = (utc(2025, 11, 24), utc(2025, 12, 2))


def test_thanksgiving_skipped_and_half_day():
    plan = plan_requests(STOCK, "1 min", *THANKSGIVING_WEEK, "TRADES", True)
    assert [(r.ib_end_string(), r.duration) for r in plan] == [
        ("20251124-21:00:00", "23400 S"),
        ("20251125-21:00:00", "23400 S"),
        ("20251126-21:00:00", "23400 S"),
        ("20251128-18:00:00", "12600 S"),  # half day: 13:00 ET
        ("20251201-21:00:00", "23400 S"),
    ]
    thanksgiving = (utc(2025, 11, 27), utc(2025, 11, 28))
    trading = trading_intervals(STOCK, *THANKSGIVING_WEEK, True)
    assert not merge(intersect(thanksgiving, trading))
    for r in plan:
        assert not merge(intersect(thanksgiving, [r.covers]))
    assert (utc(2025, 11, 28, 14, 30), utc(2025, 11, 28, 18)) in trading


def test_request_spans_closed_hours_between_sessions():
    plan = plan_requests(STOCK, "5 mins", *THANKSGIVING_WEEK, "TRADES", True)
    assert len(plan) == 2
    assert plan[0].covers == (utc(2025, 11, 24, 14, 30), utc(2025, 11, 28, 18))
    assert plan[0].duration == "5 D"
    assert plan[1].covers == (utc(2025, 12, 1, 14, 30), utc(2025, 12, 1, 21))


def test_weekends_skipped_fx():
    # IDEALPRO sessions (docs/ib-facts.md §9): 17:15 US/Eastern the day before to 17:00,
    # Sunday 17:15 to Friday 17:00, so a Sunday-evening session starts the week
    start, end = utc(2025, 3, 3), utc(2025, 3, 17)  # two Mon..Sun weeks
    plan = plan_requests(FX, "1 min", start, end, "MIDPOINT", True)
    assert len(plan) == 11  # 10 weekday sessions + the one opening Sunday 2025-03-16
    for r in plan:
        assert int(r.duration.removesuffix(" S")) <= 86400
        o, c = (t.astimezone(ET) for t in r.covers)
        assert o.weekday() != 5 and c.weekday() != 5  # nothing on a Saturday
        assert r.covers[0] == start or (o.hour, o.minute) == (17, 15)
        assert r.covers[1] == end or (c.hour, c.minute) == (17, 0)
    assert plan[-1].covers == (datetime(2025, 3, 16, 17, 15, tzinfo=ET), end)
    # 1 hour bars: the two weeks fit one request
    plan = plan_requests(FX, "1 hour", start, end, "MIDPOINT", True)
    assert [r.covers for r in plan] == [(start, end)]
    assert plan[0].duration == "14 D"


def test_rth_vs_all_hours_stock():
    winter = trading_intervals(STOCK, utc(2025, 11, 24), utc(2025, 11, 25), True)
    assert winter == [(utc(2025, 11, 24, 14, 30), utc(2025, 11, 24, 21))]
    day = (datetime(2025, 11, 24, tzinfo=ET), datetime(2025, 11, 25, tzinfo=ET))
    assert trading_intervals(STOCK, *day, False) == [
        (datetime(2025, 11, 24, 4, tzinfo=ET), datetime(2025, 11, 24, 20, tzinfo=ET))
    ]
    summer = (datetime(2025, 7, 1, tzinfo=ET), datetime(2025, 7, 2, tzinfo=ET))
    assert trading_intervals(STOCK, *summer, False) == [(utc(2025, 7, 1, 8), utc(2025, 7, 2))]
    assert trading_intervals(STOCK, *summer, True) == [
        (utc(2025, 7, 1, 13, 30), utc(2025, 7, 1, 20))
    ]
    rth = plan_requests(STOCK, "30 secs", *summer, "TRADES", True)
    eth = plan_requests(STOCK, "30 secs", *summer, "TRADES", False)
    assert [r.duration for r in rth] == ["23400 S"]
    assert [r.duration for r in eth] == ["28800 S", "28800 S"]  # 16 h in two 8 h chunks


def test_long_session_split_into_aligned_chunks():
    plan = plan_requests(STOCK, "5 secs", utc(2025, 11, 24), utc(2025, 11, 25), "TRADES", True)
    assert [r.duration for r in plan] == ["7200 S", "7200 S", "7200 S", "1800 S"]
    open_ = utc(2025, 11, 24, 14, 30)
    assert [r.covers[0] for r in plan] == [open_ + timedelta(hours=2 * k) for k in range(4)]
    for r in plan:
        assert (r.covers[0] - open_).total_seconds() % 5 == 0


# --- clamps --------------------------------------------------------------------------------


def test_head_timestamp_clamp():
    head = utc(2025, 11, 25, 16)
    plan = plan_requests(STOCK, "1 min", *THANKSGIVING_WEEK, "TRADES", True, head_timestamp=head)
    assert plan[0].covers == (head, utc(2025, 11, 25, 21))
    assert all(r.covers[0] >= head for r in plan)
    assert (
        plan_requests(
            STOCK, "1 min", *THANKSGIVING_WEEK, "TRADES", True, head_timestamp=utc(2026, 1, 1)
        )
        == []
    )


def test_now_clamp():
    now = utc(2025, 11, 26, 15, 0, 30)
    plan = plan_requests(STOCK, "1 min", *THANKSGIVING_WEEK, "TRADES", True, now=now)
    assert plan[-1].covers == (utc(2025, 11, 26, 14, 30), now)
    assert plan[-1].end == now
    assert all(r.end <= now for r in plan)
    daily = plan_requests(STOCK, "1 day", *THANKSGIVING_WEEK, "TRADES", True, now=now)
    assert daily[-1].end == now
    assert daily[-1].end - daily[-1].span <= utc(2025, 11, 24, 14, 30)


def test_small_bars_six_month_clamp():
    now = utc(2026, 6, 1, 12)
    start, end = utc(2025, 1, 1), utc(2026, 6, 1)
    plan = plan_requests(STOCK, "30 secs", start, end, "TRADES", True, now=now)
    assert plan[0].covers[0] >= now - SMALL_BAR_HISTORY
    assert plan[0].covers[0] - (now - SMALL_BAR_HISTORY) < timedelta(days=4)
    # not for 1 min bars, nor without `now`
    big = plan_requests(STOCK, "1 min", start, end, "TRADES", True, now=now)
    assert big[0].covers[0] == utc(2025, 1, 2, 14, 30)
    assert (
        plan_requests(STOCK, "30 secs", start, end, "TRADES", True)[0].covers[0] == big[0].covers[0]
    )
    # a range entirely older than six months plans nothing
    assert plan_requests(STOCK, "5 secs", start, utc(2025, 3, 1), "TRADES", True, now=now) == []


# --- daily and larger ----------------------------------------------------------------------


def test_daily_bars_whole_days_cover_first_open():
    start = utc(2025, 11, 24, 16)  # mid-session: the session's daily bar is still planned
    plan = plan_requests(STOCK, "1 day", start, utc(2025, 12, 2), "ADJUSTED_LAST", True)
    assert len(plan) == 1
    r = plan[0]
    assert r.end == utc(2025, 12, 1, 21)
    assert r.duration.endswith(" D")
    assert r.start <= utc(2025, 11, 24, 14, 30)
    assert r.covers == (start, utc(2025, 12, 1, 21))


def test_daily_bars_years():
    plan = plan_requests(STOCK, "1 day", utc(2005, 1, 1), utc(2025, 1, 1), "TRADES", True)
    assert 20 <= len(plan) <= 21
    for r in plan:
        assert parse_duration(r.duration).span <= MAX_DURATION["1 day"]


@pytest.mark.parametrize(
    "bar_size,key,least",
    [
        ("1 week", lambda d: d.isocalendar()[:2], 3),  # at most 2 years per request
        ("1 month", lambda d: (d.year, d.month), 6),  # at most 1 year per request
    ],
)
def test_weeks_and_months_not_split(bar_size, key, least):
    plan = plan_requests(STOCK, bar_size, utc(2010, 1, 1), utc(2016, 1, 1), "TRADES", True)
    assert least <= len(plan) <= least + 1
    for a, b in zip(plan, plan[1:], strict=False):
        last_day = (a.covers[1] - timedelta(seconds=1)).astimezone(ET).date()
        first_day = b.covers[0].astimezone(ET).date()
        assert key(last_day) != key(first_day)


# --- validation ----------------------------------------------------------------------------


def test_validation_errors():
    s, e = THANKSGIVING_WEEK
    with pytest.raises(ValueError, match=r"unknown bar size '1 sec'.*'1 secs'"):
        plan_requests(STOCK, "1 sec", s, e, "TRADES", True)
    with pytest.raises(ValueError, match=r"unknown whatToShow 'TRADE'.*MIDPOINT"):
        plan_requests(STOCK, "1 min", s, e, "TRADE", True)
    with pytest.raises(ValueError, match="must be before"):
        plan_requests(STOCK, "1 min", e, s, "TRADES", True)
    with pytest.raises(ValueError, match="must be before"):
        plan_requests(STOCK, "1 min", s, s, "TRADES", True)
    with pytest.raises(ValueError, match="naive"):
        plan_requests(STOCK, "1 min", datetime(2025, 1, 1), e, "TRADES", True)
    with pytest.raises(ValueError, match="naive"):
        plan_requests(STOCK, "1 min", s, e, "TRADES", True, now=datetime(2025, 12, 1))
    with pytest.raises(ValueError, match="naive"):
        trading_intervals(STOCK, s, datetime(2025, 12, 1), True)
    with pytest.raises(ValueError, match="unknown hours profile"):
        plan_requests("bonds", "1 min", s, e, "TRADES", True)
    for what in WHAT_TO_SHOW:
        assert plan_requests("stock", "1 hour", s, e, what, True)


def test_historical_request_defaults_and_end_string():
    end = datetime(2025, 11, 24, 16, tzinfo=ET)
    r = HistoricalRequest(end, "1 D", "1 min", "TRADES", False)
    assert r.end == utc(2025, 11, 24, 21) and r.end.tzinfo is UTC
    assert r.ib_end_string() == "20251124-21:00:00"
    assert r.start == utc(2025, 11, 23, 21)
    assert r.covers == (r.start, r.end)
    with pytest.raises(ValueError):
        HistoricalRequest(end, "90000 S", "1 min", "TRADES", False)
    with pytest.raises(ValueError):
        HistoricalRequest(datetime(2025, 1, 1), "1 D", "1 min", "TRADES", False)


# --- missing intervals ---------------------------------------------------------------------

SESSIONS = trading_intervals(STOCK, utc(2025, 11, 24), utc(2025, 11, 26), True)


def minute_bars(a: datetime, b: datetime) -> list[datetime]:
    return list(pd.date_range(a, b, freq="1min", inclusive="left").to_pydatetime())


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["1 secs", "5 secs", "30 secs", "1 min", "2 mins", "5 mins"]),
    st.lists(st.tuples(st.integers(1, 400), st.integers(1, 400)), min_size=1, max_size=30),
    st.integers(60, 4 * 86400),
)
def test_intraday_greedy_on_synthetic_intervals(bar_size, shape, unit):
    """Arbitrary gaps and session lengths (in units scaled to the max span) stay optimal."""
    from ktrdr_pipeline.domain.planning import _plan_intraday

    limit = MAX_DURATION[bar_size]
    scale = max(1, int(limit.total_seconds()) * unit // (100 * 86400))
    t = 1_500_000_000
    starts, ends = [], []
    for gap, length in shape:
        t += gap * scale
        starts.append(t)
        t += length * scale
        ends.append(t)
    plan = _plan_intraday(np.array(starts), np.array(ends), bar_size, "BID", True)
    trading = [
        (datetime.fromtimestamp(a, UTC), datetime.fromtimestamp(b, UTC))
        for a, b in zip(starts, ends, strict=True)
    ]
    assert len(plan) == greedy_count(trading, limit)
    for a, b in zip(plan, plan[1:], strict=False):
        assert a.covers[1] <= b.covers[0]
    assert merge([x for r in plan for x in intersect(r.covers, trading)]) == trading
    for r in plan:
        assert parse_duration(r.duration).span <= limit
        assert r.end - r.span <= r.covers[0] < r.covers[1] == r.end


# --- several ranges: scattered gaps share requests ------------------------------------------


@st.composite
def range_sets(draw):
    profile: HoursProfile = draw(PROFILES)
    bar_size = draw(st.sampled_from(["5 secs", "1 min", "5 mins", "1 hour", "1 day"]))
    use_rth = draw(st.booleans())
    t = draw(st.datetimes(min_value=datetime(2010, 1, 1), max_value=datetime(2022, 12, 31),
                          timezones=st.just(UTC)))
    unit = MAX_DURATION[bar_size]
    ranges = []
    for _ in range(draw(st.integers(1, 12))):
        t += unit * draw(st.floats(0.0, 1.5)) + timedelta(seconds=draw(st.integers(1, 600)))
        end = t + unit * draw(st.floats(0.001, 0.8)) + timedelta(seconds=1)
        ranges.append((t, end))
        t = end
    return profile, bar_size, use_rth, ranges


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(range_sets())
def test_plan_ranges_covers_every_range_with_no_more_requests(case):
    from ktrdr_pipeline.domain.planning import plan_ranges

    profile, bar_size, use_rth, ranges = case
    plan = plan_ranges(profile, bar_size, ranges, "MIDPOINT", use_rth)
    separate = [plan_requests(profile, bar_size, a, b, "MIDPOINT", use_rth) for a, b in ranges]
    assert len(plan) <= sum(len(p) for p in separate)
    covers = [r.covers for r in plan]
    assert covers == sorted(covers)
    assert all(a[1] <= b[0] for a, b in zip(covers, covers[1:], strict=False)), "overlap"
    for r in plan:
        assert r.span <= MAX_DURATION[bar_size] or is_daily_or_larger(bar_size)
        assert r.end - r.span <= r.covers[0]
    # every trading second of every range lies in some request's covers
    covered = merge(covers)
    for a, b in ranges:
        for lo, hi in trading_intervals(profile, a, b, use_rth):
            assert any(c0 <= lo and hi <= c1 for c0, c1 in covered), (lo, hi)


def test_plan_ranges_puts_a_days_scattered_minutes_in_one_request():
    from ktrdr_pipeline.domain.planning import plan_ranges

    day = utc(2025, 6, 10, 13, 30)
    holes = [(day + timedelta(minutes=m), day + timedelta(minutes=m + 1))
             for m in (3, 17, 18, 90, 200, 387)]
    plan = plan_ranges(STOCK, "1 min", holes, "TRADES", True)
    assert len(plan) == 1 and plan[0].covers[0] <= holes[0][0]
    assert plan[0].covers[1] >= holes[-1][1]
    # a week apart they stay separate requests
    apart = [holes[0], (holes[0][0] + timedelta(days=7), holes[0][1] + timedelta(days=7))]
    assert len(plan_ranges(STOCK, "1 min", apart, "TRADES", True)) == 2


def test_runs_of_expected_bars_round_trip():
    from ktrdr_pipeline.domain.gaps import in_runs, runs_of, runs_outside

    starts = np.arange(0, 600, 60, dtype=np.int64) + 1_000_000
    ends = starts + 60
    flags = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)
    runs = runs_of(starts, ends, flags)
    assert runs == [(1_000_060, 1_000_180), (1_000_240, 1_000_300), (1_000_420, 1_000_600)]
    assert (in_runs(starts, runs) == flags).all()
    assert not in_runs(np.array([999_999, 1_000_600]), runs).any()
    assert runs_outside(runs, 1_000_100, 1_000_450) == [(1_000_060, 1_000_100),
                                                        (1_000_450, 1_000_600)]
    assert runs_of(starts, ends, np.zeros(10, bool)) == [] and not in_runs(starts, []).any()

"""Property tests: the synthetic market is consistent across bar sizes and request splits."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktrdr_pipeline.domain import calendars
from ktrdr_pipeline.domain.ib_rules import BAR_SIZE_SECONDS
from ktrdr_pipeline.simulator.market import C, H, L, MarketModel, N, O, T, V, W
from ktrdr_pipeline.simulator.universe import build_universe

UNIVERSE = build_universe(date(2026, 11, 18))
MODEL = MarketModel(seed=7)
NOW = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)
INSTRUMENTS = [UNIVERSE.instruments[c] for c in (265598, 756733, 479624278, 12087792, 15016059)]
INSTRUMENTS.append(UNIVERSE.front_future("ES", date(2026, 6, 1)))
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

instruments = st.sampled_from(INSTRUMENTS)
days = st.dates(min_value=date(2022, 1, 3), max_value=date(2026, 11, 17))
intraday_sizes = st.sampled_from(["2 mins", "3 mins", "5 mins", "10 mins", "15 mins", "20 mins",
                                  "30 mins", "1 hour", "2 hours", "4 hours", "8 hours"])


def _session(inst, day: date, use_rth: bool):
    day = max(day, inst.head.date())
    found = calendars.sessions_on_dates(inst.profile, day, day + timedelta(days=7), use_rth)
    if inst.sec_type == "FUT":
        exp = inst.expiry_date
        found = [s for s in found if s.date <= exp]
    return found[0] if found else None


def _aggregate_like(block_small: np.ndarray, labels_big: np.ndarray) -> np.ndarray:
    """Aggregate small bars into the big bars whose label is the last one <= their start."""
    idx = np.searchsorted(labels_big, block_small[:, T], side="right") - 1
    return MarketModel.aggregate(block_small, labels_big[idx])


def _assert_same_bars(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a[:, [T, O, H, L, C, V, N]], b[:, [T, O, H, L, C, V, N]])
    np.testing.assert_allclose(a[:, W], b[:, W], rtol=1e-9)


@PROPS
@given(inst=instruments, day=days, size=intraday_sizes, use_rth=st.booleans())
def test_larger_bars_are_aggregates_of_one_minute_bars(inst, day, size, use_rth):
    session = _session(inst, day, use_rth)
    if session is None:
        return
    big = MODEL.bars(inst, size, session.open, session.close, use_rth, NOW)
    small = MODEL.bars(inst, "1 min", session.open, session.close, use_rth, NOW)
    assert len(small) > 0
    _assert_same_bars(big, _aggregate_like(small, big[:, T]))
    # bar starts align to the size from local midnight, except the session's first bar
    assert big[0, T] == session.open.timestamp()


@PROPS
@given(inst=instruments, day=days, size=st.sampled_from(["1 secs", "5 secs", "10 secs", "15 secs",
                                                         "30 secs"]),
       minute=st.integers(0, 300))
def test_second_bars_aggregate_to_their_minute(inst, day, size, minute):
    session = _session(inst, day, True)
    if session is None:
        return
    start = session.open + timedelta(minutes=minute)
    if start + timedelta(minutes=2) > session.close:
        return
    end = start + timedelta(minutes=2)
    now = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)
    secs = MODEL.bars(inst, size, start, end, True, now)
    minutes = MODEL.bars(inst, "1 min", start, end, True, now)
    assert len(secs) == 120 // BAR_SIZE_SECONDS[size]
    _assert_same_bars(minutes, _aggregate_like(secs, minutes[:, T]))


@PROPS
@given(inst=instruments, day=days, use_rth=st.booleans())
def test_daily_bar_is_the_session_aggregate(inst, day, use_rth):
    session = _session(inst, day, use_rth)
    if session is None:
        return
    daily = MODEL.bars(inst, "1 day", session.open, session.close, use_rth, NOW)
    minutes = MODEL.bars(inst, "1 min", session.open, session.close, use_rth, NOW)
    assert len(daily) == 1
    expected = MarketModel.aggregate(minutes, np.zeros(len(minutes)))
    np.testing.assert_array_equal(daily[0, [O, H, L, C, V, N]], expected[0, [O, H, L, C, V, N]])
    assert datetime.fromtimestamp(daily[0, T], UTC).date() == session.date


@PROPS
@given(inst=instruments, day=days, size=st.sampled_from(["1 min", "5 mins", "1 hour"]),
       cut=st.floats(0.05, 0.95), use_rth=st.booleans())
def test_split_requests_return_identical_bars(inst, day, size, cut, use_rth):
    first = _session(inst, day, use_rth)
    if first is None:
        return
    start, end = first.open, first.open + timedelta(days=4)
    whole = MODEL.bars(inst, size, start, end, use_rth, NOW)
    if len(whole) < 2:
        return
    # a backfill up to a bar boundary and a later tail request from it
    k = max(1, min(len(whole) - 1, int(len(whole) * cut)))
    boundary = datetime.fromtimestamp(whole[k, T], UTC)
    fresh = MarketModel(seed=7)  # also: a new process with the same seed agrees
    head = fresh.bars(inst, size, start, boundary, use_rth, NOW)
    tail = MODEL.bars(inst, size, boundary, end, use_rth, NOW)
    _assert_same_bars(whole, np.concatenate([head, tail]))


@PROPS
@given(inst=instruments, day=days, use_rth=st.booleans())
def test_bars_lie_inside_sessions_and_are_valid(inst, day, use_rth):
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end = start + timedelta(days=3)
    bars = MODEL.bars(inst, "1 min", start, end, use_rth, NOW)
    sessions = calendars.sessions_between(inst.profile, start, end, use_rth)
    opens = np.array([s.open.timestamp() for s in sessions])
    closes = np.array([s.close.timestamp() for s in sessions])
    if len(bars) == 0:
        return
    t = bars[:, T]
    inside = ((t[:, None] >= opens[None, :]) & (t[:, None] + 60 <= closes[None, :])).any(axis=1)
    assert inside.all()
    assert (np.diff(t) > 0).all()
    assert (bars[:, L] <= np.minimum(bars[:, O], bars[:, C])).all()
    assert (bars[:, H] >= np.maximum(bars[:, O], bars[:, C])).all()
    assert (bars[:, L] > 0).all() and (bars[:, V] >= 0).all()


def test_seed_changes_prices_and_is_deterministic():
    inst = INSTRUMENTS[0]
    start = datetime(2026, 11, 17, 14, 30, tzinfo=UTC)
    end = start + timedelta(hours=1)
    a = MarketModel(seed=1).bars(inst, "1 min", start, end, True, NOW)
    b = MarketModel(seed=1).bars(inst, "1 min", start, end, True, NOW)
    c = MarketModel(seed=2).bars(inst, "1 min", start, end, True, NOW)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, C], c[:, C])


def test_bar_in_progress_is_partial_and_converges():
    inst = INSTRUMENTS[0]
    bar_start = datetime(2026, 11, 17, 15, 0, tzinfo=UTC)
    start = bar_start - timedelta(hours=1)
    final = MODEL.bars(inst, "1 hour", start, bar_start + timedelta(hours=1), True,
                       bar_start + timedelta(hours=2))[-1]
    previous = None
    for seconds in (1, 600, 1800, 3599):
        now = bar_start + timedelta(seconds=seconds)
        partial = MODEL.bars(inst, "1 hour", start, now, True, now)[-1]
        assert partial[T] == bar_start.timestamp() and partial[O] == final[O]
        assert final[L] <= partial[L] and partial[H] <= final[H]
        assert partial[V] <= final[V]
        if previous is not None:
            assert partial[V] >= previous[V]
            assert partial[H] >= previous[H] and partial[L] <= previous[L]
        previous = partial
    complete = MODEL.bars(inst, "1 hour", start, bar_start + timedelta(hours=1), True,
                          bar_start + timedelta(hours=1))[-1]
    _assert_same_bars(complete[None, :], final[None, :])


def test_no_data_after_the_clock_or_before_the_head():
    inst = UNIVERSE.instruments[479624278]  # RBLX, listed 2021-03-10
    before = MODEL.bars(inst, "1 day", datetime(2021, 1, 1, tzinfo=UTC),
                        datetime(2021, 3, 10, tzinfo=UTC), True, NOW)
    assert len(before) == 0
    first = MODEL.bars(inst, "1 day", datetime(2021, 1, 1, tzinfo=UTC),
                       datetime(2021, 3, 20, tzinfo=UTC), True, NOW)
    assert datetime.fromtimestamp(first[0, T], UTC).date() == date(2021, 3, 10)
    future = MODEL.bars(inst, "1 min", NOW, NOW + timedelta(days=2), True, NOW)
    assert len(future) <= 1  # only the bar in progress


@pytest.mark.parametrize("size", ["1 week", "1 month"])
def test_weekly_and_monthly_bars_aggregate_daily_bars(size):
    inst = INSTRUMENTS[1]
    start, end = datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)
    daily = MODEL.bars(inst, "1 day", start, end, True, NOW)
    big = MODEL.bars(inst, size, start, end, True, NOW)
    assert big[:, V].sum() == daily[:, V].sum()
    assert big[:, H].max() == daily[:, H].max() and big[:, L].min() == daily[:, L].min()
    assert len(big) == (12 if size == "1 month" else 53)


# -- trades-only bars: a thin instrument leaves holes, consistently across bar sizes ------
ILLQ = UNIVERSE.by_symbol("ILLQ", "STK")[0]
THIN = [ILLQ, UNIVERSE.instruments[265598]]  # the thin one, and a liquid one for contrast


@PROPS
@given(inst=st.sampled_from(THIN), day=days, use_rth=st.booleans())
def test_trades_bars_are_the_minutes_that_traded(inst, day, use_rth):
    session = _session(inst, day, use_rth)
    if session is None:
        return
    every = MODEL.bars(inst, "1 min", session.open, session.close, use_rth, NOW)
    traded = MODEL.bars(inst, "1 min", session.open, session.close, use_rth, NOW, trades=True)
    _assert_same_bars(traded, every[every[:, V] > 0])
    assert (traded[:, V] > 0).all() and (traded[:, N] > 0).all()
    if inst is ILLQ:  # thin: holes in every session (most of them outside regular hours)
        assert 0 < len(traded) < len(every)


@PROPS
@given(day=days, size=intraday_sizes, use_rth=st.booleans())
def test_larger_trades_bars_are_aggregates_of_one_minute_trades_bars(day, size, use_rth):
    session = _session(ILLQ, day, use_rth)
    if session is None:
        return
    big = MODEL.bars(ILLQ, size, session.open, session.close, use_rth, NOW, trades=True)
    small = MODEL.bars(ILLQ, "1 min", session.open, session.close, use_rth, NOW, trades=True)
    _assert_same_bars(big, _aggregate_like(small, big[:, T]))
    # a bar keeps its place on the grid even when its first minutes did not trade
    grid = MODEL.bars(ILLQ, size, session.open, session.close, use_rth, NOW)
    assert set(big[:, T]) <= set(grid[:, T])
    daily = MODEL.bars(ILLQ, "1 day", session.open, session.close, use_rth, NOW, trades=True)
    expected = MarketModel.aggregate(small, np.zeros(len(small)))
    np.testing.assert_array_equal(daily[0, [O, H, L, C, V, N]], expected[0, [O, H, L, C, V, N]])


@PROPS
@given(day=days, size=st.sampled_from(["1 secs", "5 secs", "30 secs"]),
       minute=st.integers(0, 360))
def test_second_trades_bars_aggregate_to_their_minute(day, size, minute):
    session = _session(ILLQ, day, True)
    if session is None:
        return
    start = session.open + timedelta(minutes=minute)
    end = min(start + timedelta(minutes=5), session.close)
    if start >= end:
        return
    secs = MODEL.bars(ILLQ, size, start, end, True, NOW, trades=True)
    minutes = MODEL.bars(ILLQ, "1 min", start, end, True, NOW, trades=True)
    quotes = MODEL.bars(ILLQ, size, start, end, True, NOW)
    assert len(quotes) == (end - start).total_seconds() // BAR_SIZE_SECONDS[size]
    assert (secs[:, V] > 0).all() and len(secs) <= len(quotes)
    if len(minutes):
        _assert_same_bars(minutes, _aggregate_like(secs, minutes[:, T]))
    else:
        assert len(secs) == 0

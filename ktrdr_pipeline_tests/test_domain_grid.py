"""The bar grid (``domain/grid.py``): the one rule for where bars start, shared by gap
analysis, validation, the planner and the simulator."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktrdr_pipeline.domain import grid
from ktrdr_pipeline.domain.ib_rules import BAR_SIZE_SECONDS


def _s(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def _iso(epochs: np.ndarray) -> list[str]:
    return [datetime.fromtimestamp(int(t), UTC).strftime("%H:%M") for t in epochs]


def test_hourly_nyse_bars_start_at_the_open_then_on_the_hour():
    # 2026-11-17 09:30-16:00 US/Eastern = 14:30-21:00 UTC
    starts, ends = grid.session_bars(_s("2026-11-17 14:30"), _s("2026-11-17 21:00"), 3600,
                                     "America/New_York")
    assert _iso(starts) == ["14:30", "15:00", "16:00", "17:00", "18:00", "19:00", "20:00"]
    assert _iso(ends) == ["15:00", "16:00", "17:00", "18:00", "19:00", "20:00", "21:00"]


def test_four_hour_bars_count_from_local_midnight_of_the_first_bar():
    # a CME session opening 17:00 US/Central (23:00 UTC) the day before
    starts, _ = grid.session_bars(_s("2026-11-16 23:00"), _s("2026-11-17 22:00"), 4 * 3600,
                                  "America/Chicago")
    # local midnight 06:00 UTC: 4-hour bars at 02:00, 06:00, 10:00 ... UTC; first at the open
    assert _iso(starts) == ["23:00", "02:00", "06:00", "10:00", "14:00", "18:00"]


def test_bars_that_do_not_divide_a_day_count_from_the_epoch():
    assert not grid.counts_from_midnight(7 * 60)  # 7 minutes do not divide a day
    assert not grid.counts_from_midnight(60)
    assert grid.counts_from_midnight(300) and grid.counts_from_midnight(86400 // 3)
    assert grid.grid_origin(_s("2026-11-17 14:30"), 30, "America/New_York") == 0


def test_weeks_start_on_monday_and_months_on_the_first():
    days = np.array(["2026-11-13", "2026-11-16", "2026-11-20", "2026-11-23", "2026-12-01"],
                    dtype="datetime64[D]")
    weeks = grid.period_start(days, "1 week")
    assert [str(d) for d in weeks] == ["2026-11-09", "2026-11-16", "2026-11-16", "2026-11-23",
                                       "2026-11-30"]
    months = grid.period_start(days, "1 month")
    assert [str(d) for d in months] == ["2026-11-01"] * 4 + ["2026-12-01"]
    assert grid.first_of_each_period(days, "1 week").tolist() == [0, 1, 3, 4]
    assert grid.first_of_each_period(days, "1 month").tolist() == [0, 4]
    assert grid.daily_key(days[:1]).tolist() == [_s("2026-11-13 00:00")]
    with pytest.raises(ValueError, match="not a bar size of a day"):
        grid.period_start(days, "1 hour")


@given(size=st.sampled_from([s for s in BAR_SIZE_SECONDS.values() if s < 86400]),
       open_offset=st.integers(0, 86399), length=st.integers(60, 2 * 86400),
       tz=st.sampled_from(["America/New_York", "America/Chicago", "UTC", "Europe/London"]))
def test_every_bar_start_is_on_the_grid_and_bars_tile_the_session(size, open_offset, length,
                                                                  tz):
    session_open = _s("2026-03-06 00:00") + open_offset  # spans the US DST change
    session_close = session_open + length
    starts, ends = grid.session_bars(session_open, session_close, size, tz)
    origin = grid.grid_origin(session_open, size, tz)
    assert starts[0] == session_open
    assert grid.on_grid(starts, size, session_open, origin).all()
    assert (ends[:-1] == starts[1:]).all() and ends[-1] == session_close
    assert (ends - starts <= size).all() and (ends > starts).all()
    inside = np.arange(session_open, session_close, 7, dtype=np.int64)
    labels = grid.bar_starts(inside, size, session_open, origin)
    assert np.isin(labels, starts).all()


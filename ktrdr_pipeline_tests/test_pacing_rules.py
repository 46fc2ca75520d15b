"""Unit and property tests for the pure pacing rules in ``ktrdr_pipeline.domain.pacing``."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktrdr_pipeline.domain.ib_rules import PacingLimits
from ktrdr_pipeline.domain.pacing import PacedRequest, PacingEvent, PacingWindow

LIM = PacingLimits()  # 15 s identical, 5 per 2 s per contract+tick, 60 per 600 s


def ev(at: float, identity: str = "a", tick: str = "t", weight: int = 1) -> PacingEvent:
    return PacingEvent(at, identity, tick, weight)


def req(identity: str = "a", tick: str = "t", weight: int = 1) -> PacedRequest:
    return PacedRequest(identity, tick, weight)


# --- each rule, by example -----------------------------------------------------------------


def test_empty_window_allows_anything_now() -> None:
    w = PacingWindow(LIM)
    assert w.violation(req(), 100.0) is None
    assert w.next_allowed(req(), 100.0) == 100.0


def test_identical_request_within_15_s() -> None:
    w = PacingWindow(LIM, [ev(100.0, "a", "t1")])
    assert "identical" in (w.violation(req("a", "t2"), 114.9) or "")
    assert w.violation(req("a", "t2"), 115.0) is None  # exactly 15 s later is fine
    assert w.violation(req("b", "t2"), 100.5) is None  # a different request is fine
    assert w.next_allowed(req("a", "t2"), 101.0) == 115.0


def test_six_per_contract_and_tick_within_2_s() -> None:
    w = PacingWindow(LIM, [ev(10.0 + 0.1 * i, f"r{i}", "t") for i in range(5)])
    msg = w.violation(req("new", "t"), 10.5)
    assert msg is not None and "contract" in msg
    assert w.violation(req("new", "other-tick"), 10.5) is None
    # The oldest (10.0) leaves the window at 12.0.
    assert w.next_allowed(req("new", "t"), 10.5) == 12.0
    assert w.violation(req("new", "t"), 12.0) is None
    assert w.violation(req("new", "t"), math.nextafter(12.0, 0)) is not None


def test_five_per_contract_is_fine() -> None:
    w = PacingWindow(LIM, [ev(10.0 + 0.1 * i, f"r{i}", "t") for i in range(4)])
    assert w.violation(req("new", "t"), 10.5) is None


def test_sixty_per_600_s() -> None:
    events = [ev(float(i), f"r{i}", f"t{i}") for i in range(60)]
    w = PacingWindow(LIM, events)
    msg = w.violation(req("new", "fresh"), 100.0)
    assert msg is not None and "60" in msg
    assert w.next_allowed(req("new", "fresh"), 100.0) == 600.0  # event at 0 leaves
    assert w.violation(req("new", "fresh"), 600.0) is None
    # A weight-2 request needs two events to leave: the one at 1 s leaves at 601.
    assert w.next_allowed(req("new", "fresh", 2), 100.0) == 601.0


def test_fifty_nine_leave_room_for_one_but_not_for_bid_ask() -> None:
    w = PacingWindow(LIM, [ev(float(i), f"r{i}", f"t{i}") for i in range(59)])
    assert w.violation(req("new", "fresh"), 100.0) is None
    assert w.violation(req("new", "fresh", 2), 100.0) is not None


def test_bid_ask_counts_twice_per_contract() -> None:
    w = PacingWindow(LIM, [ev(10.0, "x", "t", 2), ev(10.1, "y", "t", 2)])  # weight 4
    assert w.violation(req("z", "t", 1), 10.2) is None  # 5 total
    assert w.violation(req("z", "t", 2), 10.2) is not None  # 6 total
    assert w.next_allowed(req("z", "t", 2), 10.2) == 12.0


def test_bid_ask_counts_twice_globally() -> None:
    w = PacingWindow(LIM, [ev(float(i), f"r{i}", f"t{i}", 2) for i in range(30)])  # weight 60
    assert w.violation(req("new", "fresh"), 100.0) is not None
    assert w.next_allowed(req("new", "fresh"), 100.0) == 600.0


def test_time_scale_shrinks_windows() -> None:
    lim = PacingLimits(time_scale=0.01)
    w = PacingWindow(lim, [ev(1.0, "a", "t")])
    assert w.violation(req("a", "t"), 1.1) is not None
    assert w.next_allowed(req("a", "t"), 1.0) == pytest.approx(1.15)


def test_rules_combine_to_the_latest_bound() -> None:
    # Identical until 115; the contract window is full until 101.9 + 2.
    events = [ev(100.0, "a", "t")] + [ev(100.0 + 0.1 * i, f"r{i}", "t") for i in range(1, 5)]
    w = PacingWindow(LIM, events)
    assert w.next_allowed(req("a", "t"), 100.5) == 115.0
    assert w.next_allowed(req("b", "t"), 100.5) == 102.0


def test_weight_over_budget_raises() -> None:
    w = PacingWindow(PacingLimits(same_contract_max=1))
    with pytest.raises(ValueError):
        w.next_allowed(req(weight=2), 0.0)


def test_prune_forgets_only_what_no_window_reaches() -> None:
    w = PacingWindow(LIM, [ev(0.0, "a"), ev(10.0, "b"), ev(500.0, "c")])
    w.prune(599.0)
    assert [e.identity for e in w.events] == ["a", "b", "c"]
    w.prune(600.0)
    assert [e.identity for e in w.events] == ["b", "c"]


def test_record_keeps_time_order_and_prunes() -> None:
    w = PacingWindow(LIM)
    w.record(req("a"), 10.0)
    w.record(req("b"), 5.0)  # out of order, e.g. merged from another client
    w.record(req("c"), 12.0)
    assert [e.at for e in w.events] == [5.0, 10.0, 12.0]
    w.record(req("d"), 605.5)
    assert [e.identity for e in w.events] == ["a", "c", "d"]


def test_constructor_sorts_events() -> None:
    w = PacingWindow(LIM, [ev(3.0, "c"), ev(1.0, "a"), ev(2.0, "b")])
    assert [e.identity for e in w.events] == ["a", "b", "c"]


def test_next_allowed_is_exact_despite_float_rounding() -> None:
    # (at + w) - at rounds below w for these values; next_allowed used to return a time at
    # which violation() still reported the identical-request rule.
    lim = PacingLimits(time_scale=0.01)
    for at in (0.2, 1.0, 1.3, 123456.789):
        assert (at + lim.identical_window) - at < lim.identical_window  # the trap
        w = PacingWindow(lim, [ev(at)])
        t = w.next_allowed(req(), at)
        assert w.violation(req(), t) is None, at
        assert w.violation(req(), math.nextafter(t, -math.inf)) is not None, at


# --- properties ----------------------------------------------------------------------------

limits_st = st.builds(
    PacingLimits,
    time_scale=st.sampled_from([1.0, 0.01, 0.003, 0.37, 1e-4]),
    same_contract_max=st.integers(2, 6),
    global_max=st.integers(2, 12),
)
bases = st.sampled_from([0.0, 1_700_000_000.0, 12345.678])
event_st = st.tuples(
    st.floats(0, 30, allow_nan=False, allow_infinity=False),
    st.sampled_from(["a", "b", "c", "d"]),
    st.sampled_from(["t1", "t2"]),
    st.sampled_from([1, 1, 2]),
)
request_st = st.builds(
    PacedRequest,
    identity=st.sampled_from(["a", "b", "e"]),
    tick_key=st.sampled_from(["t1", "t2", "t3"]),
    weight=st.sampled_from([1, 2]),
)


def _scenario(limits: PacingLimits, base: float, raw: list, offset: float):
    scale = limits.time_scale
    events = [PacingEvent(base + at * scale, i, t, wt) for at, i, t, wt in raw]
    last = max((e.at for e in events), default=base)
    return PacingWindow(limits, events), last + offset * scale


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limits_st,
    bases,
    st.lists(event_st, max_size=25),
    st.floats(-5, 20, allow_nan=False),
    request_st,
)
def test_next_allowed_never_violates_and_is_earliest(
    limits: PacingLimits, base: float, raw: list, offset: float, request: PacedRequest
) -> None:
    # ``offset`` < 0 puts some events after ``now``: they count as if already sent.
    window, now = _scenario(limits, base, raw, offset)
    t = window.next_allowed(request, now)
    assert t >= now
    assert window.violation(request, t) is None
    if t > now:
        just_before = max(now, math.nextafter(t, -math.inf))
        assert window.violation(request, just_before) is not None
        assert window.violation(request, now) is not None
        midway = now + (t - now) / 2
        if midway < t:
            assert window.violation(request, midway) is not None
    else:
        assert window.violation(request, now) is None


@settings(max_examples=200, deadline=None)
@given(
    limits_st,
    bases,
    st.lists(event_st, max_size=25),
    st.floats(0, 20, allow_nan=False),
    request_st,
    st.floats(0, 1000, allow_nan=False),
)
def test_allowed_stays_allowed_later(
    limits: PacingLimits,
    base: float,
    raw: list,
    offset: float,
    request: PacedRequest,
    later: float,
) -> None:
    window, now = _scenario(limits, base, raw, offset)
    t = window.next_allowed(request, now)
    assert window.violation(request, t + later * limits.time_scale) is None


@settings(max_examples=150, deadline=None)
@given(
    limits_st,
    bases,
    st.lists(st.tuples(request_st, st.floats(0, 3, allow_nan=False)), max_size=40),
)
def test_greedy_schedule_replays_without_violation(
    limits: PacingLimits, base: float, plan: list[tuple[PacedRequest, float]]
) -> None:
    """Sending each request at next_allowed(...) yields a history with no violation at all."""
    window = PacingWindow(limits)
    now = base
    sent: list[tuple[PacedRequest, float]] = []
    for request, think in plan:
        now += think * limits.time_scale
        now = window.next_allowed(request, now)
        window.record(request, now)
        sent.append((request, now))
    # Replay against the full, unpruned history.
    for i, (request, at) in enumerate(sent):
        history = [PacingEvent(a, r.identity, r.tick_key, r.weight) for r, a in sent[:i]]
        assert PacingWindow(limits, history).violation(request, at) is None


@settings(max_examples=150, deadline=None)
@given(limits_st, bases, st.lists(event_st, max_size=25), st.floats(0, 20, allow_nan=False))
def test_prune_does_not_change_any_answer(
    limits: PacingLimits, base: float, raw: list, offset: float
) -> None:
    window, now = _scenario(limits, base, raw, offset)
    pruned = PacingWindow(limits, window.events)
    pruned.prune(now)
    for identity in ("a", "e"):
        for tick in ("t1", "t3"):
            for weight in (1, 2):
                r = PacedRequest(identity, tick, weight)
                assert pruned.violation(r, now) == window.violation(r, now)
                assert pruned.next_allowed(r, now) == window.next_allowed(r, now)

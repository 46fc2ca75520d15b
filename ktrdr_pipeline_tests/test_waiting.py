"""conftest.wait_until: tests wait for a state, with a deadline that fails clearly."""

from __future__ import annotations

import threading

import pytest

from .conftest import wait_until


def test_returns_once_the_state_is_reached():
    reached = threading.Event()
    threading.Thread(target=reached.set).start()
    polls = []
    wait_until(lambda: polls.append(1) or reached.is_set(), "the event is set",
               sleep=lambda s: reached.wait(s))
    assert reached.is_set() and polls


def test_fails_clearly_after_the_deadline():
    with pytest.raises(AssertionError, match=r"not reached within 0\.1 s: the moon is blue"):
        wait_until(lambda: False, "the moon is blue", deadline=0.1)

"""Freshness of ``portfolio_greeks``: is the newest snapshot as recent as the schedule
says it should be? Plain Python behind the Dagster asset check."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

from .config import GreeksConfig
from .store import GREEKS_TABLE, JsonlBuffer, read_rows


@dataclass(frozen=True)
class Freshness:
    passed: bool
    message: str
    newest_tick: datetime | None
    expected_by: datetime | None
    age_s: float | None
    buffered_batches: int

    def metadata(self) -> dict[str, Any]:
        return {
            "newest_tick": self.newest_tick.isoformat() if self.newest_tick else "",
            "expected_by": self.expected_by.isoformat() if self.expected_by else "",
            "age_s": round(self.age_s, 1) if self.age_s is not None else -1.0,
            "buffered_batches": self.buffered_batches,
        }


def expected_newest(config: GreeksConfig, now: datetime) -> datetime | None:
    """The time by which the newest snapshot should have been taken: now while a
    scheduled run covers now, else the end of the last scheduled run (None if the
    schedule never fired in the last five years)."""
    sched = config.schedule()
    last = sched.latest_at_or_before(now)
    if last is None:
        return None
    return min(now, sched.run_end(last))


def check_freshness(config: GreeksConfig, now: datetime | None = None) -> Freshness:
    """Passes when the newest snapshot's tick is at most ``GREEKS_MAX_AGE`` seconds older
    than :func:`expected_newest`."""
    now = now or datetime.now(UTC)
    buffer = JsonlBuffer(config.buffer_path)
    with buffer.locked():
        buffered = len(buffer.read())
    expected = expected_newest(config, now)
    newest: datetime | None = None
    problem = ""
    if not config.db_path.exists():
        problem = f"{config.db_path} does not exist yet"
    else:
        try:
            rows = read_rows(config.db_path, f"SELECT max(tick_time) AS t FROM {GREEKS_TABLE}")
            newest = rows[0]["t"] if rows else None
        except duckdb.Error as exc:
            problem = f"cannot read {config.db_path}: {exc}"
    if newest is not None:
        newest = newest.astimezone(UTC)
    age = (now - newest).total_seconds() if newest is not None else None
    if expected is None:
        passed, message = True, "the schedule has not fired yet; nothing expected"
    elif newest is None:
        passed, message = False, problem or "no snapshot stored yet"
    else:
        lag = (expected - newest).total_seconds()
        passed = lag <= config.max_age
        message = (f"newest snapshot {newest.isoformat()} is {max(lag, 0):.0f} s older than "
                   f"expected ({expected.isoformat()}); limit {config.max_age:g} s")
    if buffered:
        message += (f"; {buffered} batch(es) wait in the outage buffer "
                    f"{config.buffer_path}")
    return Freshness(passed, message, newest, expected, age, buffered)

"""Freshness of ``portfolio_greeks``: is the newest snapshot as recent as the schedule
says it should be? Plain Python behind the Dagster asset check, which computes from the
schedule when the newest snapshot is due (``expected``) and passes it in."""

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


def check_freshness(config: GreeksConfig, now: datetime,
                    expected: datetime | None) -> Freshness:
    """Passes when the newest snapshot's tick is at most ``GREEKS_MAX_AGE`` seconds older
    than ``expected``, the time by which the schedule says the newest snapshot should have
    been taken at ``now`` (None: the schedule has not fired yet, nothing is expected)."""
    buffer = JsonlBuffer(config.buffer_path)
    with buffer.locked():
        buffered = len(buffer.read())
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

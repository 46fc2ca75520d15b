"""The Greeks schedule's cron arithmetic, by the code Dagster's scheduler runs: when a
scheduled run stops taking snapshots and when the newest snapshot is due.
:mod:`ktrdr_pipeline.greeks` only receives the resulting times."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

from dagster._utils.schedules import is_valid_cron_string, schedule_execution_time_iterator

from ...greeks.config import GreeksConfig
from ...settings import SettingsError

_RANGE = re.compile(r"(?<![\d/])(\d+)-(\d+)")
_PROBE_FROM = datetime(2001, 1, 1, tzinfo=UTC)


class GreeksSchedule:
    """``GREEKS_SCHEDULE_CRON`` in ``GREEKS_SCHEDULE_TIMEZONE``, its ticks computed by
    ``schedule_execution_time_iterator``, the function Dagster's scheduler daemon iterates,
    so run ends and the freshness expectation fall on the ticks the daemon fires, DST days
    included (a local time the clocks skip fires at the jump's end, ``30 2 * * *`` at
    03:00; one they repeat fires once, at its second occurrence). A cron Dagster refuses,
    one with a backwards range (``5-1``: cron refuses it, Dagster would wrap it around) or
    one that never fires is a :class:`SettingsError` naming ``GREEKS_SCHEDULE_CRON``."""

    def __init__(self, crons: Sequence[str] | str, timezone: str = "UTC"):
        self.crons = (crons,) if isinstance(crons, str) else tuple(crons)
        self.timezone = timezone
        if not self.crons:
            raise SettingsError("GREEKS_SCHEDULE_CRON: no cron expression given")
        for cron in self.crons:
            if not is_valid_cron_string(cron):
                raise SettingsError(
                    f"GREEKS_SCHEDULE_CRON: {cron!r} is not a cron expression (5 fields: "
                    "minute hour day-of-month month day-of-week, e.g. '* 10-15 * * 1-5')")
            backwards = [m[0] for m in _RANGE.finditer(cron) if int(m[1]) > int(m[2])]
            if backwards:
                raise SettingsError(f"GREEKS_SCHEDULE_CRON: {cron!r}: the range "
                                    f"{backwards[0]!r} runs backwards")
            try:
                next(schedule_execution_time_iterator(_PROBE_FROM.timestamp(), cron, timezone))
            except ValueError:  # croniter gives up looking for a matching day
                raise SettingsError(f"GREEKS_SCHEDULE_CRON: {cron!r} never fires") from None

    @classmethod
    def of(cls, config: GreeksConfig) -> GreeksSchedule:
        return cls(config.schedule_cron, config.schedule_timezone)

    @property
    def cron_schedule(self) -> str | list[str]:
        """The crons as the schedule definition takes them."""
        return list(self.crons) if len(self.crons) > 1 else self.crons[0]

    def ticks(self, start: datetime, *, ascending: bool = True) -> Iterator[datetime]:
        """The ticks at or after ``start`` (at or before it when descending), in UTC."""
        for tick in schedule_execution_time_iterator(start.timestamp(), self.cron_schedule,
                                                     self.timezone, ascending):
            yield tick.astimezone(UTC)

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t``."""
        return next(tick for tick in self.ticks(t) if tick > t)

    def latest_at_or_before(self, t: datetime) -> datetime:
        return next(self.ticks(t, ascending=False))

    def run_end(self, scheduled: datetime, overlap_s: float = 0.0) -> datetime:
        """When the run started for tick ``scheduled`` stops taking snapshots: the next
        tick, or, after the last tick of a block (e.g. 15:59 before a night), as long
        after ``scheduled`` as the gap since the previous tick; plus ``overlap_s``."""
        nxt = self.next_after(scheduled)
        prev = next(tick for tick in self.ticks(scheduled, ascending=False) if tick < scheduled)
        return min(nxt, scheduled + (scheduled - prev)) + timedelta(seconds=overlap_s)

    def expected_newest(self, now: datetime) -> datetime:
        """When the newest snapshot should have been taken: now while a scheduled run
        covers now, else the end of the last scheduled run."""
        return min(now, self.run_end(self.latest_at_or_before(now)))

"""Five-field cron expressions in a time zone: validation, next and previous ticks.

Plain Python, so the Greeks schedule's run length and freshness expectation can be
computed (and tested) without Dagster. Syntax as in Dagster's schedules: ``minute hour
day-of-month month day-of-week`` with ``*``, ``a``, ``a-b``, ``*/n``, ``a-b/n``, ``a/n``
and comma lists; month and weekday names (``JAN``, ``MON``); weekday 0 or 7 is Sunday;
``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``. As in cron, when both
day-of-month and day-of-week are restricted a day matching either one fires. Local times
that do not exist (spring forward) never fire; ambiguous ones (fall back) fire once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_MONTHS = {m: i + 1 for i, m in enumerate(
    "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_DAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}
_HORIZON_DAYS = 5 * 366 + 1  # long enough for "29 2 *" on a leap day


class CronError(ValueError):
    """A malformed cron expression."""


def _value(text: str, lo: int, hi: int, names: dict[str, int], expr: str) -> int:
    key = text.upper()
    if key in names:
        return names[key]
    if not text.isdigit():
        raise CronError(f"{expr!r}: {text!r} is not a number from {lo} to {hi}")
    v = int(text)
    if not lo <= v <= hi:
        raise CronError(f"{expr!r}: {v} is outside {lo}-{hi}")
    return v


def _field(text: str, lo: int, hi: int, names: dict[str, int], expr: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{expr!r}: empty list item")
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{expr!r}: bad step {step_text!r}")
            step = int(step_text)
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a_text, _, b_text = rng.partition("-")
            a, b = (_value(a_text, lo, hi, names, expr), _value(b_text, lo, hi, names, expr))
            if a > b:
                raise CronError(f"{expr!r}: range {rng!r} runs backwards")
        else:
            a = _value(rng, lo, hi, names, expr)
            b = hi if step_text else a
        out.update(range(a, b + 1, step))
    return frozenset(out)


class Cron:
    """One five-field cron expression."""

    def __init__(self, expr: str):
        text = ALIASES.get(expr.strip().lower(), expr.strip())
        parts = text.split()
        if len(parts) != 5:
            raise CronError(f"{expr!r}: a cron expression has 5 fields (minute hour "
                            "day-of-month month day-of-week)")
        self.expr = expr
        self.minutes = _field(parts[0], 0, 59, {}, expr)
        self.hours = _field(parts[1], 0, 23, {}, expr)
        self.mdays = _field(parts[2], 1, 31, {}, expr)
        self.months = _field(parts[3], 1, 12, _MONTHS, expr)
        dows = _field(parts[4], 0, 7, _DAYS, expr)
        self.wdays = frozenset(0 if d == 7 else d for d in dows)  # 0 = Sunday
        self.mday_any = parts[2].startswith("*")
        self.wday_any = parts[4].startswith("*")

    def day_matches(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        mday = d.day in self.mdays
        wday = (d.isoweekday() % 7) in self.wdays
        if self.mday_any or self.wday_any:
            return mday and wday
        return mday or wday


class CronSchedule:
    """One or more cron expressions evaluated in ``timezone``."""

    def __init__(self, crons: Sequence[str] | str, timezone: str = "UTC"):
        if isinstance(crons, str):
            crons = [crons]
        if not crons:
            raise CronError("no cron expression given")
        self.crons = [Cron(c) for c in crons]
        self.timezone = timezone
        self.tz = ZoneInfo(timezone)
        if self._scan(datetime(2001, 1, 1, tzinfo=UTC), forward=True) is None:
            raise CronError(f"{'; '.join(crons)!r} never fires")

    def _day_ticks(self, d: date) -> list[datetime]:
        """The ticks of local day ``d``, in UTC, ascending."""
        out: set[datetime] = set()
        for c in self.crons:
            if not c.day_matches(d):
                continue
            for h in c.hours:
                for m in c.minutes:
                    local = datetime(d.year, d.month, d.day, h, m, tzinfo=self.tz)
                    utc = local.astimezone(UTC)
                    back = utc.astimezone(self.tz)
                    if (back.hour, back.minute) != (h, m):
                        continue  # does not exist (spring forward)
                    out.add(utc)
        return sorted(out)

    def _scan(self, t: datetime, forward: bool) -> datetime | None:
        day = t.astimezone(self.tz).date()
        step = timedelta(days=1 if forward else -1)
        for _ in range(_HORIZON_DAYS):
            ticks = self._day_ticks(day)
            if forward:
                later = [x for x in ticks if x > t]
                if later:
                    return later[0]
            else:
                earlier = [x for x in ticks if x <= t]
                if earlier:
                    return earlier[-1]
            day += step
        return None

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t`` (UTC)."""
        found = self._scan(t.astimezone(UTC), forward=True)
        if found is None:  # pragma: no cover - excluded at construction
            raise CronError("the schedule never fires again")
        return found

    def latest_at_or_before(self, t: datetime) -> datetime | None:
        """The last tick at or before ``t`` (UTC), None when there is none in 5 years."""
        return self._scan(t.astimezone(UTC), forward=False)

    def run_end(self, scheduled: datetime, overlap_s: float = 0.0) -> datetime:
        """When the run started for tick ``scheduled`` stops taking snapshots: the next
        tick, or, after the last tick of a block (e.g. 15:59 before a night), as long
        after ``scheduled`` as the gap since the previous tick; plus ``overlap_s``."""
        scheduled = scheduled.astimezone(UTC)
        nxt = self.next_after(scheduled)
        prev = self.latest_at_or_before(scheduled - timedelta(microseconds=1))
        end = nxt if prev is None else min(nxt, scheduled + (scheduled - prev))
        return end + timedelta(seconds=overlap_s)

"""The registry of timeframes: one place that says what ``1m`` or ``1h`` means.

Each timeframe has a name (used in asset names, paths and SQL: ``bars_1h``), IB's bar size
string and the partition period its stored data is split by: monthly for seconds and minute
bars, yearly for hour and larger bars. Seconds bars were split by day until issue 15: a
file per symbol and day (375,000 files for 500 symbols over three years) made every listing,
view and rebuild pay per file; a month of 5-second bars (~100,000 rows, ~4 MB) is one file
with one row group per day (:mod:`ktrdr_pipeline.store.parquet`), as small on disk and
quicker to read a day from. ``ktrdr-pipeline migrate`` folds daily files written before
into their months.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from . import ib_rules

#: Partition windows are cut in this time zone (the pipeline's exchange-time edge).
PARTITION_TZ = "US/Eastern"
DEFAULT_TIMEFRAMES = ("1m", "5m", "15m", "1h", "1d")


@dataclass(frozen=True)
class Timeframe:
    name: str
    bar_size: str
    period: str  # "daily" | "monthly" | "yearly"

    @property
    def seconds(self) -> int:
        return ib_rules.BAR_SIZE_SECONDS[self.bar_size]

    @property
    def is_daily_or_larger(self) -> bool:
        return ib_rules.is_daily_or_larger(self.bar_size)

    @property
    def period_format(self) -> str:
        return {"daily": "%Y-%m-%d", "monthly": "%Y-%m", "yearly": "%Y"}[self.period]

    @property
    def tz(self) -> ZoneInfo:
        """Intraday periods are cut at midnight US/Eastern; daily and larger bars are keyed
        by session date (00:00 UTC), so their periods are cut in UTC."""
        return ZoneInfo("UTC" if self.is_daily_or_larger else PARTITION_TZ)

    def period_key(self, t: datetime | date) -> str:
        """The period (partition key) a bar or session date belongs to."""
        if isinstance(t, datetime):
            if t.tzinfo is None:
                raise ValueError("naive datetime: pass timezone-aware times")
            t = t.astimezone(self.tz)
        return t.strftime(self.period_format)

    def period_bounds(self, key: str) -> tuple[datetime, datetime]:
        """[start, end) of a period in UTC."""
        tz = self.tz
        try:
            if self.period == "daily":
                d = date.fromisoformat(key)
                start, end = d, d + timedelta(days=1)
            elif self.period == "monthly":
                y, m = (int(x) for x in key.split("-"))
                start = date(y, m, 1)
                end = date(y + (m == 12), m % 12 + 1, 1)
            else:
                y = int(key)
                start, end = date(y, 1, 1), date(y + 1, 1, 1)
        except ValueError:
            raise ValueError(f"invalid {self.period} period {key!r} for timeframe {self.name}; "
                             f"expected {self.period_format.replace('%', '')}") from None
        to_utc = lambda d: datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC)  # noqa: E731
        return to_utc(start), to_utc(end)

    def periods_between(self, start: datetime, end: datetime) -> list[str]:
        """Keys of the periods overlapping [start, end)."""
        keys: list[str] = []
        t = start
        while t < end:
            key = self.period_key(t)
            if not keys or keys[-1] != key:
                keys.append(key)
            t = self.period_bounds(key)[1]
        return keys


_ALL = [
    Timeframe("1s", "1 secs", "monthly"),
    Timeframe("5s", "5 secs", "monthly"),
    Timeframe("10s", "10 secs", "monthly"),
    Timeframe("15s", "15 secs", "monthly"),
    Timeframe("30s", "30 secs", "monthly"),
    Timeframe("1m", "1 min", "monthly"),
    Timeframe("2m", "2 mins", "monthly"),
    Timeframe("3m", "3 mins", "monthly"),
    Timeframe("5m", "5 mins", "monthly"),
    Timeframe("10m", "10 mins", "monthly"),
    Timeframe("15m", "15 mins", "monthly"),
    Timeframe("20m", "20 mins", "monthly"),
    Timeframe("30m", "30 mins", "monthly"),
    Timeframe("1h", "1 hour", "yearly"),
    Timeframe("2h", "2 hours", "yearly"),
    Timeframe("3h", "3 hours", "yearly"),
    Timeframe("4h", "4 hours", "yearly"),
    Timeframe("8h", "8 hours", "yearly"),
    Timeframe("1d", "1 day", "yearly"),
    Timeframe("1w", "1 week", "yearly"),
    Timeframe("1mo", "1 month", "yearly"),
]
TIMEFRAMES: dict[str, Timeframe] = {tf.name: tf for tf in _ALL}


def get_timeframe(name: str) -> Timeframe:
    """The timeframe ``name`` names, case-insensitively where that is unambiguous: ``1H`` is
    ``1h`` and ``1D`` is ``1d``, but a capital ``M`` alone (``1M``, ``5M``) is refused,
    since it reads as minutes to some and as months to others (``1m`` is one minute,
    ``1mo`` one month)."""
    text = name.strip()
    found = TIMEFRAMES.get(text)
    if found is not None:
        return found
    if text[:-1].isdigit() and text.endswith("M"):
        raise ValueError(f"ambiguous timeframe {name!r}: write {text[:-1]}m for minutes or "
                         f"{text[:-1]}mo for months; allowed: {', '.join(TIMEFRAMES)}")
    found = TIMEFRAMES.get(text.lower())
    if found is None:
        raise ValueError(f"unknown timeframe {name!r}; allowed: {', '.join(TIMEFRAMES)} "
                         "(case-insensitive but for a capital M)")
    return found

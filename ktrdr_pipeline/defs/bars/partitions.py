"""Partitions of the bar assets: symbol (dynamic, shared) × period (time windows)."""

from __future__ import annotations

import functools
from datetime import datetime

import dagster as dg

from ...domain.timeframes import PARTITION_TZ, Timeframe
from ...settings import DEFAULT_PARTITIONS_START

symbols_partitions = dg.DynamicPartitionsDefinition(name="symbols")


@functools.cache
def period_partitions(period: str, start: str) -> dg.PartitionsDefinition:
    """Daily, monthly or yearly windows in US/Eastern, the current one included."""
    if period == "daily":
        return dg.DailyPartitionsDefinition(start_date=start, timezone=PARTITION_TZ, end_offset=1)
    if period == "monthly":
        return dg.MonthlyPartitionsDefinition(start_date=start[:7], fmt="%Y-%m",
                                              timezone=PARTITION_TZ,
                                              end_offset=1)
    return dg.TimeWindowPartitionsDefinition(start=datetime(int(start[:4]), 1, 1), fmt="%Y",
                                             cron_schedule="0 0 1 1 *", timezone=PARTITION_TZ,
                                             end_offset=1)


def bar_partitions(tf: Timeframe,
                   start: str = DEFAULT_PARTITIONS_START) -> dg.MultiPartitionsDefinition:
    """Symbol × period from ``start`` (``KTRDR_PARTITIONS_START``, in the settings)."""
    return dg.MultiPartitionsDefinition({
        "symbol": symbols_partitions,
        "period": period_partitions(tf.period, start),
    })


def bar_partition_key(symbol: str, period: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"symbol": symbol, "period": period})


def symbol_period(key: str | dg.MultiPartitionKey) -> tuple[str, str]:
    """The (symbol, period) of a bar partition key: the object, or its text as run tags
    hold it (``"2025|AAPL"``: Dagster joins the values in sorted dimension order)."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
    else:
        values = key.split("|")
        if len(values) != 2:
            raise ValueError(f"not a bar partition key: {key!r}; expected 'PERIOD|SYMBOL'")
        dims = dict(zip(("period", "symbol"), values, strict=True))
    return dims["symbol"], dims["period"]

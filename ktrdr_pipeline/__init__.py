"""ktrdr-pipeline: Interactive Brokers historical bars as validated, partitioned Parquet.

For research: ``ktrdr_pipeline.read_bars(symbol, timeframe, start, end)`` and
``ktrdr_pipeline.latest_bars(timeframe, n)`` (see :mod:`ktrdr_pipeline.store.read`),
imported on first use so that the command line does not pay for pyarrow and pandas.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["latest_bars", "read_bars"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .store import read

        return getattr(read, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

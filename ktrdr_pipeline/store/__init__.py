"""Bar storage: Hive-partitioned Parquet files, their validation schema and a DuckDB catalog.

- :mod:`.parquet`: :class:`~.parquet.BarStore`, atomic per-partition Parquet files under
  ``data_dir/bars/timeframe=<tf>/symbol=<SYM>/period=<key>/data.parquet``.
- :mod:`.manifest`: the partition manifest (``data_dir/manifest.sqlite``): one row per
  partition (rows, first/last bar, fetch state, file size), kept by every write, repaired
  and rebuilt from the files; what ``coverage``, ``ranges`` and the sensor read.
- :mod:`.contents`: the manifest's answers for fast-starting readers (``read_entries``:
  each partition's file; ``read_coverage``), without pandas or pyarrow.
- :mod:`.locks`: :class:`~.locks.PartitionLock`, the write lock of one partition, and its
  one-machine implementation :class:`~.locks.FilePartitionLock` (``flock`` files).
- :mod:`.schema`: the pandera schema of a bar frame and the checks the asset checks reuse.
- :mod:`.catalog`: DuckDB views over the Parquet files (``bars``, ``bars_<tf>``,
  ``coverage``), the ``catalog.duckdb`` file for external tools and read-only queries.
- :mod:`.files`: which files hold a timeframe's, a symbol's, a period's bars (the seam for
  the partition manifest).
- :mod:`.read`: ``read_bars`` / ``latest_bars``, bars into pandas or Arrow for research.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BarStore", "FilePartitionLock", "PartitionLock"]


def __getattr__(name: str) -> Any:
    # imported on first use: the `sql` command reaches store.catalog without pandas
    if name == "BarStore":
        from .parquet import BarStore

        return BarStore
    if name in ("FilePartitionLock", "PartitionLock"):
        from . import locks

        return getattr(locks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

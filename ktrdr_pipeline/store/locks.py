"""Write locks of bar partitions: the writers of one partition take turns.

A load reads a partition, fetches what is missing from IB (slowly), then merges its bars
with what is stored and writes the result. Two writers of one partition (two CLI loads of
different windows of a month, a Dagster run and the CLI, two Dagster runs) would each
merge onto what they read *before* their fetch, and the last rename would drop the other's
bars. So the merge-validate-write step runs under the partition's lock and re-reads the
partition first (:meth:`~.parquet.BarStore.locked`); the fetch holds no lock.

:class:`PartitionLock` is the small interface a :class:`~.parquet.BarStore` needs;
:class:`FilePartitionLock` implements it with ``flock`` files, which serialise processes on
one machine (and threads: each hold opens its own file description). A store spanning
machines (a network file system, object storage) plugs in a shared lock instead (a
database row lock, a lease in a key-value store) behind the same ``hold``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..locking import FileLockTimeout, exclusive_file_lock

log = logging.getLogger(__name__)

LOCK_DIR = "locks"


@runtime_checkable
class PartitionLock(Protocol):
    """Mutual exclusion of the writers of one partition (timeframe × symbol × period).

    ``hold`` blocks until no other holder (in any process using the same store) holds the
    partition and keeps it for the ``with`` block (an implementation may give up with a
    ``TimeoutError``). It need not be re-entrant (:class:`~.parquet.BarStore`
    does not take a lock it already holds). Arguments are validated by the store before
    they reach the lock."""

    def hold(self, timeframe: str, symbol: str, period: str) -> AbstractContextManager[object]:
        ...


class FilePartitionLock:
    """:class:`PartitionLock` by ``flock`` on
    ``data_dir/locks/bars/timeframe=<tf>/symbol=<SYM>/period=<key>.lock``.

    The lock files live outside ``bars/`` so the partition directories hold only their
    data (a listing, the DuckDB glob and an emptied directory's removal never see them);
    they are never deleted (unlinking a lock file another process is about to lock would
    let two holders in). A holder killed by ``kill -9`` releases its lock with its file
    descriptors. A holder keeps the lock only to re-read, merge, validate and write one
    partition (well under a second for a month of minutes), so a writer waits for it as
    long as it takes (saying so at INFO), or up to ``timeout_s`` when given
    (:class:`~ktrdr_pipeline.locking.FileLockTimeout`)."""

    def __init__(self, data_dir: Path | str, *, timeout_s: float | None = None):
        self.root = Path(data_dir) / LOCK_DIR / "bars"
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"FilePartitionLock({str(self.root)!r})"

    def path(self, timeframe: str, symbol: str, period: str) -> Path:
        """The lock file of the partition (validated names only)."""
        return (self.root / f"timeframe={timeframe}" / f"symbol={symbol}"
                / f"period={period}.lock")

    @contextlib.contextmanager
    def hold(self, timeframe: str, symbol: str, period: str) -> Iterator[None]:
        path = self.path(timeframe, symbol, period)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_file_lock(path, timeout_s=0))
            except FileLockTimeout:
                log.info("%s %s %s: another writer holds the partition; waiting for it",
                         symbol, timeframe, period)
                stack.enter_context(exclusive_file_lock(path, timeout_s=self.timeout_s))
            yield

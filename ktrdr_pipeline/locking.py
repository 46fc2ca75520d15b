"""File locks and retries on locked databases: I/O plumbing shared by every store.

- :func:`exclusive_file_lock`: an exclusive ``flock`` on a file for the length of a
  ``with`` block, waiting for ever or up to a deadline. Processes sharing a data directory
  take turns (the Greeks tick claims, the Greeks outage buffer, the writers of one bar
  partition); so do two opens of the file within one process, so callers
  that nest (one thread re-entering) guard with a thread lock of their own.
- :func:`retry_while_locked`: run a function again, with backoff, while a database file is
  held by another process, up to a deadline. DuckDB lets one process at a time open a file
  read-write (and then nobody else, not even read-only); SQLite refuses a mode change or a
  write while another connection holds its lock. The predicates :func:`is_duckdb_locked`
  and :func:`is_sqlite_locked` tell such refusals from real errors, which are raised at
  once (a missing file is not waited for).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

try:  # POSIX; elsewhere the lock is a no-op (one process per data directory)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")


class FileLockTimeout(TimeoutError):
    """Another holder kept a file lock longer than the caller was willing to wait."""


@contextlib.contextmanager
def exclusive_file_lock(path: Path | str, *, timeout_s: float | None = None) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its directory, if missing)
    until the block ends. Waits as long as another holder keeps it, or, with
    ``timeout_s``, up to that long (polling with backoff) before raising
    :class:`FileLockTimeout` naming the file. Yields the open file descriptor, so the
    caller may read and write the locked file itself. A holder that dies (even by
    ``kill -9``) releases the lock: the kernel drops it with the process's descriptors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            if timeout_s is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                try:
                    retry_while_locked(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
                                       deadline_s=timeout_s,
                                       is_locked=lambda e: isinstance(e, BlockingIOError),
                                       first_delay_s=0.005, max_delay_s=0.05)
                except BlockingIOError:
                    raise FileLockTimeout(f"{path} stayed locked by another holder for more "
                                          f"than {timeout_s:g} s") from None
        yield fd
    finally:
        os.close(fd)  # releases the flock


def is_duckdb_locked(exc: BaseException) -> bool:
    """Whether DuckDB refused a file because another process holds its lock
    (``IO Error: Could not set lock on file ...: Conflicting lock is held in ...``)."""
    duckdb = sys.modules.get("duckdb")  # not imported: ``exc`` cannot be one of its errors
    if duckdb is None or not isinstance(exc, duckdb.Error):
        return False
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


def is_sqlite_locked(exc: BaseException) -> bool:
    """Whether SQLite refused because another connection holds the database's lock
    (``database is locked``, ``database table is locked``)."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def retry_while_locked(
    fn: Callable[[], T],
    *,
    deadline_s: float,
    is_locked: Callable[[BaseException], bool],
    on_retry: Callable[[BaseException, float], object] | None = None,
    first_delay_s: float = 0.01,
    max_delay_s: float = 0.1,
    sleep: Callable[[float], object] | None = None,
    monotonic: Callable[[], float] | None = None,
) -> T:
    """``fn()``, called again while it fails with an error ``is_locked`` recognises.

    Waits ``first_delay_s`` before the second call, doubling up to ``max_delay_s``; gives
    up when the next wait would end after ``deadline_s`` seconds from the first call and
    raises the last error. Any other error is raised at once. ``on_retry(exc, delay)`` is
    called before each wait (e.g. to log it). ``sleep``/``monotonic`` default to this
    module's ``time`` at call time (tests replace either)."""
    sleep = sleep or time.sleep
    monotonic = monotonic or time.monotonic
    deadline = monotonic() + deadline_s
    delay = first_delay_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_locked(exc) or monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
        sleep(delay)
        delay = min(delay * 2, max_delay_s)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as alive until reaped);
    used to tell a dead writer's lease, intent or temporary file from a live one's."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True

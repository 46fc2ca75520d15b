"""The project's file lock and its retry on locked databases (ktrdr_pipeline.locking)."""

from __future__ import annotations

import os
import queue
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pytest

from ktrdr_pipeline.locking import (
    exclusive_file_lock,
    is_duckdb_locked,
    is_sqlite_locked,
    retry_while_locked,
)

from .test_greeks_store import Holder

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # generous: the machine may be busy; nothing here waits this long normally


class Other:
    """Another process taking ``exclusive_file_lock(path)``; it reports each step on
    stdout and lets go when told to (a line on stdin)."""

    def __init__(self, path: Path):
        code = textwrap.dedent("""
            import sys
            from ktrdr_pipeline.locking import exclusive_file_lock
            print("trying", flush=True)
            with exclusive_file_lock(sys.argv[1]):
                print("acquired", flush=True)
                sys.stdin.readline()
            print("released", flush=True)
        """)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, what: str) -> None:
        assert self.lines.get(timeout=WAIT_S) == what

    def let_go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)


def _blocked_in_flock(pid: int) -> bool:
    """Whether the kernel lists ``pid`` as waiting for a ``flock`` (``->`` in /proc/locks)."""
    with open("/proc/locks") as fh:
        return any("->" in line and " FLOCK " in line and f" {pid} " in line for line in fh)


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
def test_a_second_process_waits_until_the_first_lets_go(tmp_path):
    import fcntl

    path = tmp_path / "claims" / "x.lock"  # its directory does not exist yet
    other: Other | None = None
    try:
        with exclusive_file_lock(path) as fd:
            os.pwrite(fd, b"mine", 0)  # the caller may use the locked file itself
            other = Other(path)
            other.expect("trying")
            _wait_for(lambda: _blocked_in_flock(other.proc.pid), "the other process to block")
            assert other.lines.empty()  # it has not got the lock
        other.expect("acquired")  # as soon as we let go
        # now it holds the lock: here the file cannot be locked without waiting
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            other.let_go()
            other.expect("released")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
        finally:
            os.close(fd)
    finally:
        if other is not None:
            other.close()
    assert path.read_bytes() == b"mine"


# -- retry_while_locked -----------------------------------------------------------------------
class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Locked(Exception):
    pass


def _is_locked(exc: BaseException) -> bool:
    return isinstance(exc, Locked)


def test_retry_calls_again_with_backoff_until_it_works():
    clock, calls, retries = FakeTime(), [], []

    def fn() -> str:
        calls.append(clock.now)
        if len(calls) < 4:
            raise Locked("held elsewhere")
        return "open"

    got = retry_while_locked(fn, deadline_s=5.0, is_locked=_is_locked, max_delay_s=0.03,
                             on_retry=lambda exc, delay: retries.append((str(exc), delay)),
                             sleep=clock.sleep, monotonic=clock.monotonic)
    assert got == "open"
    assert clock.sleeps == [0.01, 0.02, 0.03]  # doubling, capped
    assert retries == [("held elsewhere", 0.01), ("held elsewhere", 0.02),
                       ("held elsewhere", 0.03)]


def test_retry_gives_up_at_the_deadline_with_the_last_error():
    clock = FakeTime()
    n = [0]

    def fn() -> None:
        n[0] += 1
        raise Locked(f"attempt {n[0]}")

    with pytest.raises(Locked, match="attempt 4"):
        retry_while_locked(fn, deadline_s=0.1, is_locked=_is_locked, max_delay_s=1.0,
                           sleep=clock.sleep, monotonic=clock.monotonic)
    assert clock.sleeps == [0.01, 0.02, 0.04]  # a wait of 0.08 more would pass 0.1 s
    assert clock.now <= 0.1


def test_retry_raises_any_other_error_at_once():
    clock = FakeTime()

    def fn() -> None:
        raise FileNotFoundError("no such database")

    with pytest.raises(FileNotFoundError):
        retry_while_locked(fn, deadline_s=5.0, is_locked=_is_locked, sleep=clock.sleep,
                           monotonic=clock.monotonic)
    assert clock.sleeps == []


def test_duckdb_lock_errors_are_recognised_and_waited_out(tmp_path):
    db = tmp_path / "held.duckdb"
    duckdb.connect(str(db)).close()
    with Holder(db) as holder:
        with pytest.raises(duckdb.Error) as err:
            duckdb.connect(str(db), read_only=True)
        assert is_duckdb_locked(err.value) and not is_sqlite_locked(err.value)

        def release_on_first_retry(exc: BaseException, delay: float) -> None:
            holder.release()  # returns once the holder has exited

        con = retry_while_locked(lambda: duckdb.connect(str(db), read_only=True),
                                 deadline_s=WAIT_S, is_locked=is_duckdb_locked,
                                 on_retry=release_on_first_retry)
        assert con.execute("SELECT 1").fetchone() == (1,)
        con.close()
    # a missing database is not a lock: it fails at once
    with pytest.raises(duckdb.Error) as err:
        duckdb.connect(str(tmp_path / "absent.duckdb"), read_only=True)
    assert not is_duckdb_locked(err.value)
    assert not is_duckdb_locked(ValueError("Could not set lock on file: Conflicting lock"))


def test_sqlite_lock_errors_are_recognised(tmp_path):
    path = tmp_path / "ledger.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as err:
            other.execute("BEGIN IMMEDIATE")
        assert is_sqlite_locked(err.value) and not is_duckdb_locked(err.value)
        holder.execute("COMMIT")
        with pytest.raises(sqlite3.OperationalError) as err:
            other.execute("SELECT * FROM missing")
        assert not is_sqlite_locked(err.value)
    finally:
        holder.close()
        other.close()

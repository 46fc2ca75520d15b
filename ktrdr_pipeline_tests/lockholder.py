"""Another process holding a DuckDB file open read-write (as DBeaver would), driven over
pipes: tests wait for the state they need ("it holds the file", "it let go"), each with a
deadline that fails with a clear message, and never for a fixed time."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

#: The holder: takes the file (retrying while a writer of the test holds it for a
#: moment), says "locked", holds until a line arrives on stdin, closes, says "released".
_HOLDER = textwrap.dedent("""
    import sys, time, duckdb
    path, patience = sys.argv[1], float(sys.argv[2])
    deadline = time.monotonic() + patience
    while True:
        try:
            con = duckdb.connect(path)
            con.execute("SELECT 1").fetchall()
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                print("failed:", " ".join(str(exc).split()), flush=True)
                sys.exit(1)
            time.sleep(0.01)
    print("locked", flush=True)
    sys.stdin.readline()
    con.close()
    print("released", flush=True)
""")


class DuckDBLockHolder:
    """Holds ``db`` read-write in a child process from construction until :meth:`release`.

    The constructor returns only once the child holds the file; ``patience`` is how long
    the child keeps trying while someone else holds it, ``deadline`` how long the test
    waits for each state before failing.
    """

    def __init__(self, db: Path, *, patience: float = 60.0, deadline: float = 90.0):
        self.db = Path(db)
        self.deadline = deadline
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(self.db), str(patience)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="lock-holder-stdout").start()
        self._await("locked", f"take {self.db}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)  # the child closed its stdout (it exited)

    def _await(self, expected: str, what: str) -> None:
        try:
            line = self._lines.get(timeout=self.deadline)
        except queue.Empty:
            self.kill()
            raise AssertionError(f"the lock holder did not {what} within {self.deadline:g} s"
                                 ) from None
        if line != expected:
            self.kill()
            raise AssertionError(f"the lock holder did not {what}: it said {line!r} "
                                 f"(exit status {self.proc.poll()})")

    def holding(self) -> bool:
        """True while the child holds the file: it lets go only when told to."""
        return self.proc.poll() is None and self._lines.empty()

    def release(self) -> None:
        """Tell the child to close the file; return once it has, and has exited."""
        if self.proc.poll() is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self._await("released", f"release {self.db}")
        try:
            code = self.proc.wait(self.deadline)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the lock holder released {self.db} but did not exit "
                                 f"within {self.deadline:g} s") from None
        assert code == 0, f"the lock holder exited with status {code}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> DuckDBLockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.release()
        finally:
            self.kill()

"""Running Dagster's webserver and daemon (and the simulator) as child processes, and
talking to the webserver's GraphQL API: shared by the demo and the end-to-end tests.

Every child runs in its own session (process group), so that stopping it also stops the
code servers and run workers it started; :meth:`Processes.stop` reports, from ``/proc``,
whatever outlived SIGTERM before it kills it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCATION_QUERY = """query { workspaceOrError { __typename
  ... on Workspace { locationEntries { name loadStatus
      locationOrLoadError { __typename ... on PythonError { message } } } }
  ... on PythonError { message } } }"""


def free_port() -> int:
    """A TCP port nothing listens on now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 by a server: with ``SO_REUSEADDR``, as
    servers bind (uvicorn, dagster-webserver), so a port whose last connections are still
    in TIME-WAIT after a quick restart counts as free and the UI keeps its address."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def bin_path(name: str) -> str | None:
    """The executable ``name`` next to this Python (the virtualenv's), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path.name}: no output)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text)


class Processes:
    """Child processes, each in its own process group, logging to ``log_dir/<name>.log``
    and stopped together."""

    def __init__(self, log_dir: Path, cwd: Path | None = None):
        self.log_dir = log_dir
        self.cwd = cwd
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str],
              stdout_pipe: bool = False) -> subprocess.Popen:
        """Start ``argv``; ``stdout_pipe`` keeps its stdout readable (stderr to the log)."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(argv, cwd=self.cwd, env=env,
                                    stdout=subprocess.PIPE if stdout_pipe else log,
                                    stderr=log if stdout_pipe else subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc

    def tails(self) -> str:
        """The end of every log, for an error message."""
        return "\n".join(log_tail(p) for p in sorted(self.log_dir.glob("*.log")))

    def group_members(self) -> dict[str, list[int]]:
        """Live (non-zombie) processes in each started process group, from /proc."""
        pgids = {proc.pid: name for name, proc in self.procs}
        live: dict[str, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            state, pgrp = fields[0], int(fields[2])
            if pgrp in pgids and state != "Z":
                live.setdefault(pgids[pgrp], []).append(int(stat.parent.name))
        return live

    def stop(self, timeout_s: float = 30) -> dict[str, list[int]]:
        """SIGTERM every group, newest first (the daemon and the webserver shut their code
        servers and run workers down), wait, then SIGKILL what is left. Returns what
        SIGTERM left alive (empty where ``/proc`` is missing)."""
        for _, proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        procfs = Path("/proc").is_dir()
        leftovers = self.group_members() if procfs else {}
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.5)
            leftovers = self.group_members()
        for _, proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()
        # SIGKILL is delivered asynchronously: return once the groups are really gone
        settle = time.monotonic() + 5
        while procfs and self.group_members() and time.monotonic() < settle:
            time.sleep(0.05)
        return leftovers


class GraphQLError(RuntimeError):
    """The webserver answered a GraphQL request with errors."""


class GraphQL:
    """The Dagster webserver's GraphQL endpoint on 127.0.0.1:``port``."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, variables: dict[str, Any] | None = None,
                 timeout: float = 30) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # validation errors come as 400
            raise GraphQLError(f"GraphQL {exc.code}: {exc.read().decode()[:2000]}") from None
        if payload.get("errors"):
            raise GraphQLError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def wait_ready(self, timeout_s: float, alive: Callable[[], bool] | None = None) -> None:
        """Wait until every code location is loaded; ``RuntimeError`` when one failed to
        load, the webserver exited (``alive``) or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError("dagster-webserver exited during start-up")
            try:
                data = self(LOCATION_QUERY, timeout=5)["workspaceOrError"]
                entries = data.get("locationEntries") or []
                last = entries or data
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    bad = [e for e in entries
                           if e["locationOrLoadError"]["__typename"] != "RepositoryLocation"]
                    if bad:
                        raise RuntimeError(f"the code location failed to load: {bad}")
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError,
                    GraphQLError) as exc:
                last = exc
            time.sleep(0.5)
        raise RuntimeError(f"dagster-webserver not ready after {timeout_s:.0f} s ({last!r})")

"""Child-process handling shared by the demo and the end-to-end tests."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from ktrdr_pipeline.services import GraphQL, Processes, free_port, port_free, port_open

#: A child that starts a grandchild ignoring SIGTERM in the same process group.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # polite itself, whatever it inherited
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
subprocess.Popen([sys.executable, "-c",
                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('grandchild', flush=True); time.sleep(60)"])
print('child', flush=True)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.slow  # the grace period is long enough for a loaded machine: 10 s
def test_stop_reports_and_kills_what_outlives_sigterm(tmp_path: Path) -> None:
    """What SIGTERM leaves alive after the grace period is reported and killed (the
    stubborn grandchild, which ignores SIGTERM, uses all of the 10 s grace period)."""
    procs = Processes(tmp_path)
    # a child inherits an ignored or blocked SIGTERM from whatever ran the test (a test
    # worker's state): the polite process restores the default, as a fresh program has
    polite = procs.start("polite", [sys.executable, "-u", "-c", (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM]); "
        "print('up'); time.sleep(60)")], dict(os.environ), stdout_pipe=True)
    assert polite.stdout is not None and polite.stdout.readline() == b"up\n"
    stubborn = procs.start("stubborn", [sys.executable, "-u", "-c", STUBBORN],
                           dict(os.environ), stdout_pipe=True)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"child\n"
    assert stubborn.stdout.readline() == b"grandchild\n"
    assert set(procs.group_members()) == {"polite", "stubborn"}
    left = procs.stop(timeout_s=10)
    assert list(left) == ["stubborn"] and len(left["stubborn"]) == 1  # the grandchild
    assert procs.group_members() == {}  # killed afterwards
    assert polite.returncode is not None and stubborn.returncode is not None


def test_ports() -> None:
    port = free_port()
    assert port_free(port) and not port_open(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert port_open(port) and not port_free(port)


def test_graphql_wait_ready_gives_up_clearly() -> None:
    with pytest.raises(RuntimeError, match="exited during start-up"):
        GraphQL(free_port()).wait_ready(5, alive=lambda: False)
    with pytest.raises(RuntimeError, match="not ready after 1 s"):
        GraphQL(free_port()).wait_ready(1)


def test_a_port_in_time_wait_after_a_quick_restart_counts_as_free():
    """A server that closed its connections first leaves them in TIME-WAIT; a new server
    (binding with SO_REUSEADDR, as uvicorn and dagster-webserver do) can take the port at
    once, so the UI keeps port 3000 across a quick restart of the demo."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end goes to TIME-WAIT
        client.recv(1)
        client.close()
    with socket.socket() as plain:  # what the old probe did: refused while TIME-WAIT lasts
        try:
            plain.bind(("127.0.0.1", port))
            in_time_wait = False
        except OSError:
            in_time_wait = True
    assert in_time_wait, "the test did not produce a TIME-WAIT socket"
    assert port_free(port)

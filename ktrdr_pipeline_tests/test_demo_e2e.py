"""The README's main command end to end: `ktrdr-pipeline demo` starts the simulator, the
Dagster webserver and daemon, backfills; Ctrl-C stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ktrdr_pipeline.services import GraphQL, free_port, port_open

from .conftest import wait_until
from .test_e2e_dagster import BACKFILL_STATUS, CHECK_EXECUTIONS, MATERIALIZATIONS


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if text in cmdline or text.encode() in environ:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


@pytest.mark.slow
def test_demo_command_backfills_and_stops_cleanly(tmp_path):
    data_dir = tmp_path / "demo-data"
    ib_port, ui_port = free_port(), free_port()
    env = {**os.environ, "KTRDR_DATA_DIR": str(data_dir), "IB_PORT": str(ib_port),
           "KTRDR_RESET_WINDOW": "off", "PYTHONUNBUFFERED": "1"}
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.Popen([sys.executable, "-m", "ktrdr_pipeline.cli", "demo", "--ui-port",
                             str(ui_port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        backfill_id = None
        deadline = time.monotonic() + 240
        while backfill_id is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"demo exited early: {lines}")
            lines.append(line)
            match = re.match(r"backfill (\S+):", line)
            backfill_id = match.group(1) if match else None
        assert any(f"Dagster UI: http://127.0.0.1:{ui_port}" in x for x in lines), lines
        assert backfill_id, lines
        gql = GraphQL(ui_port)
        status = None
        while time.monotonic() < deadline:
            status = gql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"][
                "status"]
            if status not in ("REQUESTED", "CANCELING", "FAILING"):
                break
            time.sleep(2)
        assert status == "COMPLETED_SUCCESS", status
        checks = gql(CHECK_EXECUTIONS, {"key": {"path": ["bars_1h"]}, "name": "ohlc_valid"})
        done = [e for e in checks["assetCheckExecutions"] if e["evaluation"]]
        assert done and all(e["evaluation"]["success"] for e in done)  # every run checked
        mats = gql(MATERIALIZATIONS, {"key": {"path": ["bars_1h"]}})["assetOrError"][
            "assetMaterializations"]
        year = str(datetime.now(UTC).year)
        assert {f"{year}|{s}" for s in ("AAPL", "SPY", "EURUSD")} <= {m["partition"]
                                                                     for m in mats}
        assert (data_dir / "dagster" / "dagster.yaml").exists()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "stopped" in rest
        # the demo returned once its children were gone; /proc may still list one that is
        # being reaped for a moment: wait for the state, with a deadline
        wait_until(lambda: not _processes_mentioning(str(data_dir)),
                   f"processes left behind: {_processes_mentioning(str(data_dir))}", 10)
        assert not port_open(ui_port) and not port_open(ib_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in _processes_mentioning(str(data_dir)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)

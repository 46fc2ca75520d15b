"""The one-command demo: simulator, Dagster webserver and daemon, a backfill.

``ktrdr-pipeline demo`` (the README's first command) sets up and starts, on 127.0.0.1:

1. the IB Gateway simulator (``IB_PORT``, or a free port when that one is taken);
2. a Dagster instance in ``KTRDR_DATA_DIR/dagster`` (``DAGSTER_HOME``) with a
   ``dagster.yaml`` that queues runs and limits the ``ib_api`` pool, a small universe
   (``KTRDR_DATA_DIR/universe.yaml``) and its ``symbols`` partitions;
3. ``dagster-webserver``;
4. an initial backfill of the current year's hourly and daily bars, launched through the
   webserver's GraphQL API;
5. ``dagster-daemon`` (sensors and schedules keep the data fresh), started after the
   backfill is recorded so that their first ticks leave its partitions to it;

then prints the UI address. Ctrl-C stops everything and leaves no process behind. Running
it again reuses what is stored: complete partitions cost no IB request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import urllib.error
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from .services import GraphQL, Processes, bin_path, free_port, port_free
from .settings import UNIVERSE_FILE, Settings, environment
from .simulator.server import GatewayServer

log = logging.getLogger(__name__)

DEMO_UNIVERSE = """\
# The demo's universe: the symbols sensor keeps the 'symbols' partitions in line with it;
# `ktrdr-pipeline symbols add/remove` and partitions added in the Dagster UI edit it.
symbols:
  - AAPL
  - SPY
  - EURUSD
"""
DAGSTER_YAML = """\
# Written by `ktrdr-pipeline demo`. Runs wait in the queue (never fail) when the run limit
# or the ib_api pool is full: IB-bound runs share one machine-wide pacing budget anyway.
concurrency:
  runs:
    max_concurrent_runs: 2
  pools:
    default_limit: 2
    granularity: op
telemetry:
  enabled: false
"""
DEMO_ASSETS = ("bars_1h", "bars_1d")

LAUNCH = """mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
STATUS = """query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename ... on PartitionBackfill { status numPartitions }
  }
}"""
def _bin(name: str) -> str:
    return bin_path(name) or name


def prepare_home(data_dir: Path, universe_file: Path | None = None) -> Path:
    """The demo's Dagster home and, unless ``KTRDR_UNIVERSE`` (``universe_file``) names
    one, its universe file."""
    home = data_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(DAGSTER_YAML)
    universe = data_dir / UNIVERSE_FILE
    if not universe.exists() and universe_file is None:
        universe.write_text(DEMO_UNIVERSE)
    return home


def register_symbols(universe_file: Path, home: Path) -> list[str]:
    """Add the universe's symbols as partitions now, so the backfill can name them."""
    import dagster as dg

    from .universe import load_universe

    universe = load_universe(universe_file)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        existing = set(instance.get_dynamic_partitions("symbols"))
        new = [k for k in universe.keys if k not in existing]
        if new:
            instance.add_dynamic_partitions("symbols", new)
    return universe.keys


async def run_demo(settings: Settings, out: TextIO = sys.stdout, forever: bool = True,
                   ui_port: int | None = None) -> int:
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    home = prepare_home(data_dir, settings.universe_file)
    gw = None
    for port in (settings.ib_port, 0):
        candidate = GatewayServer("127.0.0.1", port, latency="realistic", admin_port=0)
        try:
            gw = await candidate.start()
            break
        except OSError:
            log.warning("port %d is taken; the simulator takes a free port instead", port)
    if gw is None:
        raise RuntimeError("cannot start the IB Gateway simulator")
    out.write(f"IB Gateway simulator on 127.0.0.1:{gw.port} (admin 127.0.0.1:{gw.admin_port})\n")
    universe = settings.universe_file or data_dir / UNIVERSE_FILE
    symbols = register_symbols(universe, home)
    ui_port = ui_port or (3000 if port_free(3000) else free_port())
    env = {**environment(), "DAGSTER_HOME": str(home), "KTRDR_DATA_DIR": str(data_dir),
           "IB_HOST": "127.0.0.1", "IB_PORT": str(gw.port)}
    procs = Processes(home)
    try:
        web = procs.start("webserver", [_bin("dagster-webserver"), "-m",
                                        "ktrdr_pipeline.definitions", "-h", "127.0.0.1", "-p",
                                        str(ui_port)], env)
        gql = GraphQL(ui_port)
        await asyncio.to_thread(gql.wait_ready, 180, lambda: web.poll() is None)
        year = str(datetime.now(UTC).year)
        keys = [f"{year}|{s}" for s in symbols]
        # The backfill is recorded before the daemon starts: the sensors' and schedules'
        # first ticks see it in progress and leave its partitions to it.
        launched = gql(LAUNCH, {"params": {
            "assetSelection": [{"path": [a]} for a in DEMO_ASSETS], "partitionNames": keys,
            "title": "ktrdr demo: initial backfill"}})["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"backfill not launched: {launched}")
        backfill_id = launched["backfillId"]
        procs.start("daemon", [_bin("dagster-daemon"), "run", "-m", "ktrdr_pipeline.definitions"],
                    env)
        out.write(f"Dagster UI: http://127.0.0.1:{ui_port}\n")
        out.write(f"backfill {backfill_id}: {', '.join(DEMO_ASSETS)} for {', '.join(keys)}\n")
        out.write(f"data in {data_dir}; query it with: .venv/bin/ktrdr-pipeline sql "
                  f"\"SELECT * FROM coverage\"\n")
        out.write("press Ctrl-C to stop everything\n")
        out.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        status = await _watch(gql, backfill_id, stop, out, forever)
        if forever:
            await stop.wait()
        return 0 if status in ("COMPLETED", "COMPLETED_SUCCESS") or forever else 1
    finally:
        out.write("stopping the webserver, the daemon and the simulator...\n")
        out.flush()
        left = await asyncio.to_thread(procs.stop)
        if left:
            log.warning("killed what outlived SIGTERM: %s", left)
        await gw.stop()
        out.write("stopped\n")
        out.flush()


async def _watch(gql: GraphQL, backfill_id: str, stop: asyncio.Event, out: TextIO,
                 forever: bool) -> str:
    """Report when the backfill ends (or stop waiting on Ctrl-C)."""
    status = "REQUESTED"
    while not stop.is_set():
        try:
            result = await asyncio.to_thread(gql, STATUS, {"id": backfill_id})
            status = result["partitionBackfillOrError"].get("status", status)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            log.warning("cannot read the backfill status: %s", exc)
        if status not in ("REQUESTED", "CANCELING", "FAILING"):
            out.write(f"initial backfill {status.lower()}\n")
            out.flush()
            return status
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 2)
    return status


def demo_settings() -> Settings:
    settings = Settings.from_env()
    return dataclasses.replace(settings, ib_host="127.0.0.1")

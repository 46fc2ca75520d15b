"""The one-command demo: the embedded IB Gateway simulator and a first load.

Starts the simulator on 127.0.0.1 (``IB_PORT``, or a free port when that one is taken),
loads recent bars for a small universe into ``KTRDR_DATA_DIR`` through exactly the code the
Dagster assets use (planner, pacing governor, gap-aware loader, Parquet store), shows the
catalog's coverage, and keeps the simulator running until Ctrl-C so Dagster, the CLI
(``ktrdr-pipeline sql``, ``load``, ``status``) and notebooks can use it. Running it again
reuses what is stored and fetches only what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from datetime import timedelta
from typing import TextIO

from . import commands
from .gateway.server import GatewayServer
from .loader import PipelineContext
from .settings import Settings
from .store.catalog import query, refresh_catalog

log = logging.getLogger(__name__)

DEMO_SYMBOLS = ("AAPL", "SPY", "EURUSD")
DEMO_LOADS = (("1h", 30), ("1d", 365))  # timeframe, days of history


async def _start_gateway(settings: Settings) -> GatewayServer:
    for port in (settings.ib_port, 0):
        gw = GatewayServer("127.0.0.1", port, latency="realistic", admin_port=0)
        try:
            return await gw.start()
        except OSError:
            log.warning("port %d is taken; the simulator takes a free port instead", port)
    raise RuntimeError("cannot start the gateway simulator")


async def run_demo(settings: Settings, out: TextIO = sys.stdout, forever: bool = True) -> int:
    gw = await _start_gateway(settings)
    out.write(f"IB Gateway simulator listening on 127.0.0.1:{gw.port} "
              f"(admin 127.0.0.1:{gw.admin_port})\n")
    settings = dataclasses.replace(settings, ib_host="127.0.0.1", ib_port=gw.port)
    ctx = PipelineContext.from_settings(settings)
    try:
        await ctx.connection.connect()
        today = ctx.clock().date()
        for tf, days in DEMO_LOADS:
            for symbol in DEMO_SYMBOLS:
                summary = await commands.load(ctx, symbol, tf, "tail",
                                              start=today - timedelta(days=days))
                out.write(f"  {summary.symbol:7} {tf:3} {summary.start}..{summary.end}: "
                          f"{summary.cached_before:5d} stored, {summary.ib_requests_made:3d} "
                          f"IB requests, {summary.fetched_bars:5d} bars fetched\n")
                out.flush()
    finally:
        await ctx.close()
    refresh_catalog(settings.data_dir)
    out.write(query(settings.data_dir, "SELECT * FROM coverage ORDER BY timeframe, symbol"))
    out.write(f"\nstored under {settings.data_dir.resolve()}; try:\n"
              f"  .venv/bin/ktrdr-pipeline sql \"SELECT symbol, max(ts) FROM bars_1h "
              f"GROUP BY symbol\"\n")
    if not forever:
        await gw.stop()
        return 0
    out.write(f"the simulator keeps running on 127.0.0.1:{gw.port}; press Ctrl-C to stop\n")
    out.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await gw.stop()
    out.write("stopped\n")
    return 0

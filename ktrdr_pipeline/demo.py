"""The one-command demo: the embedded IB Gateway simulator and a first download.

Starts the simulator on 127.0.0.1 (``IB_PORT``, or a free port when that one is taken),
connects to it exactly as to a real IB Gateway, downloads recent bars for a small
universe through the same client code the pipeline uses, and keeps the simulator running
until Ctrl-C so other tools (Dagster, ``ktrdr-pipeline status``, your notebooks) can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import TextIO

from ib_async import IB, Forex, Stock

from .gateway.server import GatewayServer
from .settings import Settings

log = logging.getLogger(__name__)

DEMO_CONTRACTS = [Stock("AAPL", "SMART", "USD"), Stock("SPY", "SMART", "USD"), Forex("EURUSD")]


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
    ib = IB()
    try:
        await ib.connectAsync("127.0.0.1", gw.port, clientId=settings.ib_client_id, timeout=10)
        out.write(f"connected: server version {ib.client.serverVersion()}, "
                  f"accounts {ib.managedAccounts()}\n")
        for contract in DEMO_CONTRACTS:
            [details] = await ib.reqContractDetailsAsync(contract)
            what = "MIDPOINT" if contract.secType == "CASH" else "TRADES"
            bars = await ib.reqHistoricalDataAsync(details.contract, "", "5 D", "1 hour", what,
                                                   contract.secType != "CASH", 2)
            last = bars[-1] if bars else None
            out.write(f"  {details.contract.localSymbol:8} {details.timeZoneId:11} "
                      f"{len(bars):4d} hourly bars over 5 days"
                      + (f", last {last.date:%Y-%m-%d %H:%M} UTC close {last.close}\n"
                         if last else "\n"))
        positions = await ib.reqPositionsAsync()
        out.write(f"paper account {ib.managedAccounts()[0]}: {len(positions)} positions\n")
    finally:
        ib.disconnect()
    if not forever:
        await gw.stop()
        return 0
    out.write("the simulator keeps running; press Ctrl-C to stop\n")
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



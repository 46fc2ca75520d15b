"""Gateway simulator benchmark: how fast it answers, the figures the tests no longer time.

Against an in-process simulator (``GatewayThread``, clock 2026-11-18T15:00Z,
``latency="none"``), measured in one run:

1. **one day of 1-minute bars**: a raw TWS-protocol client asks for one RTH day of AAPL
   1-minute TRADES bars (390 bars), a different day each time (``--days``, default 21
   sessions of October-November 2026, so no answer comes from a cache of the same day);
   the time from sending the request to the end of its answer. Target: median under 20 ms.
2. **ib_async connect**: ``IB.connect`` with the full start-up synchronisation (positions,
   open and completed orders, account updates, executions), ``--connects`` times (default
   5), a new client id each time. Target: median under 1 s (a missing start-up end
   message makes ib_async wait for its timeout).

Results go to ``benchmarks/results/gateway.{json,md}``; run ``python -m
benchmarks.bench_gateway`` from the repository root (a few seconds). Exit status 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import struct
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import exchange_calendars as xcals  # noqa: E402
import pandas as pd  # noqa: E402
from ib_async import IB  # noqa: E402

from ktrdr_pipeline.simulator.protocol import encode  # noqa: E402
from ktrdr_pipeline.simulator.server import GatewayThread  # noqa: E402

log = logging.getLogger("bench_gateway")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLOCK = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)
AAPL = ["265598", "AAPL", "STK", "", "0", "", "", "SMART", "", "USD", "", ""]
TARGET_DAY_MEDIAN_S = 0.020
TARGET_CONNECT_MEDIAN_S = 1.0


class RawClient:
    """A minimal TWS-protocol client over a plain socket (no ib_async overhead)."""

    def __init__(self, port: int, client_id: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""
        self.sock.sendall(b"API\0" + struct.pack(">I", 9) + b"v157..178")
        self.read()  # server version, connection time
        self.sock.sendall(encode([71, 2, client_id, ""]))

    def read(self) -> list[str]:
        while len(self.buffer) < 4 or len(self.buffer) < 4 + struct.unpack(
                ">I", self.buffer[:4])[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the simulator")
            self.buffer += chunk
        size = struct.unpack(">I", self.buffer[:4])[0]
        msg, self.buffer = self.buffer[4:4 + size], self.buffer[4 + size:]
        return msg.decode().split("\0")[:-1]

    def one_day(self, req_id: int, day: date) -> int:
        """Bars in the answer to one RTH day of 1-minute TRADES bars ending ``day``."""
        self.sock.sendall(encode([20, req_id, *AAPL, 0, f"{day:%Y%m%d} 16:00:00 US/Eastern",
                                  "1 min", "1 D", 1, "TRADES", 2, 0, ""]))
        while True:
            fields = self.read()
            if fields[0] == "17" and fields[1] == str(req_id):
                return int(fields[4])
            if fields[0] == "4" and fields[2] == str(req_id):
                raise RuntimeError(f"error for {day}: {fields}")

    def close(self) -> None:
        self.sock.close()


def sessions(count: int) -> list[date]:
    """The last ``count`` full (6.5-hour) NYSE sessions before the simulator's clock."""
    cal = xcals.get_calendar("XNYS")
    sched = cal.schedule.loc[:(CLOCK - timedelta(days=1)).strftime("%Y-%m-%d")]
    full = sched[(sched["close"] - sched["open"]) == pd.Timedelta(hours=6, minutes=30)]
    return [d.date() for d in full.index[-count:]]


def summary(timings: list[float], target: float) -> dict[str, Any]:
    median = statistics.median(timings)
    return {"runs": len(timings), "median_s": round(median, 5),
            "min_s": round(min(timings), 5), "max_s": round(max(timings), 5),
            "all_s": [round(t, 5) for t in timings], "target_median_s": target,
            "met": median < target}


def run(days: int, connects: int) -> dict[str, Any]:
    with GatewayThread(clock=CLOCK, latency="none") as gw:
        raw = RawClient(gw.port, 90)
        day_times: list[float] = []
        bars: dict[str, int] = {}
        try:
            for i, day in enumerate(sessions(days), start=1):
                started = time.perf_counter()
                n = raw.one_day(i, day)
                day_times.append(time.perf_counter() - started)
                bars[day.isoformat()] = n
        finally:
            raw.close()
        connect_times: list[float] = []
        for k in range(connects):
            ib = IB()
            started = time.perf_counter()
            ib.connect("127.0.0.1", gw.port, clientId=200 + k, timeout=20,
                       raiseSyncErrors=True)
            connect_times.append(time.perf_counter() - started)
            ib.disconnect()
    full = [d for d, n in bars.items() if n != 390]
    return {
        "benchmark": "gateway",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "one_day_of_1m_bars": {**summary(day_times, TARGET_DAY_MEDIAN_S),
                               "bars": bars, "days_not_390_bars": full},
        "ib_async_connect": summary(connect_times, TARGET_CONNECT_MEDIAN_S),
    }


def markdown(res: dict[str, Any]) -> str:
    day, con = res["one_day_of_1m_bars"], res["ib_async_connect"]

    def row(name: str, s: dict[str, Any]) -> str:
        return (f"| {name} | {s['runs']} | {1000 * s['median_s']:.1f} | "
                f"{1000 * s['min_s']:.1f} | {1000 * s['max_s']:.1f} | "
                f"< {1000 * s['target_median_s']:.0f} | {'met' if s['met'] else 'MISSED'} |")

    return "\n".join([
        "# Gateway simulator: answer times",
        "",
        f"{res['date']}, {res['cores']} cores, Python {res['python']}. Method: see "
        "`benchmarks/bench_gateway.py` (in-process simulator, `latency=\"none\"`; each day "
        "a different session, timed from sending the request to the end of its answer).",
        "",
        "| figure | runs | median ms | min ms | max ms | target (median) ms | |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        row("one RTH day of 1-min AAPL bars (raw client)", day),
        row("ib_async connect, full start-up", con),
        "",
        f"Every day answered 390 bars: {'yes' if not day['days_not_390_bars'] else 'no'}.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=21, help="sessions asked for, one each (21)")
    p.add_argument("--connects", type=int, default=5, help="ib_async connects timed (5)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("ib_async").setLevel(logging.WARNING)
    res = run(args.days, args.connects)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gateway.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "gateway.md").write_text(markdown(res))
    day, con = res["one_day_of_1m_bars"], res["ib_async_connect"]
    log.info("one day of 1-min bars: median %.1f ms (target < %.0f); connect: median %.0f ms "
             "(target < %.0f) -> %s", 1000 * day["median_s"], 1000 * TARGET_DAY_MEDIAN_S,
             1000 * con["median_s"], 1000 * TARGET_CONNECT_MEDIAN_S, args.out / "gateway.md")
    met = day["met"] and con["met"] and not day["days_not_390_bars"]
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

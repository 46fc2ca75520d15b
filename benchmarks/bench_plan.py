"""Request planning benchmark: fewer, larger requests vs today's small chunks (issue 12).

Against an in-process simulator (``GatewayThread``, clock 2026-11-18T15:00Z,
``latency="realistic"``: an answer's time grows with its bars, see
``ktrdr_pipeline/simulator/latency.py``; at most 4 large-bar requests served at once), side by side in one run, the contenders alternating:

1. **one symbol-year of 1-min RTH bars** (AAPL TRADES, 2025): our plan (the default
   budget, 2730 bars = LEAN's 7 D of RTH minute bars) against the 1-D chunks IB's old
   step-size example led to (``max_bars=390``: one session per request).
2. **one symbol, five years of 1-hour RTH bars** (2021-2025): our plan (365 D per
   request) against roughly one month per request (``max_bars=147``: 21 sessions, as the
   old table's 1 hour -> 1 month).

Each contender runs ``plan_requests`` + ``HistoricalFetcher`` (4 concurrent requests) and
reports requests and wall time; both must return the same bars. Target (issue 12): at
most a fifth of the small chunks' requests on the 1-min year, the same bars; the speed-up
is reported, not a target (the issue names none). Results go to ``benchmarks/results/plan.{json,md}``; run ``python -m
benchmarks.bench_plan`` from the repository root (about a minute). Exit status 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ib_async import Contract  # noqa: E402

from ktrdr_pipeline.domain import calendars  # noqa: E402
from ktrdr_pipeline.domain.ib_rules import PacingLimits  # noqa: E402
from ktrdr_pipeline.domain.planning import (  # noqa: E402
    DEFAULT_MAX_BARS_PER_REQUEST,
    plan_requests,
)
from ktrdr_pipeline.ib.connection import IBConnection  # noqa: E402
from ktrdr_pipeline.ib.fetch import HistoricalFetcher  # noqa: E402
from ktrdr_pipeline.ib.governor import PacingGovernor  # noqa: E402
from ktrdr_pipeline.ib.ledger import MemoryPacingLedger  # noqa: E402
from ktrdr_pipeline.simulator.server import GatewayThread  # noqa: E402

log = logging.getLogger("bench_plan")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLOCK = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)
AAPL = Contract(conId=265598, symbol="AAPL", secType="STK", exchange="SMART", currency="USD")
WORKLOADS = {
    "1 min, 2025": ("1 min", datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC),
                    {"ours": DEFAULT_MAX_BARS_PER_REQUEST, "1-D chunks": 390}),
    "1 hour, 2021-2025": ("1 hour", datetime(2021, 1, 1, tzinfo=UTC),
                          datetime(2026, 1, 1, tzinfo=UTC),
                          {"ours": DEFAULT_MAX_BARS_PER_REQUEST, "~1-month chunks": 147}),
}
TARGET_REQUEST_SHARE = 0.2


async def _run(port: int, client_id: int, bar_size: str, start: datetime, end: datetime,
               max_bars: int) -> tuple[int, float, Any]:
    plan = plan_requests(calendars.STOCK, bar_size, start, end, "TRADES", True, now=CLOCK,
                         max_bars=max_bars)
    conn = IBConnection("127.0.0.1", port, client_id)
    await conn.connect()
    try:
        fetcher = HistoricalFetcher(conn, PacingGovernor(MemoryPacingLedger(), PacingLimits()),
                                    max_bars=max_bars)
        t = time.perf_counter()
        result = await fetcher.fetch(AAPL, plan)
        return result.requests_made, time.perf_counter() - t, result.frame
    finally:
        await conn.disconnect()


def measure(reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"clock": CLOCK.isoformat(), "reps": reps, "workloads": {}}
    client_id = 700
    with GatewayThread(clock=CLOCK, latency="realistic") as gw:
        for name, (bar_size, start, end, contenders) in WORKLOADS.items():
            runs: dict[str, list[dict[str, float]]] = {c: [] for c in contenders}
            frames: dict[str, Any] = {}
            for _ in range(reps):
                for contender, max_bars in contenders.items():
                    client_id += 1
                    n, wall, frame = asyncio.run(_run(gw.port, client_id, bar_size, start,
                                                      end, max_bars))
                    runs[contender].append({"requests": n, "wall_s": round(wall, 3)})
                    frames[contender] = frame
                    log.info("%s %s: %d requests, %.2f s", name, contender, n, wall)
            first = next(iter(frames.values()))
            out["workloads"][name] = {
                "runs": runs,
                "bars": len(first),
                "same_bars": all(f.equals(first) for f in frames.values()),
                "median_wall_s": {c: statistics.median(r["wall_s"] for r in v)
                                  for c, v in runs.items()},
                "requests": {c: v[0]["requests"] for c, v in runs.items()},
            }
    return out


def verdict(res: dict[str, Any]) -> list[str]:
    missed = []
    w = res["workloads"]["1 min, 2025"]
    speedup = w["median_wall_s"]["1-D chunks"] / w["median_wall_s"]["ours"]
    share = w["requests"]["ours"] / w["requests"]["1-D chunks"]
    w["speedup"], w["request_share"] = round(speedup, 2), round(share, 3)
    if share > TARGET_REQUEST_SHARE:
        missed.append(f"1-min year: ours needs {share:.0%} of the requests (target 20 %)")
    for name, wl in res["workloads"].items():
        if not wl["same_bars"]:
            missed.append(f"{name}: the contenders returned different bars")
    return missed


def markdown(res: dict[str, Any], missed: list[str]) -> str:
    lines = ["# Request planning: fewer, larger requests (issue 12)", "",
             f"Simulator `latency=\"realistic\"`, clock {res['clock']}, {res['reps']} "
             "alternating rep(s), median wall time; see `bench_plan.py` for the method.", "",
             "| workload | contender | requests | wall (s) | bars | same bars |",
             "|---|---|---:|---:|---:|---|"]
    for name, wl in res["workloads"].items():
        for c in wl["runs"]:
            lines.append(f"| {name} | {c} | {wl['requests'][c]} | "
                         f"{wl['median_wall_s'][c]:.2f} | {wl['bars']} | {wl['same_bars']} |")
    lines += ["", "Targets: " + ("all met." if not missed else "; ".join(missed)), "",
              f"Machine: {platform.platform()}, Python {platform.python_version()}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=1, help="alternating repetitions (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ib_async").setLevel(logging.WARNING)
    res = measure(args.reps)
    missed = verdict(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "plan.md").write_text(markdown(res, missed))
    print(markdown(res, missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

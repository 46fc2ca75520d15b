"""IB historical-download benchmark, run against the bundled IB Gateway simulator.

Three measurements, each repeated (default 3 times) in one run, because the machine is
shared and noisy: only figures taken side by side in the same run are compared.

(a) 1-min bars, one symbol, one month (AAPL 2026-10-01..2026-11-01, RTH, TRADES, simulator
    clock 2026-11-18T15:00Z, ``latency="realistic"``): wall time of our planner + pacing
    governor + fetcher against a baseline "sequential loader that waits 2 s between
    requests" (the original design: one day per request, one after another with ib_async's
    ``reqHistoricalDataAsync``, ``asyncio.sleep(2)`` between requests). The two contenders
    alternate (B O, O B, B O, ...) and both must return the same bars. Target: ours >= 3x
    faster.

(b) 5-sec bars under a time-scaled pacing window (``pacing_time_scale`` on the simulator
    and ``PacingLimits(time_scale=...)`` on the client; 0.01 makes IB's 600 s window 6 s):
    60 x ``windows`` distinct 2-hour requests spread over 18 contracts (15 stocks, 3 FX
    pairs, from a ``--universe`` file) go through the fetcher concurrently (one ``fetch``
    per contract, one connection, one governor). The simulator's audit log gives the
    request times (``mono``) and the violations (``pacing`` events and 162 errors).
    Target: steady-state rate >= 0.9 of the rules' maximum, zero violations.

(c) Two processes sharing one SQLite pacing ledger, the governor alone (no simulator, no
    IB client): each process sends ``C_PER_PROCESS`` requests at once over the same four
    contracts under ``PacingLimits(time_scale=C_SCALE)``; the moments the slots were
    granted (as each process saw them) give the ramp-up of the first 60 (the rule lets
    them go at once: target under half a window, the bound
    ``ktrdr_pipeline_tests/test_governor.py::test_two_processes_share_one_ledger`` used
    to assert on real time) and the steady-state rate against the rules' maximum; the
    ledger's decisions are replayed against the rules (target: zero violations).

The simulator runs as a child process by default (``--gateway thread`` for a
``GatewayThread`` in this process).

Run ``benchmarks/run`` (or ``python -m benchmarks.bench_ib --help``) from the repository
root; results go to ``benchmarks/results/ib_fetch.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ib_async import IB, Contract, Forex, Stock

from ktrdr_pipeline.domain import calendars
from ktrdr_pipeline.domain.ib_rules import PacingLimits
from ktrdr_pipeline.domain.pacing import PacedRequest, PacingEvent, PacingWindow, bars_pacing_key
from ktrdr_pipeline.domain.planning import plan_requests
from ktrdr_pipeline.ib.connection import IBConnection
from ktrdr_pipeline.ib.fetch import HistoricalFetcher
from ktrdr_pipeline.ib.governor import PacingGovernor
from ktrdr_pipeline.ib.ledger import MemoryPacingLedger, PacingLedger, SqlitePacingLedger
from ktrdr_pipeline.simulator.server import GatewayThread

log = logging.getLogger("benchmarks.bench_ib")

CLOCK = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# (a) one symbol, one month of 1-min bars
A_SYMBOL = "AAPL"
A_START = datetime(2026, 10, 1, tzinfo=UTC)
A_END = datetime(2026, 11, 1, tzinfo=UTC)
A_BAR = "1 min"
A_WHAT = "TRADES"
A_RTH = True
A_TARGET_SPEEDUP = 3.0
BASELINE_PAUSE_S = 2.0

# (b) many distinct 5-sec requests over several contracts
B_BAR = "5 secs"
B_START = datetime(2026, 10, 1, tzinfo=UTC)  # inside the 6-month small-bar history
B_END = datetime(2026, 11, 18, tzinfo=UTC)
# 15 stocks + 3 FX pairs, served through a --universe file (the default universe has only
# 6 stocks): enough contracts that the client can always offer more requests than the
# global rule admits (see the explanation in the summary).
B_STOCKS = (
    "AAPL",
    "MSFT",
    "SPY",
    "TSLA",
    "NVDA",
    "RBLX",
    "IBM",
    "JPM",
    "XOM",
    "KO",
    "PEP",
    "WMT",
    "DIS",
    "INTC",
    "CSCO",
)
B_FX = ("EURUSD", "GBPUSD", "USDJPY")
B_TARGET_RATIO = 0.9

# (c) two processes, one SQLite ledger
C_SCALE = 0.003  # global window 1.8 s, same-contract 6 ms, identical 45 ms
C_PER_PROCESS = 90  # 180 in all: three windows' worth
C_TARGET_RAMP_UP = 0.5  # the first 60 within half a window


# --- helpers -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@contextmanager
def gateway(
    mode: str,
    workdir: Path,
    *,
    audit_log: Path,
    pacing_time_scale: float = 1.0,
    universe: Path | None = None,
) -> Iterator[int]:
    """The simulator (clock ``CLOCK``, realistic latency); yields its API port.

    ``process``: ``python -m ktrdr_pipeline.cli gateway`` in a child process, like a real
    IB Gateway (the client does not share its interpreter lock with the simulator).
    ``thread``: a :class:`GatewayThread` inside this process.
    """
    if mode == "thread":
        with GatewayThread(
            clock=CLOCK,
            latency="realistic",
            audit_log=audit_log,
            pacing_time_scale=pacing_time_scale,
            universe=universe,
        ) as gw:
            yield gw.port
        return
    cmd = [
        sys.executable, "-m", "ktrdr_pipeline.cli", "gateway", "--port", "0",
        "--clock", CLOCK.isoformat(), "--latency", "realistic",
        "--audit-log", str(audit_log), "--pacing-time-scale", repr(pacing_time_scale),
    ]  # fmt: skip
    if universe is not None:
        cmd += ["--universe", str(universe)]
    out_path = workdir / f"{audit_log.stem}.gateway.out"
    err_path = workdir / f"{audit_log.stem}.gateway.err"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            m = re.search(r"listening on \S+:(\d+)", out_path.read_text())
            if m:
                port = int(m.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the gateway simulator did not start: {err_path.read_text()[-2000:]}"
                )
            else:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_ledger(kind: str, workdir: Path, name: str) -> PacingLedger:
    if kind == "memory":
        return MemoryPacingLedger()
    return SqlitePacingLedger(workdir / f"{name}.sqlite")


def read_audit(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


async def qualify(ib: IB, contract: Contract) -> Contract:
    details = await ib.reqContractDetailsAsync(contract)
    if len(details) != 1:
        raise RuntimeError(f"expected one contract for {contract}, got {len(details)}")
    return details[0].contract


# --- (a) the baseline: sequential, one day per request, 2 s between requests ------------


@dataclass
class Fetched:
    """What one contender fetched: bar start (UTC) -> close, and how."""

    closes: dict[datetime, float]
    requests: int
    wall_s: float


async def baseline_sequential_loader(
    ib: IB,
    contract: Contract,
    start: datetime,
    end: datetime,
    bar_size: str,
    what_to_show: str,
    use_rth: bool,
    pause_s: float = BASELINE_PAUSE_S,
) -> tuple[list, int]:
    """The original design's loader, kept faithful: walk the range one day at a time, one
    ``reqHistoricalDataAsync`` per day ("1 D" ending at the next midnight UTC, which holds
    a whole US regular session), one request after another, sleeping ``pause_s`` between
    requests. It knows no exchange calendar; it only skips Saturdays and Sundays, which
    favours it (a loader that also asked for weekends would send 31 instead of 22
    requests for October 2026). Bars are merged, de-duplicated and sorted at the end."""
    bars: dict[datetime, Any] = {}
    requests = 0
    day = start.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        if day.weekday() < 5:
            if requests:
                await asyncio.sleep(pause_s)
            got = await ib.reqHistoricalDataAsync(
                contract,
                endDateTime=day + timedelta(days=1),
                durationStr="1 D",
                barSizeSetting=bar_size,
                whatToShow=what_to_show,
                useRTH=use_rth,
                formatDate=2,
            )
            requests += 1
            for b in got:
                if start <= b.date < end:
                    bars[b.date] = b
        day += timedelta(days=1)
    return [bars[t] for t in sorted(bars)], requests


async def run_baseline(ib: IB, contract: Contract) -> Fetched:
    t0 = time.perf_counter()
    bars, requests = await baseline_sequential_loader(
        ib, contract, A_START, A_END, A_BAR, A_WHAT, A_RTH
    )
    wall = time.perf_counter() - t0
    return Fetched({b.date.astimezone(UTC): float(b.close) for b in bars}, requests, wall)


async def run_ours(conn: IBConnection, contract: Contract, ledger: PacingLedger) -> Fetched:
    governor = PacingGovernor(ledger, PacingLimits())
    fetcher = HistoricalFetcher(conn, governor)
    t0 = time.perf_counter()
    plan = plan_requests(calendars.STOCK, A_BAR, A_START, A_END, A_WHAT, A_RTH, now=CLOCK)
    result = await fetcher.fetch(contract, plan)
    wall = time.perf_counter() - t0
    if result.pacing_violations or result.retries:
        log.warning(
            "ours: %d pacing violations, %d retries", result.pacing_violations, result.retries
        )
    closes = {ts.to_pydatetime(): float(c) for ts, c in result.frame["close"].items()}
    return Fetched(closes, result.requests_made, wall)


async def bench_a(
    port: int, reps: int, ledger_kind: str, workdir: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    conn = IBConnection("127.0.0.1", port, 11)
    await conn.connect()
    base_ib = IB()
    await base_ib.connectAsync("127.0.0.1", port, clientId=21, timeout=10)
    try:
        contract = await qualify(conn.ib, Stock(A_SYMBOL, "SMART", "USD"))
        # Warm the simulator's market-model caches so neither contender pays for them.
        warm = await run_ours(conn, contract, make_ledger(ledger_kind, workdir, "a-warm"))
        say(f"(a) warm-up: {len(warm.closes)} bars in {warm.wall_s:.2f}s")
        runs: list[dict[str, Any]] = []
        fetched: dict[str, list[Fetched]] = {"baseline": [], "ours": []}
        for rep in range(reps):
            order = ("baseline", "ours") if rep % 2 == 0 else ("ours", "baseline")
            for who in order:
                if who == "ours":
                    f = await run_ours(
                        conn, contract, make_ledger(ledger_kind, workdir, f"a-{rep}")
                    )
                else:
                    f = await run_baseline(base_ib, contract)
                fetched[who].append(f)
                runs.append(
                    {
                        "rep": rep + 1,
                        "contender": who,
                        "wall_s": round(f.wall_s, 4),
                        "requests": f.requests,
                        "bars": len(f.closes),
                    }
                )
                say(
                    f"(a) rep {rep + 1} {who:8s}: {f.wall_s:7.2f}s  {f.requests} requests  "
                    f"{len(f.closes)} bars"
                )
    finally:
        base_ib.disconnect()
        await conn.disconnect()

    reference = fetched["ours"][0].closes
    same_bars = all(f.closes == reference for fs in fetched.values() for f in fs)
    bar_counts = sorted({len(f.closes) for fs in fetched.values() for f in fs})
    med = {who: statistics.median(f.wall_s for f in fs) for who, fs in fetched.items()}
    paired = [
        b.wall_s / o.wall_s for b, o in zip(fetched["baseline"], fetched["ours"], strict=True)
    ]
    ratio = med["baseline"] / med["ours"]
    return {
        "description": (
            f"{A_SYMBOL} {A_BAR} bars {A_START.date()}..{A_END.date()} "
            f"(end exclusive), useRTH={int(A_RTH)}, {A_WHAT}, simulator clock "
            f"{CLOCK.isoformat()}, latency=realistic"
        ),
        "baseline": (
            f"sequential, one weekday per request ('1 D'), "
            f"{BASELINE_PAUSE_S:g} s sleep between requests, ib_async "
            "reqHistoricalDataAsync"
        ),
        "ours": (
            "plan_requests + PacingGovernor(" + ledger_kind + " ledger, PacingLimits()) "
            "+ HistoricalFetcher (defaults: up to 4 requests in flight)"
        ),
        "runs": runs,
        "median_wall_s": {k: round(v, 4) for k, v in med.items()},
        "requests": {k: fs[0].requests for k, fs in fetched.items()},
        "bars": bar_counts[0] if len(bar_counts) == 1 else bar_counts,
        "same_bars": same_bars,
        "speedup_ratio_of_medians": round(ratio, 2),
        "speedup_paired": [round(x, 2) for x in paired],
        "speedup_median_paired": round(statistics.median(paired), 2),
        "target_speedup": A_TARGET_SPEEDUP,
        "target_met": bool(same_bars and ratio >= A_TARGET_SPEEDUP),
    }


# --- (b) pacing-bound throughput of 5-sec requests --------------------------------------


def steady_state(times: list[float], global_max: int, window: float) -> dict[str, Any]:
    """Request rate in the steady state, against the global rule's maximum.

    The rule (at most ``global_max`` in any ``window``) lets a client send its first
    ``global_max`` requests at once; after that request ``k`` can go no earlier than
    ``window`` after request ``k - global_max``. So the steady state starts at request
    number ``global_max`` (index ``global_max - 1``): from there to the last request,
    ``m`` more requests (``m`` a whole number of windows' worth) need at least
    ``m / global_max`` windows. Achieved rate = ``m / elapsed``; the maximum is
    ``global_max / window``; their ratio is at most 1 under the rules.
    """
    t = sorted(times)
    n = len(t)
    out: dict[str, Any] = {"requests": n}
    if n <= global_max:
        return out
    m = (n - global_max) // global_max * global_max
    if m == 0:
        return out
    a, b = global_max - 1, global_max - 1 + m
    elapsed = t[b] - t[a]
    max_rate = global_max / window
    rate = m / elapsed
    lags = [t[k] - t[k - global_max] for k in range(global_max, n)]
    busiest = 0
    j = 0
    for i in range(n):  # most requests inside any window [t_i, t_i + window)
        while j < n and t[j] < t[i] + window:
            j += 1
        busiest = max(busiest, j - i)
    out.update(
        {
            "steady_first_index": a,
            "steady_last_index": b,
            "steady_requests": m,
            "steady_elapsed_s": round(elapsed, 4),
            "achieved_rate_per_s": round(rate, 4),
            "max_rate_per_s": round(max_rate, 4),
            "ratio_of_max": round(rate / max_rate, 4),
            "mean_gap_k_minus_60_s": round(statistics.fmean(lags), 4),
            "min_gap_k_minus_60_s": round(min(lags), 4),
            "busiest_window_count": busiest,
            "ramp_up_first_60_s": round(t[global_max - 1] - t[0], 4),
            "first_to_last_s": round(t[-1] - t[0], 4),
        }
    )
    return out


def write_b_universe(path: Path) -> Path:
    """A simulator universe (YAML; JSON is valid YAML) with the stocks and FX pairs of (b)."""
    universe = {
        "stocks": [
            {
                "symbol": sym,
                "primary_exchange": "NYSE",
                "price": 100 + 10 * k,
                "vol": 0.3,
                "head": "2010-01-04",
            }
            for k, sym in enumerate(B_STOCKS)
        ],
        "fx": [
            {"pair": pair, "price": price}
            for pair, price in zip(B_FX, (1.035, 1.25, 157.2), strict=True)
        ],
    }
    path.write_text(json.dumps(universe, indent=1))
    return path


def b_contracts() -> list[tuple[Contract, calendars.HoursProfile, str, bool]]:
    out: list[tuple[Contract, calendars.HoursProfile, str, bool]] = [
        (Stock(s, "SMART", "USD"), calendars.STOCK, "TRADES", True) for s in B_STOCKS
    ]
    out += [(Forex(p), calendars.FX, "MIDPOINT", False) for p in B_FX]
    return out


async def b_once(
    port: int, scale: float, windows: int, ledger: PacingLedger, settle: bool = True
) -> dict[str, Any]:
    limits_ = PacingLimits(time_scale=scale)
    total = limits_.global_max * windows
    conn = IBConnection("127.0.0.1", port, 31)
    await conn.connect()
    try:
        specs = b_contracts()
        qualified_all = await asyncio.gather(*(qualify(conn.ib, c) for c, *_ in specs))
        jobs = []
        for k, (_, profile, what, rth) in enumerate(specs):
            qualified = qualified_all[k]
            share = total // len(specs) + (1 if k < total % len(specs) else 0)
            plan = plan_requests(profile, B_BAR, B_START, B_END, what, rth, now=CLOCK)
            if len(plan) < share:
                raise RuntimeError(f"only {len(plan)} requests planned for {qualified}")
            jobs.append((qualified, plan[:share]))
        governor = PacingGovernor(ledger, limits_)
        fetcher = HistoricalFetcher(conn, governor)
        client = conn.ib.client
        if settle:
            # Let ib_async's own throttle (45 messages per second) forget the connect and
            # contract-detail messages: otherwise it queues the first historical requests
            # for up to ~0.4 s after the governor granted them, longer than the governor's
            # 5 % margin on a 6 s window (see the report). --no-settle shows it.
            await asyncio.sleep(client.RequestsInterval + 0.1)
        throttled = 0

        def on_throttle() -> None:
            nonlocal throttled
            throttled += 1

        client.throttleStart += on_throttle
        t0 = time.perf_counter()
        try:
            results = await asyncio.gather(*(fetcher.fetch(c, p) for c, p in jobs))
        finally:
            client.throttleStart -= on_throttle
        wall = time.perf_counter() - t0
    finally:
        await conn.disconnect()
    return {
        "contracts": len(jobs),
        "requests_planned": sum(len(p) for _, p in jobs),
        "requests_made": sum(r.requests_made for r in results),
        "client_pacing_violations": sum(r.pacing_violations for r in results),
        "client_retries": sum(r.retries for r in results),
        "bars": sum(len(r.frame) for r in results),
        "wall_s": round(wall, 3),
        "settle_pause": settle,
        "ib_async_throttle_starts": throttled,
    }


def bench_b_rep(
    rep: int,
    scale: float,
    windows: int,
    ledger_kind: str,
    workdir: Path,
    settle: bool = True,
    mode: str = "process",
) -> dict[str, Any]:
    audit = workdir / f"b-audit-{rep}.jsonl"
    universe = write_b_universe(workdir / "b-universe.yaml")
    with gateway(
        mode, workdir, audit_log=audit, pacing_time_scale=scale, universe=universe
    ) as port:
        client = asyncio.run(
            b_once(port, scale, windows, make_ledger(ledger_kind, workdir, f"b-{rep}"), settle)
        )
    events = read_audit(audit)
    times = [
        e["mono"]
        for e in events
        if e.get("message") == "reqHistoricalData" and e.get("bar_size") == B_BAR
    ]
    sent = {
        (e.get("client_id"), e.get("req_id")): e["mono"]
        for e in events
        if e.get("message") == "reqHistoricalData" and e.get("bar_size") == B_BAR
    }
    answer_s = [
        e["mono"] - sent[k]
        for e in events
        if e.get("message") == "historicalData"
        and (k := (e.get("client_id"), e.get("req_id"))) in sent
    ]
    pacing_events = sum(1 for e in events if e.get("message") == "pacing")
    errors_162 = [e for e in events if e.get("message") == "error" and e.get("code") == 162]
    pacing_162 = sum(1 for e in errors_162 if "pacing" in str(e.get("text", "")).lower())
    other_errors = sum(1 for e in events if e.get("message") == "error" and e.get("code") != 162)
    lim = PacingLimits(time_scale=scale)
    rate = steady_state(times, lim.global_max, lim.global_window)
    return {
        "rep": rep + 1,
        **client,
        "audit_requests": len(times),
        "median_answer_s": round(statistics.median(answer_s), 4) if answer_s else None,
        "audit_pacing_events": pacing_events,
        "audit_162_pacing_errors": pacing_162,
        "audit_162_errors_all": len(errors_162),
        "audit_other_errors": other_errors,
        **{k: v for k, v in rate.items() if k != "requests"},
    }


def bench_b(
    reps: int,
    scale: float,
    windows: int,
    ledger_kind: str,
    workdir: Path,
    say: Callable[[str], None],
    settle: bool = True,
    mode: str = "process",
) -> dict[str, Any]:
    lim = PacingLimits(time_scale=scale)
    runs = []
    for rep in range(reps):
        r = bench_b_rep(rep, scale, windows, ledger_kind, workdir, settle, mode)
        runs.append(r)
        say(
            f"(b) rep {rep + 1}: {r['audit_requests']} requests, steady "
            f"{r.get('achieved_rate_per_s', float('nan')):.3f}/s of "
            f"{r.get('max_rate_per_s', float('nan')):.3f}/s = "
            f"{r.get('ratio_of_max', float('nan')):.3f}; busiest window "
            f"{r.get('busiest_window_count')}; violations {r['audit_pacing_events']} "
            f"(162: {r['audit_162_pacing_errors']}); wall {r['wall_s']:.1f}s"
        )
    ratios = [r["ratio_of_max"] for r in runs if "ratio_of_max" in r]
    violations = sum(r["audit_pacing_events"] + r["audit_162_pacing_errors"] for r in runs)
    median_ratio = statistics.median(ratios) if ratios else math.nan
    return {
        "description": (
            f"{lim.global_max * windows} distinct `{B_BAR}` requests per run "
            f"({windows} global windows' worth), chunks from plan_requests (the default bar budget), "
            f"over {len(B_STOCKS)} stocks (TRADES, RTH) and {len(B_FX)} FX pairs "
            "(MIDPOINT, all hours), one fetch per contract, all concurrent on "
            "one connection and one governor; latency=realistic"
        ),
        "pacing_time_scale": scale,
        "global_rule": (
            f"at most {lim.global_max} requests in {lim.global_window:g} s (600 s x {scale:g})"
        ),
        "same_contract_rule": (
            f"fewer than 6 per contract+exchange+whatToShow in {lim.same_contract_window:g} s"
        ),
        "same_contract_window_s": lim.same_contract_window,
        "settle_pause": settle,
        "identical_rule": f"no identical request within {lim.identical_window:g} s",
        "governor": f"PacingGovernor({ledger_kind} ledger, PacingLimits(time_scale={scale:g})), "
        "default safety_margin 0.05",
        "runs": runs,
        "contracts": len(B_STOCKS) + len(B_FX),
        "median_answer_s": statistics.median(
            r["median_answer_s"] for r in runs if r["median_answer_s"] is not None
        ),
        "median_ratio_of_max": round(median_ratio, 4),
        "median_achieved_rate_per_s": round(
            statistics.median(r["achieved_rate_per_s"] for r in runs if "achieved_rate_per_s" in r),
            4,
        )
        if ratios
        else None,
        "max_rate_per_s": round(lim.global_max / lim.global_window, 4),
        "violations_total": violations,
        "target_ratio": B_TARGET_RATIO,
        "target_met": bool(
            ratios
            and median_ratio >= B_TARGET_RATIO
            and violations == 0
            and all(r["audit_other_errors"] == 0 for r in runs)
        ),
    }


# --- (c) two processes, one ledger ------------------------------------------------------------


def _c_worker(path: str, tag: str, n: int, scale: float, barrier: Any, results: Any) -> None:
    """One process of (c): ``n`` requests at once, over the contracts the other uses too."""

    async def main() -> list[tuple[float, str]]:
        gov = PacingGovernor(
            SqlitePacingLedger(path, retention=3600), PacingLimits(time_scale=scale)
        )
        granted: list[tuple[float, str]] = []

        async def one(i: int) -> None:
            k = bars_pacing_key(
                f"T{i % 4}", "SMART", f"20260101 {tag}{i:05d}", "1800 S", "1 secs", "TRADES", True
            )
            async with gov.slot(k):
                granted.append((time.time(), k.identity))
                await asyncio.sleep(0.001)

        barrier.wait()
        await asyncio.gather(*(one(i) for i in range(n)))
        return granted

    results.put((tag, asyncio.run(main())))


def bench_c_rep(rep: int, workdir: Path) -> dict[str, Any]:
    lim = PacingLimits(time_scale=C_SCALE)
    path = str(workdir / f"c-{rep}.sqlite")
    SqlitePacingLedger(path).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_c_worker, args=(path, tag, C_PER_PROCESS, C_SCALE, barrier, results))
        for tag in ("A", "B")
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    sends = sorted(got["A"] + got["B"])
    times = [t for t, _ in sends]
    events = sorted(SqlitePacingLedger(path).events(), key=lambda e: e.at)

    def broken(evs: list[PacingEvent]) -> int:
        return sum(
            1
            for i, e in enumerate(evs)
            if PacingWindow(lim, evs[:i]).violation(
                PacedRequest(e.identity, e.tick_key, e.weight), e.at
            )
        )

    violations = broken(events)
    # The sends as the processes saw them, each lagging its decision by scheduling delays.
    decided = {e.identity: e for e in events}
    sent = [dataclasses.replace(decided[i], at=t) for t, i in sends if i in decided]
    lags = [t - decided[i].at for t, i in sends if i in decided]
    out = steady_state(times, lim.global_max, lim.global_window)
    out.update(
        {
            "rep": rep + 1,
            "exit_codes": [p.exitcode for p in procs],
            "ledger_events": len(events),
            "ledger_violations": violations,
            "send_rule_breaks": broken(sorted(sent, key=lambda e: e.at)),
            "max_send_lag_s": round(max(lags), 5) if lags else None,
            "ramp_up_share_of_window": round(
                (times[lim.global_max - 1] - times[0]) / lim.global_window, 4
            ),
        }
    )
    return out


def bench_c(reps: int, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    lim = PacingLimits(time_scale=C_SCALE)
    runs = []
    for rep in range(reps):
        r = bench_c_rep(rep, workdir)
        runs.append(r)
        say(
            f"(c) rep {rep + 1}: first 60 within {r['ramp_up_share_of_window']:.3f} of a "
            f"window; steady {r.get('ratio_of_max', float('nan')):.3f} of max; ledger "
            f"violations {r['ledger_violations']}; sends breaking a rule "
            f"{r['send_rule_breaks']} (max lag {r['max_send_lag_s']} s)"
        )
    ramp = statistics.median(r["ramp_up_share_of_window"] for r in runs)
    ratios = [r["ratio_of_max"] for r in runs if "ratio_of_max" in r]
    return {
        "description": (
            f"2 processes x {C_PER_PROCESS} distinct requests at once over 4 shared contracts, "
            f"one SQLite ledger, PacingGovernor(PacingLimits(time_scale={C_SCALE:g})): "
            f"global rule {lim.global_max} in {lim.global_window:g} s"
        ),
        "runs": runs,
        "median_ramp_up_share_of_window": round(ramp, 4),
        "median_ratio_of_max": round(statistics.median(ratios), 4) if ratios else None,
        "violations_total": sum(r["ledger_violations"] for r in runs),
        "target_ramp_up_share": C_TARGET_RAMP_UP,
        "target_met": bool(
            ramp < C_TARGET_RAMP_UP
            and all(r["ledger_violations"] == 0 for r in runs)
            and all(r["exit_codes"] == [0, 0] for r in runs)
            and all(r["ledger_events"] == 2 * C_PER_PROCESS for r in runs)
        ),
    }


# --- report ----------------------------------------------------------------------------------


GATEWAY_MODES = {
    "process": "a child process (`python -m ktrdr_pipeline.cli gateway`), like a real IB Gateway",
    "thread": "a `GatewayThread` inside the benchmark's process (it shares the interpreter "
    "lock with the client)",
}


def markdown(res: dict[str, Any]) -> str:
    a, b, m = res["a"], res["b"], res["machine"]
    yes = {True: "**met**", False: "**NOT met**"}
    lines = [
        "# IB fetch benchmark",
        "",
        f"- Date: {res['date']}",
        f"- Machine: {m.get('cpu_count')} cores ({m.get('usable_cpus', '?')} usable), "
        f"{m.get('cpu_model', m.get('machine'))}, {m.get('platform')}, Python {m.get('python')}",
        f"- Load average before / after: {res['load_before']} / {res['load_after']} "
        "(shared, noisy machine: only ratios taken in this same run are compared)",
        f"- Repetitions: {res['reps']} per contender, alternating; medians reported. "
        f"Total benchmark time {res['total_s']:.0f} s.",
        f"- Simulator: {GATEWAY_MODES[res['gateway_mode']]}; clock {CLOCK.isoformat()}, "
        "latency `realistic` (an answer's time grows with its bars: simulator/latency.py; at most 4 "
        "requests for bars of 1 min and larger served at once).",
        "",
        "## (a) 1-min bars, one symbol, one month: ours vs. sequential 2-s loader",
        "",
        f"{a['description']}.",
        "",
        f"- Baseline: {a['baseline']}.",
        f"- Ours: {a['ours']}.",
        "",
        "| | median wall time | requests | bars |",
        "|---|---:|---:|---:|",
        f"| baseline (sequential, 2 s pause) | {a['median_wall_s']['baseline']:.2f} s | "
        f"{a['requests']['baseline']} | {a['bars']} |",
        f"| ours (planner + governor + fetcher) | {a['median_wall_s']['ours']:.2f} s | "
        f"{a['requests']['ours']} | {a['bars']} |",
        "",
        f"- Same bars from both (timestamps and closes, every run): {a['same_bars']}",
        f"- Speed-up (ratio of medians): **{a['speedup_ratio_of_medians']:.1f}x**; "
        f"per pair: {', '.join(f'{x:.1f}x' for x in a['speedup_paired'])}",
        f"- Target >= {a['target_speedup']:g}x faster: {yes[a['target_met']]}",
        "",
        "## (b) 5-sec bars: achieved request rate vs. IB's pacing maximum",
        "",
        f"{b['description']}. Pacing time scale {b['pacing_time_scale']:g} on both the "
        f"simulator and the client: global rule {b['global_rule']}; "
        f"{b['same_contract_rule']}; {b['identical_rule']}. Governor: {b['governor']}.",
        "",
        "Why the global rule binds: every request is distinct (its own end time), so the "
        "identical-request rule never applies. The fetcher keeps at most one small-bar "
        "request in flight per contract and an answer takes "
        f"{b['median_answer_s']:.2f} s (median, "
        f"processing included), so one contract offers at most ~{1 / b['median_answer_s']:.1f} "
        "requests per second, i.e. at most one per "
        f"{b['same_contract_window_s']:g} s same-contract window where 5 are allowed. The "
        f"{b['contracts']} contracts together offer ~{b['contracts'] / b['median_answer_s']:.0f} "
        f"per second, several times the global maximum of {b['max_rate_per_s']:g} per "
        "second, so only the 60-per-window rule limits the rate. (At the real time scale "
        "one contract alone would offer ~20x the global maximum of 0.1 per second; the "
        "scaled run needs many contracts only because the simulator's latency is not "
        "scaled. In trial runs on the simulator's default 6 stocks + 3 FX pairs, with the "
        "simulator in-process, the client itself was at times the limit and the ratio came "
        "out at 0.89-0.90.)",
        "",
        "How the rate is measured: request times are the simulator's audit-log `mono` "
        "timestamps of `reqHistoricalData` events. The rule allows the first 60 requests at "
        "once, after which request k may go no earlier than one window after request k-60. "
        "The steady state is therefore measured from the 60th request to the last: "
        "achieved rate = requests after the 60th / elapsed time, compared with 60 per "
        "window (the ratio cannot exceed 1 without breaking the rule). Violations: "
        '`message == "pacing"` audit events and 162 pacing errors (one violation appears '
        "as both). The rate counts every request the client could not offer: read request "
        "by request (one run's audit log, 0.893), requests 60-77 and 120-179 left as soon "
        "as the rule allowed (6.30 s after request k-60: the window plus the governor's 5 % "
        "margin) and requests 78-119 0.4-0.8 s later, when every contract had its one "
        "small-bar request in flight and a burst of 18 answers took ~0.9 s each with the "
        "simulator and the client sharing the machine's cores; the governor had no "
        "request to grant rather than holding one back.",
        "",
        "Start-up: "
        + (
            "the fetch starts 1.1 s after the contract look-ups, once ib_async's own "
            "throttle (45 messages per second) has forgotten the connect and "
            "contract-detail messages; see the caveat below."
            if b["settle_pause"]
            else "the fetch starts right after the contract look-ups (--no-settle)."
        ),
        "",
        "| run | requests | steady requests / elapsed | achieved rate | ratio of max | "
        "busiest window | pacing events | 162 pacing errors | ib_async throttled | wall |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in b["runs"]:
        lines.append(
            f"| {r['rep']} | {r['audit_requests']} | {r.get('steady_requests', '-')} / "
            f"{r.get('steady_elapsed_s', float('nan')):.2f} s | "
            f"{r.get('achieved_rate_per_s', float('nan')):.3f}/s | "
            f"{r.get('ratio_of_max', float('nan')):.3f} | {r.get('busiest_window_count')} | "
            f"{r['audit_pacing_events']} | {r['audit_162_pacing_errors']} | "
            f"{r['ib_async_throttle_starts']} | {r['wall_s']:.1f} s |"
        )
    lines += [
        "",
        f"- Median achieved rate: {b['median_achieved_rate_per_s']:.3f}/s of "
        f"{b['max_rate_per_s']:g}/s maximum = **{b['median_ratio_of_max']:.3f}** of the "
        f"maximum; violations in all runs: **{b['violations_total']}**",
        f"- Target >= {b['target_ratio']:g} of the maximum with zero violations: "
        f"{yes[b['target_met']]}",
        "- Note: the governor's default safety margin (5 %) stretches every window, so it "
        f"aims at 1/1.05 = {1 / 1.05:.3f} of the maximum; a run can land a little above or "
        "below that from arrival jitter of the two requests that bound the measurement.",
        "- Caveat: the governor records a request when it grants it, but ib_async "
        "queues outgoing messages beyond 45 per second, so a granted request can reach "
        "IB later than recorded. Right after connecting and qualifying 18 contracts, "
        "requests were measured leaving up to ~0.4 s after their grant, more than the 5 % "
        "margin of a 6 s window. Without the start-up pause (--no-settle) trial runs "
        "brought two requests 60 apart to 6.08 s of the 6 s limit and, with the simulator "
        "in-process, once got a 162 pacing violation. At the real time scale the margin is "
        "30 s for the 600 s rule, but only 0.75 s for the 15 s identical-request rule and "
        "0.1 s for the 2 s same-contract rule.",
        "- Caveat: the simulator stamps a request when it reads it. Measured with "
        "benchmarks/probe_pacing_lag.py: grant to socket write at most ~6 ms, but the "
        "simulator read requests up to 0.9 s late while it formatted several big answers "
        "on its event loop, more than the 5 % margin of a 6 s window (3 violations in one "
        "run before the fix); the simulator now formats answers in a thread (read lag at "
        "most ~0.16 s).",
        "",
    ]
    c = res.get("c")
    if c:
        lines += [
            "",
            "## (c) Two processes sharing one SQLite pacing ledger",
            "",
            f"{c['description']}. Times are the moments each process's governor granted a "
            "slot (wall clock). The rule lets the first 60 go at once; the steady-state rate "
            "is measured as in (b). Sends lag their ledger decisions by scheduling delays; at "
            "this scale the 5 % margin is only 0.3 ms on the 6 ms same-contract window, so "
            "on a loaded machine a send can break a rule its decision kept (reported, not a "
            "target: at the real scale the margin is 0.1 s).",
            "",
            "| run | first 60 within (share of a window) | steady ratio of max | ledger "
            "violations | sends breaking a rule | max send lag |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in c["runs"]:
            lines.append(
                f"| {r['rep']} | {r['ramp_up_share_of_window']:.3f} | "
                f"{r.get('ratio_of_max', float('nan')):.3f} | {r['ledger_violations']} | "
                f"{r['send_rule_breaks']} | {r['max_send_lag_s']} s |"
            )
        lines += [
            "",
            f"- Median: first 60 within **{c['median_ramp_up_share_of_window']:.3f}** of a "
            f"window; steady state {c['median_ratio_of_max']} of the maximum; violations in "
            f"all runs: **{c['violations_total']}**",
            f"- Target: first 60 within {c['target_ramp_up_share']:g} of a window, zero "
            f"violations: {yes[c['target_met']]}",
        ]
    lines += [
        "",
        "Raw figures: `ib_fetch.json`. Reproduce with `benchmarks/run`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions per measurement (3)")
    p.add_argument(
        "--scale",
        type=float,
        default=0.01,
        help="pacing time scale for (b), on simulator and client (0.01)",
    )
    p.add_argument(
        "--windows", type=int, default=3, help="(b) sends 60 x WINDOWS requests per run (3)"
    )
    p.add_argument(
        "--ledger",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="pacing ledger for our fetcher (sqlite, as in production)",
    )
    p.add_argument(
        "--gateway",
        choices=("process", "thread"),
        default="process",
        help="run the simulator as a child process like a real gateway (default), or in a "
        "GatewayThread inside the benchmark's process (sharing its interpreter lock)",
    )
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="(b): start fetching right after the contract look-ups, while ib_async's "
        "own 45 msg/s throttle still counts them (shows the issue in the report)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="only rewrite ib_fetch.md from an existing ib_fetch.json (no measurement)",
    )
    p.add_argument("--only", choices=("a", "b", "c"), help="run one measurement only")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = p.parse_args(argv)
    if args.reps < 1 or args.windows < 2:
        p.error("--reps must be >= 1 and --windows >= 2")

    if args.render_only:
        res = json.loads((args.out / "ib_fetch.json").read_text())
        (args.out / "ib_fetch.md").write_text(markdown(res))
        print(f"wrote {args.out / 'ib_fetch.md'} from {args.out / 'ib_fetch.json'}")
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ib_async").setLevel(logging.CRITICAL)

    def say(msg: str) -> None:
        print(msg, flush=True)

    res: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "reps": args.reps,
        "gateway_mode": args.gateway,
        "load_before": load_average(),
    }
    say(f"machine: {res['machine'].get('cpu_count')} cores; load {res['load_before']}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ib-") as tmp:
        workdir = Path(tmp)
        if args.only in (None, "a"):
            with gateway(args.gateway, workdir, audit_log=workdir / "a-audit.jsonl") as port:
                res["a"] = asyncio.run(bench_a(port, args.reps, args.ledger, workdir, say))
            a = res["a"]
            say(
                f"(a) median baseline {a['median_wall_s']['baseline']:.2f}s, ours "
                f"{a['median_wall_s']['ours']:.2f}s: {a['speedup_ratio_of_medians']:.1f}x "
                f"(target {A_TARGET_SPEEDUP:g}x: {'met' if a['target_met'] else 'NOT met'}); "
                f"same bars: {a['same_bars']}"
            )
        if args.only in (None, "b"):
            res["b"] = bench_b(
                args.reps,
                args.scale,
                args.windows,
                args.ledger,
                workdir,
                say,
                not args.no_settle,
                args.gateway,
            )
            b = res["b"]
            say(
                f"(b) median {b['median_ratio_of_max']:.3f} of max, violations "
                f"{b['violations_total']} (target {B_TARGET_RATIO:g}: "
                f"{'met' if b['target_met'] else 'NOT met'})"
            )
        if args.only in (None, "c"):
            res["c"] = bench_c(args.reps, workdir, say)
            c = res["c"]
            say(
                f"(c) median: first 60 within {c['median_ramp_up_share_of_window']:.3f} of a "
                f"window, violations {c['violations_total']} (target "
                f"{C_TARGET_RAMP_UP:g}: {'met' if c['target_met'] else 'NOT met'})"
            )
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["load_after"] = load_average()

    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        (args.out / f"ib_fetch_{args.only}.json").write_text(json.dumps(res, indent=2) + "\n")
        say(f"partial run: wrote {args.out / f'ib_fetch_{args.only}.json'} only")
        return 0
    (args.out / "ib_fetch.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "ib_fetch.md").write_text(markdown(res))
    say(
        f"wrote {args.out / 'ib_fetch.json'} and {args.out / 'ib_fetch.md'} "
        f"in {res['total_s']:.0f}s"
    )
    return 0 if all(res[k]["target_met"] for k in ("a", "b", "c")) else 1


if __name__ == "__main__":
    sys.exit(main())

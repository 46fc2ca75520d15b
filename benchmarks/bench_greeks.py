"""Greeks snapshot benchmark: the schedule's runs against the simulator, both modes at once.

What runs: the IB Gateway simulator (a :class:`GatewayThread` in this process, clock at
2026-11-18T15:00Z so prices and Greeks move, ``latency="realistic"``, market data ticks
every second, Client Portal over TLS). For every minute of ``--minutes`` (default 10) this
script does what the Dagster daemon does with ``greeks_snapshot_schedule``: at the cron
tick it evaluates the real schedule definition (cron ``* * * * *`` in UTC here, so the
benchmark runs at any hour; everything else as shipped) and launches the run it requests
as a fresh Python process that loads the code location (the bar definitions merged with
``defs.greeks.defs()``) and executes ``greeks_snapshot_job`` with that run config --
like Dagster's default run launcher, start-up time included. Each run snapshots every
``BRIDGE_POLL_INTERVAL`` (5) seconds until the next tick plus ``GREEKS_RUN_OVERLAP`` (30)
seconds. ``IB_API_MODE=SOCKET`` and ``IB_API_MODE=PORTAL`` run side by side, each with its
own data directory, against the same simulator.

Measured over the window [first tick, first tick + minutes), from what is stored in each
mode's ``greeks.duckdb``:

1. the share of 5-second grid ticks that got a snapshot. Target: >= 95 %.
2. the worst drift of a snapshot from its tick (``snapshot_time - tick_time``).
   Target: < 1 s.

Also reported: duplicates (must be 0), drift percentiles, each run's start-up delay and
tick counts. Results go to ``benchmarks/results/greeks.{json,md}``; the exit status is 0
when both targets are met in both modes. Run ``python -m benchmarks.bench_greeks`` from
the repository root (or this file by path); ``--minutes 1`` for a trial.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

_T_PROCESS = time.time()

if __package__ in (None, ""):  # run by path: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("benchmarks.bench_greeks")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLOCK = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)  # Wednesday 10:00 ET: markets open
TARGET_SHARE = 0.95
TARGET_DRIFT_S = 1.0
MODES = ("SOCKET", "PORTAL")


# -- one scheduled run (a child process, like Dagster's run worker) ------------------------------
def run_one(run_config: dict[str, Any]) -> int:
    """Load the code location and execute the Greeks job with ``run_config``; print one
    JSON line with the run's timings and materialization metadata."""
    import dagster as dg

    from ktrdr_pipeline.definitions import defs as bar_defs
    from ktrdr_pipeline.defs import greeks
    from ktrdr_pipeline.defs.greeks.assets import ASSET_NAME
    from ktrdr_pipeline.defs.greeks.jobs import JOB_NAME

    loaded = time.time()
    defs = dg.Definitions.merge(bar_defs, greeks.defs())
    job = defs.resolve_job_def(JOB_NAME)
    result = job.execute_in_process(run_config=run_config,
                                    instance=dg.DagsterInstance.ephemeral(),
                                    raise_on_error=False)
    meta: dict[str, Any] = {}
    for mat in result.asset_materializations_for_node(ASSET_NAME):
        meta = {k: v.value for k, v in mat.metadata.items()}
    print(json.dumps({"process_start": _T_PROCESS, "code_loaded": loaded,
                      "finished": time.time(), "success": result.success, "metadata": meta}),
          flush=True)
    return 0 if result.success else 1


# -- the schedule, emulated -------------------------------------------------------------------
def _env(base: dict[str, str], gw: Any, data_dir: Path, mode: str, interval: float,
         overlap: float) -> dict[str, str]:
    env = dict(base)
    env.update({
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "KTRDR_DATA_DIR": str(data_dir), "IB_API_MODE": mode, "IB_HOST": "127.0.0.1",
        "IB_PORT": str(gw.port), "IB_CLIENT_ID": "1" if mode == "SOCKET" else "50",
        "IB_PORTAL_URL": gw.server._portal.base_url,
        "IB_PORTAL_VERIFY": str(gw.server.portal_cert_path),
        "BRIDGE_POLL_INTERVAL": f"{interval:g}", "GREEKS_RUN_OVERLAP": f"{overlap:g}",
        "GREEKS_SCHEDULE_CRON": "* * * * *", "GREEKS_SCHEDULE_TIMEZONE": "UTC",
        "DAGSTER_HOME": str(data_dir / "dagster"),
    })
    (data_dir / "dagster").mkdir(parents=True, exist_ok=True)
    return env


def schedule_run_config(env: dict[str, str], tick: datetime) -> dict[str, Any]:
    """What ``greeks_snapshot_schedule`` requests for ``tick`` (evaluated as the daemon
    does, with this mode's environment)."""
    import dagster as dg

    from ktrdr_pipeline.defs import greeks
    from ktrdr_pipeline.defs.greeks.schedules import SCHEDULE_NAME

    sched = greeks.defs(env, standalone=True).resolve_schedule_def(SCHEDULE_NAME)
    result = sched.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=tick))
    (request,) = result.run_requests
    return dict(request.run_config)


def measure(db_path: Path, start: datetime, end: datetime, interval: float) -> dict[str, Any]:
    from ktrdr_pipeline.greeks.store import read_rows

    expected = []
    t = start
    while t < end:
        expected.append(t)
        t += timedelta(seconds=interval)
    rows = read_rows(db_path, "SELECT tick_time, snapshot_time, missing_greeks FROM "
                              "portfolio_greeks WHERE con_id = 0 AND tick_time >= ? AND "
                              "tick_time < ? ORDER BY tick_time", [start, end])
    got: dict[datetime, list[dict[str, Any]]] = {}
    for r in rows:
        got.setdefault(r["tick_time"].astimezone(UTC), []).append(r)
    drifts = [(r["snapshot_time"] - r["tick_time"]).total_seconds() for r in rows]
    missing = [t.isoformat() for t in expected if t not in got]
    off_grid = [t.isoformat() for t in got if t not in set(expected)]
    q = statistics.quantiles(drifts, n=100) if len(drifts) >= 2 else [0.0] * 99
    events = read_rows(db_path, "SELECT event, count(*) AS n FROM api_logs GROUP BY event "
                                "ORDER BY event")
    return {
        "expected_ticks": len(expected),
        "ticks_with_snapshot": sum(1 for t in expected if t in got),
        "share": round(sum(1 for t in expected if t in got) / max(len(expected), 1), 4),
        "duplicates": sum(len(v) - 1 for v in got.values()),
        "off_grid": off_grid,
        "missing_ticks": missing,
        "max_drift_s": round(max(drifts, default=float("nan")), 4),
        "p50_drift_s": round(q[49], 4),
        "p99_drift_s": round(q[98], 4),
        "mean_drift_s": round(statistics.fmean(drifts), 4) if drifts else None,
        "snapshots_with_missing_greeks": sum(1 for r in rows if r["missing_greeks"]),
        "api_log_events": {e["event"]: e["n"] for e in events},
    }


def run_benchmark(minutes: int, interval: float, overlap: float, modes: list[str],
                  workdir: Path) -> dict[str, Any]:
    from ktrdr_pipeline.simulator.server import GatewayThread

    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("IB_", "BRIDGE_", "GREEKS_", "KTRDR_"))}
    runs: list[dict[str, Any]] = []
    with GatewayThread(clock=CLOCK, latency="realistic", portal_port=0, portal_tls=True,
                       tick_interval=1.0) as gw:
        envs = {m: _env(base_env, gw, workdir / m.lower(), m, interval, overlap)
                for m in modes}
        now = time.time()
        first = datetime.fromtimestamp((int(now // 60) + 1) * 60, UTC)
        if (first.timestamp() - now) < 5:  # time to get ready
            first += timedelta(minutes=1)
        end = first + timedelta(minutes=minutes)
        log.info("schedule on: %d run(s) per mode from %s, window until %s", minutes,
                 first.isoformat(), end.isoformat())
        procs: list[tuple[dict[str, Any], subprocess.Popen, Any]] = []
        for k in range(minutes):
            tick = first + timedelta(minutes=k)
            configs = {m: schedule_run_config(envs[m], tick) for m in modes}
            delay = tick.timestamp() - time.time()
            if delay > 0:
                time.sleep(delay)
            for m in modes:
                logf = open(workdir / f"run-{m.lower()}-{k:02d}.log", "w")  # noqa: SIM115
                cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one",
                       json.dumps(configs[m])]
                info = {"mode": m, "tick": tick.isoformat(), "launched": time.time(),
                        "until": configs[m]["ops"]["portfolio_greeks"]["config"]["until"]}
                procs.append((info, subprocess.Popen(cmd, env=envs[m], cwd=str(ROOT),
                                                     stdout=subprocess.PIPE, stderr=logf,
                                                     text=True), logf))
            log.info("tick %s: launched %d run(s)", tick.isoformat(), len(modes))
        for info, proc, logf in procs:
            out, _ = proc.communicate(timeout=overlap + 180)
            logf.close()
            info["exit_code"] = proc.returncode
            line = next((x for x in reversed(out.splitlines()) if x.startswith("{")), "")
            if line:
                child = json.loads(line)
                info["startup_s"] = round(child["code_loaded"] - info["launched"], 3)
                info["duration_s"] = round(child["finished"] - info["launched"], 3)
                info["metadata"] = child["metadata"]
            runs.append(info)
        results = {m: measure(workdir / m.lower() / "greeks.duckdb", first, end, interval)
                   for m in modes}
    for m in modes:
        mine = [r for r in runs if r["mode"] == m]
        results[m]["runs"] = len(mine)
        results[m]["failed_runs"] = sum(1 for r in mine if r.get("exit_code"))
        starts = [r["startup_s"] for r in mine if "startup_s" in r]
        results[m]["run_startup_s"] = {"median": round(statistics.median(starts), 3),
                                       "max": round(max(starts), 3)} if starts else {}
        results[m]["passed"] = bool(results[m]["share"] >= TARGET_SHARE
                                    and results[m]["max_drift_s"] < TARGET_DRIFT_S
                                    and results[m]["duplicates"] == 0)
    return {"window_start": first.isoformat(), "window_end": end.isoformat(),
            "results": results, "runs": runs}


def write_results(report: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "greeks.json").write_text(json.dumps(report, indent=2) + "\n")
    p = report["params"]
    lines = [
        "# Portfolio Greeks snapshots: the schedule against the simulator",
        "",
        f"Run {report['started']} on {report['machine']}: `greeks_snapshot_schedule` "
        f"emulated for {p['minutes']} minute(s) (one run per minute and mode, each a fresh "
        f"Python process executing `greeks_snapshot_job`), poll interval {p['interval']:g} s, "
        f"run overlap {p['overlap']:g} s, SOCKET and PORTAL side by side against one "
        f"simulator (`latency=realistic`, market data every 1 s, Client Portal over TLS).",
        f"Window {report['window_start']} .. {report['window_end']}. Method: see the "
        "docstring of `benchmarks/bench_greeks.py`.",
        "",
        "| mode | ticks | with a snapshot | share (target >= 95 %) | worst drift (target < 1 s)"
        " | p50 / p99 drift | duplicates | run start-up (median / max) | failed runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in report["results"].items():
        st = r.get("run_startup_s") or {}
        lines.append(
            f"| {mode} | {r['expected_ticks']} | {r['ticks_with_snapshot']} | "
            f"{r['share'] * 100:.1f} % | {r['max_drift_s']:.3f} s | {r['p50_drift_s']:.3f} / "
            f"{r['p99_drift_s']:.3f} s | {r['duplicates']} | {st.get('median', '-')} / "
            f"{st.get('max', '-')} s | {r['failed_runs']} of {r['runs']} |")
    lines += ["", "Missing ticks:", ""]
    for mode, r in report["results"].items():
        lines.append(f"- {mode}: " + (", ".join(r["missing_ticks"]) or "none"))
    lines += ["", f"Both targets met in every mode: **{'yes' if report['passed'] else 'no'}**.",
              ""]
    (RESULTS_DIR / "greeks.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=10,
                        help="how long the schedule runs (default 10)")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="BRIDGE_POLL_INTERVAL in seconds (default 5)")
    parser.add_argument("--overlap", type=float, default=30.0,
                        help="GREEKS_RUN_OVERLAP in seconds (default 30)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated IB_API_MODEs (default SOCKET,PORTAL)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep data directories and run logs here (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="do not write results/")
    parser.add_argument("--run-one", metavar="RUN_CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s", stream=sys.stderr)
    logging.getLogger("ib_async").setLevel(logging.CRITICAL)
    if args.run_one:
        return run_one(json.loads(args.run_one))
    modes = [m.strip().upper() for m in args.modes.split(",") if m.strip()]
    if args.minutes < 1 or not modes or any(m not in MODES for m in modes):
        parser.error("--minutes must be >= 1 and --modes a list of SOCKET, PORTAL")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="bench-greeks-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = run_benchmark(args.minutes, args.interval, args.overlap, modes, workdir)
    report.update({
        "started": started,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU(s), Python "
                   f"{platform.python_version()}",
        "params": {"minutes": args.minutes, "interval": args.interval,
                   "overlap": args.overlap, "modes": modes},
        "targets": {"share": TARGET_SHARE, "max_drift_s": TARGET_DRIFT_S},
        "passed": all(r["passed"] for r in report["results"].values()),
    })
    for mode, r in report["results"].items():
        log.info("%s: %d/%d ticks (%.1f %%), worst drift %.3f s, %d duplicate(s)", mode,
                 r["ticks_with_snapshot"], r["expected_ticks"], r["share"] * 100,
                 r["max_drift_s"], r["duplicates"])
    if not args.no_write:
        write_results(report)
        log.info("results in %s", RESULTS_DIR / "greeks.md")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

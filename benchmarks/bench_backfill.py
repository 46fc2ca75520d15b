"""Backfill benchmark: the demo's initial backfill over three years, through Dagster.

What runs, per contender: the IB Gateway simulator (a child process, clock
2026-11-18T15:00Z, ``--latency realistic`` as in the demo), a fresh Dagster instance with
the demo's ``dagster.yaml`` (queued runs, two at a time, the ``ib_api`` pool), the demo's
universe (AAPL, SPY, EURUSD) as ``symbols`` partitions, ``dagster-webserver`` and
``dagster-daemon`` loading ``ktrdr_pipeline.definitions`` (``KTRDR_TIMEFRAMES=1h,1d``) --
the sensors and schedules stopped before the daemon starts, so the backfill's runs are the
only ones -- and one partition backfill of ``bars_1h`` and ``bars_1d`` for 2024, 2025 and
2026 of every symbol (18 partitions), launched over GraphQL as ``ktrdr-pipeline demo``
launches its own.

Measured: the wall time from the launch until the backfill reads completed (this includes
the backfill daemon's 30-s polling, so it moves in steps), and the time from the first run's
creation to the last run's end (the runs themselves). Also reported: the number of runs and
how many partitions' latest materialization shows that partition's own rows (read from its
Parquet file) and how many partition check results passed -- the figures the UI shows.

Contenders: the working tree's code, and with ``--baseline REF`` the same code at a git
revision (``git archive`` into a temporary directory; the simulator always comes from the
working tree), alternating for ``--reps`` rounds. Results go to
``benchmarks/results/backfill.{json,md}``. Run ``python -m benchmarks.bench_backfill`` from
the repository root.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktrdr_pipeline.services import GraphQL, Processes, bin_path, free_port  # noqa: E402

log = logging.getLogger("benchmarks.bench_backfill")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLOCK = "2026-11-18T15:00:00+00:00"
SYMBOLS = ("AAPL", "SPY", "EURUSD")
PERIODS = ("2024", "2025", "2026")
ASSETS = ("bars_1h", "bars_1d")
CHECKS = ("ohlc_valid", "unique_sorted_in_session", "calendar_gaps", "fresh")
TIMEOUT_S = 900

AUTOMATION = """
{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError {
    ... on RepositoryLocation { repositories {
        sensors { id sensorState { status } }
        schedules { id scheduleState { status } } } } } } } } }
"""
STOP_SENSOR = "mutation S($id: String!) { stopSensor(id: $id) { __typename } }"
STOP_SCHEDULE = "mutation S($id: String!) { stopRunningSchedule(id: $id) { __typename } }"
LAUNCH = """mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  }
}"""
STATUS = """query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename ... on PartitionBackfill {
      status runs { runId status creationTime startTime endTime } }
  }
}"""
LATEST = """query Latest($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode {
    latestMaterializationByPartition(partitions: $partitions) {
      partition metadataEntries { label ... on IntMetadataEntry { intValue } } } } }
}"""
CHECK = """query Check($key: AssetKeyInput!, $name: String!, $partition: String) {
  assetCheckExecutions(assetKey: $key, checkName: $name, partition: $partition, limit: 1) {
    status evaluation { success partition } }
}"""


def _export(ref: str, into: Path) -> Path:
    """The code of ``ref`` (the package and the workspace) in ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "ktrdr_pipeline"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _stop_automation(gql: GraphQL) -> None:
    entries = gql(AUTOMATION)["workspaceOrError"]["locationEntries"]
    for entry in entries:
        for repo in entry["locationOrLoadError"]["repositories"]:
            for sensor in repo["sensors"]:
                if sensor["sensorState"]["status"] == "RUNNING":
                    gql(STOP_SENSOR, {"id": sensor["id"]})
            for schedule in repo["schedules"]:
                if schedule["scheduleState"]["status"] == "RUNNING":
                    gql(STOP_SCHEDULE, {"id": schedule["id"]})


def _partition_figures(gql: GraphQL, data_dir: Path) -> dict[str, int]:
    """How many partitions show their own rows, and how many check results passed."""
    from ktrdr_pipeline.store.parquet import BarStore

    store = BarStore(data_dir)
    own_rows = passed = 0
    for asset in ASSETS:
        key = {"path": [asset]}
        partitions = [f"{p}|{s}" for s in SYMBOLS for p in PERIODS]
        latest = gql(LATEST, {"key": key, "partitions": partitions})[
            "assetNodeOrError"]["latestMaterializationByPartition"]
        for partition, mat in zip(partitions, latest, strict=True):
            period, symbol = partition.split("|")
            rows = {e["label"]: e.get("intValue") for e in (mat or {}).get("metadataEntries", [])}
            own_rows += rows.get("rows") == len(store.read(asset[5:], symbol, period))
            for name in CHECKS:
                runs = gql(CHECK, {"key": key, "name": name, "partition": partition})[
                    "assetCheckExecutions"]
                passed += bool(runs and runs[0]["status"] == "SUCCEEDED"
                               and runs[0]["evaluation"]["partition"] == partition)
    return {"partitions_with_own_rows": own_rows, "partition_checks_passed": passed}


def run_once(code_dir: Path, work: Path, latency: str) -> dict[str, Any]:
    """One backfill from an empty data directory with the code in ``code_dir``."""
    import dagster as dg

    from ktrdr_pipeline.demo import DAGSTER_YAML

    home, data_dir, logs = work / "dagster", work / "data", work / "logs"
    for d in (home, data_dir, logs):
        d.mkdir(parents=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("symbols", list(SYMBOLS))
    env = {**os.environ, "PYTHONPATH": str(code_dir), "PYTHONUNBUFFERED": "1",
           "DAGSTER_HOME": str(home), "KTRDR_DATA_DIR": str(data_dir), "IB_CLIENT_ID": "300",
           "KTRDR_TIMEFRAMES": "1h,1d", "KTRDR_RESET_WINDOW": "off", "KTRDR_CLOCK": CLOCK}
    sim_env = {**env, "PYTHONPATH": str(ROOT)}
    procs = Processes(logs, cwd=code_dir)
    web_port = free_port()
    gql = GraphQL(web_port)
    try:
        gateway = procs.start("gateway", [sys.executable, "-m", "ktrdr_pipeline.cli", "gateway",
                                          "--port", "0", "--latency", latency,
                                          "--clock", CLOCK], sim_env, stdout_pipe=True)
        ready, _, _ = select.select([gateway.stdout], [], [], 60)
        first = gateway.stdout.readline().decode().strip() if ready else ""
        if not first.startswith("listening on"):
            raise RuntimeError(f"simulator did not start: {first!r}\n{procs.tails()}")
        env["IB_PORT"] = first.rsplit(":", 1)[1]
        web = procs.start("webserver", [bin_path("dagster-webserver") or "dagster-webserver",
                                        "-m", "ktrdr_pipeline.definitions", "-h", "127.0.0.1",
                                        "-p", str(web_port)], env)
        gql.wait_ready(240, lambda: web.poll() is None)
        _stop_automation(gql)
        partitions = [f"{p}|{s}" for s in SYMBOLS for p in PERIODS]
        t0 = time.time()
        launched = gql(LAUNCH, {"params": {
            "assetSelection": [{"path": [a]} for a in ASSETS], "partitionNames": partitions,
            "title": "bench_backfill"}})["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"backfill not launched: {launched}")
        procs.start("daemon", [bin_path("dagster-daemon") or "dagster-daemon", "run", "-m",
                               "ktrdr_pipeline.definitions"], env)
        while True:
            backfill = gql(STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]
            if backfill["status"] not in ("REQUESTED", "CANCELING", "FAILING"):
                break
            if time.time() - t0 > TIMEOUT_S:
                raise RuntimeError(f"backfill not done after {TIMEOUT_S} s\n{procs.tails()}")
            time.sleep(1)
        t_done = time.time()
        runs = backfill["runs"]
        ends = [r["endTime"] for r in runs if r["endTime"]]
        return {
            "status": backfill["status"],
            "launch_to_completed_s": round(t_done - t0, 1),
            "runs_s": round(max(ends) - min(r["creationTime"] for r in runs), 1),
            "runs": len(runs),
            "failed_runs": sum(r["status"] != "SUCCESS" for r in runs),
            **_partition_figures(gql, data_dir),
        }
    finally:
        left = procs.stop()
        if left:
            log.warning("killed what outlived SIGTERM: %s", left)


def _markdown(res: dict[str, Any]) -> str:
    n_parts = len(SYMBOLS) * len(PERIODS) * len(ASSETS)
    lines = [
        "# The demo's backfill over three years, through Dagster", "",
        f"Run {res['when']} on {res['platform']}, {res['cpus']} CPU(s), Python "
        f"{res['python']}: `bars_1h` and `bars_1d` for {', '.join(PERIODS)} of "
        f"{', '.join(SYMBOLS)} ({n_parts} partitions) in one partition backfill over GraphQL, "
        f"webserver + daemon with the demo's `dagster.yaml`, simulator latency "
        f"`{res['latency']}`, {res['reps']} round(s), contenders alternating. Method: see the "
        "docstring of `benchmarks/bench_backfill.py`.", "",
        "| code | launch -> completed (median) | first run created -> last run ended (median) "
        "| runs | partitions showing their own rows | partition check results passed |",
        "|---|---|---|---|---|---|",
    ]
    for name, rounds in res["contenders"].items():
        ok = [r for r in rounds if "error" not in r]
        if not ok:
            lines.append(f"| {name} | failed: {rounds[0]['error'][:200]} | | | | |")
            continue
        lines.append(
            f"| {name} | {statistics.median(r['launch_to_completed_s'] for r in ok):.1f} s "
            f"({', '.join(str(r['launch_to_completed_s']) for r in ok)}) "
            f"| {statistics.median(r['runs_s'] for r in ok):.1f} s "
            f"({', '.join(str(r['runs_s']) for r in ok)}) "
            f"| {ok[-1]['runs']} | {ok[-1]['partitions_with_own_rows']} of {n_parts} "
            f"| {ok[-1]['partition_checks_passed']} of {n_parts * len(CHECKS)} |")
    lines += ["", "The completion time includes the backfill daemon's 30-s polling; the run "
              "span is the backfill's runs themselves."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", metavar="REF", help="also run the code at this git revision")
    p.add_argument("--reps", type=int, default=1, help="rounds (default 1)")
    p.add_argument("--latency", default="realistic", choices=("realistic", "none"))
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = p.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)  # not the root logger: alembic's set-up chatter stays quiet
    log.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="bench_backfill_") as tmp:
        contenders = {"working tree": ROOT}
        if args.baseline:
            sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short",
                                  args.baseline], check=True, capture_output=True,
                                 text=True).stdout.strip()
            code = Path(tmp) / "baseline"
            code.mkdir()
            contenders = {f"baseline {sha}": _export(args.baseline, code), **contenders}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
        for rep in range(args.reps):
            for name, code_dir in contenders.items():
                log.info("round %d: %s", rep + 1, name)
                work = Path(tmp) / f"{len(results[name])}-{name.replace(' ', '_')}"
                try:
                    outcome = run_once(code_dir, work, args.latency)
                except Exception as exc:  # reported, the other contender still runs
                    log.exception("%s failed", name)
                    outcome = {"error": str(exc)}
                log.info("%s: %s", name, outcome)
                results[name].append(outcome)
    res = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
           "platform": platform.platform(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "latency": args.latency, "reps": args.reps,
           "contenders": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backfill.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "backfill.md").write_text(_markdown(res))
    print(_markdown(res))
    return 0 if all("error" not in r for rounds in results.values() for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())

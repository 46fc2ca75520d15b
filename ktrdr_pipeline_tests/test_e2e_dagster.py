"""End to end: simulator, ``symbols add``, dagster-webserver and dagster-daemon as separate
processes; a partition backfill of ``bars_1h`` and ``bars_1d`` launched over GraphQL
(2 symbols x 3 years) runs through the daemon in packed runs, yet every partition shows its
own materialization metadata and its own result of each check in the webserver's API (what
the UI shows), and the bars are queryable with the ``sql`` command. Everything is stopped afterwards and nothing may be left running.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from ktrdr_pipeline.services import GraphQL, Processes, bin_path, free_port, port_open

REPO = Path(__file__).resolve().parents[1]
#: The simulator's clock: Wednesday 2026-11-18, 10:00 US/Eastern.
CLOCK = "2026-11-18T15:00:00+00:00"
SYMBOLS = ("AAPL", "EURUSD")
PERIODS = ("2024", "2025", "2026")
CHECKS = ("ohlc_valid", "unique_sorted_in_session", "calendar_gaps", "fresh",
          "bars_outside_sessions")
#: Checks that must pass: all of them (``KTRDR_CLOCK`` gives the sensors and the ``fresh``
#: check the simulator's clock).
MUST_PASS = CHECKS
#: One run per symbol (its 3 periods of both assets), 2 at a time, each a run worker plus one
#: process per step (the assets and their checks): about 60-90 s on 2 cores, plus up to
#: 30 s for the daemon to notice (and to mark the backfill complete).
BACKFILL_TIMEOUT_S = 300
ASSETS = ("bars_1h", "bars_1d")

#: A minimal instance config. Runs go through the QueuedRunCoordinator (Dagster's default);
#: ``dequeue_interval_seconds: 1`` (default 5) only makes the daemon pick queued runs up
#: sooner, ``max_concurrent_runs: 2`` (default 10) keeps a 2-core machine from running more
#: run workers than it has cores. Telemetry off: nothing is written outside the instance.
DAGSTER_YAML = """\
run_queue:
  max_concurrent_runs: 2
  dequeue_interval_seconds: 1
telemetry:
  enabled: false
"""


def _multi_key(symbol: str, period: str) -> str:
    import dagster as dg

    return str(dg.MultiPartitionKey({"symbol": symbol, "period": period}))


def _bin(name: str) -> str:
    found = bin_path(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def _read_first_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from the gateway within {timeout}s")
    return proc.stdout.readline().decode().strip()


LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

BACKFILL_STATUS = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status numPartitions
      error { message stack }
      runs { runId status tags { key value } }
    }
    ... on PythonError { message }
  }
}
"""

RUN_ERRORS = """
query Logs($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection { events { __typename
        ... on MessageEvent { message stepKey }
        ... on ErrorEvent { error { message stack } } } }
  }
}
"""

AUTOMATION = """
{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError {
    ... on RepositoryLocation { repositories {
        sensors { id name sensorState { status } }
        schedules { id name scheduleState { status } } } } } } } } }
"""

STOP_SENSOR = """
mutation Stop($id: String!) {
  stopSensor(id: $id) { __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message } }
}
"""

STOP_SCHEDULE = """
mutation Stop($id: String!) {
  stopRunningSchedule(id: $id) { __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on PythonError { message } }
}
"""

MATERIALIZATIONS = """
query Mats($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset { assetMaterializations(limit: 100) { partition runId } }
  }
}
"""

CHECK_EXECUTIONS = """
query Checks($key: AssetKeyInput!, $name: String!, $partition: String) {
  assetCheckExecutions(assetKey: $key, checkName: $name, partition: $partition, limit: 100) {
    runId status partition
    evaluation { success partition }
  }
}
"""

#: What the UI's partition view shows: each partition's latest materialization.
LATEST_BY_PARTITION = """
query Latest($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode {
    latestMaterializationByPartition(partitions: $partitions) {
      partition runId
      metadataEntries { label
        ... on IntMetadataEntry { intValue }
        ... on TextMetadataEntry { text }
        ... on BoolMetadataEntry { boolValue }
        ... on MarkdownMetadataEntry { mdStr } } } } }
}
"""


def _wait_for_location(gql: GraphQL, procs: Processes, timeout: float = 90) -> None:
    try:
        gql.wait_ready(timeout)
    except RuntimeError as exc:
        raise AssertionError(f"{exc}\n{procs.tails()}") from None


def _stop_automation(gql: GraphQL) -> list[str]:
    """Stop every running sensor and schedule (before the daemon starts), so that the only
    runs are the backfill's: the tail-fill automation would otherwise request runs for the
    same partitions. Automation has tests of its own."""
    stopped = []
    entries = gql(AUTOMATION)["workspaceOrError"]["locationEntries"]
    for entry in entries:
        for repo in entry["locationOrLoadError"]["repositories"]:
            for sensor in repo["sensors"]:
                if sensor["sensorState"]["status"] == "RUNNING":
                    result = gql(STOP_SENSOR, {"id": sensor["id"]})["stopSensor"]
                    assert result["instigationState"]["status"] == "STOPPED", result
                    stopped.append(sensor["name"])
            for schedule in repo["schedules"]:
                if schedule["scheduleState"]["status"] == "RUNNING":
                    result = gql(STOP_SCHEDULE, {"id": schedule["id"]})["stopRunningSchedule"]
                    assert result["scheduleState"]["status"] == "STOPPED", result
                    stopped.append(schedule["name"])
    return stopped


def _run_failures(gql: GraphQL, runs: list[dict]) -> str:
    out = []
    for run in runs:
        if run["status"] == "SUCCESS":
            continue
        events = gql(RUN_ERRORS, {"runId": run["runId"]})["logsForRun"].get("events", [])
        errors = [f"{e.get('stepKey')}: {e['error']['message']}"
                  f"{''.join(e['error'].get('stack') or [])[-1500:]}"
                  for e in events if e.get("error")]
        out.append(f"run {run['runId']} {run['status']}:\n" + "\n".join(errors[-5:]))
    return "\n".join(out)


def _expected_fx_1h_bars(year: int, until: datetime | None = None) -> int:
    """All-hours bars of an IDEALPRO pair in the year's period, which is cut at midnight
    US/Eastern; ``until``: the simulator's clock (its bar in progress counts). IDEALPRO
    trades Sunday 17:15 to Friday 17:00 US/Eastern with a daily pause 17:00-17:15
    (docs/ib-facts.md §9): every local hour has a bar (the 17:00 hour's starts at 17:15)
    except Saturday's, Sunday's before 17:00 and Friday's from 17:00."""
    tz = ZoneInfo("US/Eastern")
    t = datetime(year, 1, 1, tzinfo=tz).astimezone(UTC)
    end = datetime(year + 1, 1, 1, tzinfo=tz).astimezone(UTC)
    if until is not None:
        end = min(end, until + timedelta(hours=1))
    n = 0
    while t < end:
        local = t.astimezone(tz)
        day, hour = local.weekday(), local.hour
        n += not (day == 5 or (day == 6 and hour < 17) or (day == 4 and hour >= 17))
        t += timedelta(hours=1)
    return n


def _expected_aapl_1h_bars(year: int, until: date | None = None) -> int:
    """RTH hour bars per NYSE session: 09:30 plus one per full hour before the close
    (7 on a regular day, 4 on a 13:00 half day); ``until``'s session counts only up to
    the clock (10:00 ET: the 09:30 bar and the 10:00 bar in progress)."""
    import exchange_calendars as xcals

    cal = xcals.get_calendar("XNYS")
    last = until or date(year, 12, 31)
    n = 0
    for session in cal.sessions_in_range(f"{year}-01-01", last.isoformat()):
        if until is not None and session.date() == until:
            n += 2
            continue
        close = cal.session_close(session).tz_convert("America/New_York")
        n += 1 + (close.hour - 10)
    return n


def _assert_each_partition_shows_its_own(gql: GraphQL, asset: str, partitions: list[str],
                                         run_ids: set[str], data_dir: Path) -> None:
    """Through the webserver, for every partition: its latest materialization describes
    its own stored bars, and each check has a result for that partition that passed."""
    from ktrdr_pipeline.defs.bars.partitions import symbol_period
    from ktrdr_pipeline.store.parquet import BarStore

    key = {"path": [asset]}
    store = BarStore(data_dir)
    latest = gql(LATEST_BY_PARTITION, {"key": key, "partitions": partitions})[
        "assetNodeOrError"]["latestMaterializationByPartition"]
    assert [m["partition"] for m in latest] == partitions, latest
    for mat in latest:
        partition = mat["partition"]
        symbol, period = symbol_period(partition)
        frame = store.read(asset.removeprefix("bars_"), symbol, period)
        meta = {e["label"]: next((v for k, v in e.items() if k != "label"), None)
                for e in mat["metadataEntries"]}
        assert mat["runId"] in run_ids, (asset, mat)
        assert len(frame) and meta["rows"] == len(frame), (asset, partition, meta)
        assert meta["first_bar"] == frame.index[0].isoformat(), (asset, partition, meta)
        assert meta["last_bar"] == frame.index[-1].isoformat(), (asset, partition, meta)
        assert str(frame.index[-1]) in meta["preview"], (asset, partition, meta)
        for name in CHECKS:
            executions = [e for e in gql(CHECK_EXECUTIONS, {
                "key": key, "name": name, "partition": partition})["assetCheckExecutions"]
                if e["runId"] in run_ids]
            # exactly one result for the partition from the backfill, not one per run
            assert len(executions) == 1, (asset, partition, name, executions)
            [execution] = executions
            assert execution["partition"] == partition, (asset, name, execution)
            assert execution["evaluation"]["partition"] == partition, (asset, name, execution)
            if name in MUST_PASS:
                assert execution["status"] == "SUCCEEDED", (asset, partition, name, execution)
                assert execution["evaluation"]["success"], (asset, partition, name, execution)


@pytest.mark.slow
def test_backfill_over_graphql_with_webserver_and_daemon(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    data_dir = tmp_path / "data"
    web_port = free_port()
    procs = Processes(logs, cwd=REPO)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "DAGSTER_HOME": str(home),
        "KTRDR_DATA_DIR": str(data_dir),
        "IB_CLIENT_ID": "200",
        "KTRDR_TIMEFRAMES": "1h,1d",
        # no pause for IB's nightly reset when this runs near midnight US/Eastern
        "KTRDR_RESET_WINDOW": "off",
        "KTRDR_CLOCK": CLOCK,
    }
    gql = GraphQL(web_port)
    ib_port = None
    try:
        gateway = procs.start("gateway", [
            sys.executable, "-m", "ktrdr_pipeline.cli", "gateway", "--port", "0",
            "--latency", "none", "--clock", CLOCK], env, stdout_pipe=True)
        first = _read_first_line(gateway, 30)
        assert first.startswith("listening on 127.0.0.1:"), (first, procs.tails())
        ib_port = int(first.rsplit(":", 1)[1])
        env["IB_PORT"] = str(ib_port)

        added = subprocess.run(
            [sys.executable, "-m", "ktrdr_pipeline.cli", "symbols", "add", *SYMBOLS],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert added.returncode == 0, added.stdout + added.stderr
        assert json.loads(added.stdout) == {s: {"added": s} for s in SYMBOLS}

        procs.start("webserver", [_bin("dagster-webserver"), "-w", "workspace.yaml",
                                  "-h", "127.0.0.1", "-p", str(web_port)], env)
        _wait_for_location(gql, procs)

        _stop_automation(gql)
        partitions = sorted(_multi_key(s, p) for s in SYMBOLS for p in PERIODS)
        launched = gql(LAUNCH_BACKFILL, {"params": {
            "assetSelection": [{"path": [a]} for a in ASSETS], "partitionNames": partitions,
            "title": "e2e bars_1h and bars_1d",
        }})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]
        # The backfill daemon looks for work every 30 s (Dagster's fixed interval) and once
        # at start: starting it after the launch saves up to one interval.
        procs.start("daemon", [_bin("dagster-daemon"), "run", "-w", "workspace.yaml"], env)

        deadline = time.monotonic() + BACKFILL_TIMEOUT_S
        while True:
            backfill = gql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
            assert backfill["__typename"] == "PartitionBackfill", backfill
            if backfill["status"] not in ("REQUESTED", "CANCELING", "FAILING"):
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"backfill {backfill_id} still {backfill['status']} after "
                    f"{BACKFILL_TIMEOUT_S}s; runs: {backfill['runs']}\n{procs.tails()}")
            time.sleep(2)
        runs = backfill["runs"]
        failures = _run_failures(gql, runs)
        assert backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), (
            f"backfill {backfill['status']}: {backfill['error']}\n{failures}\n{procs.tails()}")
        assert runs and all(r["status"] == "SUCCESS" for r in runs), failures
        assert backfill["numPartitions"] == len(partitions)
        # the backfill policy packs each symbol's periods into one run (both assets have
        # the same partitions, so Dagster may run them together)
        ranges = sorted(
            ({t["key"]: t["value"] for t in r["tags"]}.get("dagster/asset_partition_range_start"),
             {t["key"]: t["value"] for t in r["tags"]}.get("dagster/asset_partition_range_end"))
            for r in runs)
        assert sorted(set(ranges)) == [(_multi_key(s, PERIODS[0]), _multi_key(s, PERIODS[-1]))
                                       for s in SYMBOLS], runs

        run_ids = {r["runId"] for r in runs}
        for asset in ASSETS:
            asset_key = {"path": [asset]}
            mats = gql(MATERIALIZATIONS, {"key": asset_key})["assetOrError"][
                "assetMaterializations"]
            assert sorted({m["partition"] for m in mats}) == partitions, (asset, mats)
            assert {m["runId"] for m in mats} <= run_ids
            _assert_each_partition_shows_its_own(gql, asset, partitions, run_ids, data_dir)

        def sql(query: str) -> list[dict]:
            out = subprocess.run(
                [sys.executable, "-m", "ktrdr_pipeline.cli", "sql", query, "--format", "json"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        summary = sql("SELECT symbol, count(*) n, min(ts), max(ts) FROM bars_1h "
                      "GROUP BY symbol ORDER BY symbol")
        assert [r["symbol"] for r in summary] == list(SYMBOLS), summary
        per_year = {(r["symbol"], r["period"]): r["n"] for r in sql(
            "SELECT symbol, period, count(*) n FROM bars_1h GROUP BY ALL ORDER BY ALL")}
        assert set(per_year) == {(s, p) for s in SYMBOLS for p in PERIODS}, per_year
        clock = datetime.fromisoformat(CLOCK)
        for period in PERIODS:
            current = period == "2026"
            expected = {
                "AAPL": _expected_aapl_1h_bars(int(period), clock.date() if current else None),
                "EURUSD": _expected_fx_1h_bars(int(period), clock if current else None),
            }
            assert {s: per_year[(s, period)] for s in SYMBOLS} == expected, (period, per_year)
        totals = {r["symbol"]: r["n"] for r in summary}
        assert totals == {s: sum(per_year[(s, p)] for p in PERIODS) for s in SYMBOLS}
        aapl = summary[0]
        assert str(aapl["min(ts)"]).startswith("2024-01-02")  # first session of 2024
        assert str(aapl["max(ts)"]).startswith("2026-11-18")  # up to the simulator's clock
    finally:
        leftovers = procs.stop()
        tails = procs.tails()
    assert not leftovers, f"processes survived SIGTERM: {leftovers}\n{tails}"
    assert not port_open(web_port), "the webserver's port is still open"
    if ib_port is not None:
        assert not port_open(ib_port), "the gateway's port is still open"


# --- symbols: a partition added in the UI stays (issue 11) ----------------------------------

LOCATIONS = """
{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError {
    ... on RepositoryLocation { repositories { name } } } } } } }
"""

ADD_PARTITION = """
mutation Add($repo: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""


@pytest.mark.slow
def test_partition_added_in_the_ui_survives_the_symbols_sensor(tmp_path):
    """The UI's "Add a partition" (GraphQL ``addDynamicPartition`` through the webserver):
    three ticks of ``symbols_sensor`` later the partition is still there, and the universe
    file lists it."""
    import dagster as dg

    from ktrdr_pipeline.defs.bars.sensors import symbols_sensor
    from ktrdr_pipeline.defs.resources import KtrdrSettings
    from ktrdr_pipeline.universe import load_universe

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    universe = data_dir / "universe.yaml"
    universe.write_text("# the desk's list\nsymbols:\n  - AAPL\n")
    web_port = free_port()
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs", cwd=REPO)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "DAGSTER_HOME": str(home),
        "KTRDR_DATA_DIR": str(data_dir),
        "KTRDR_TIMEFRAMES": "1h,1d",
    }
    env.pop("KTRDR_UNIVERSE", None)
    resources = {"ktrdr": KtrdrSettings(data_dir=str(data_dir))}
    gql = GraphQL(web_port)
    try:
        procs.start("webserver", [_bin("dagster-webserver"), "-w", "workspace.yaml",
                                  "-h", "127.0.0.1", "-p", str(web_port)], env)
        _wait_for_location(gql, procs)
        [entry] = gql(LOCATIONS)["workspaceOrError"]["locationEntries"]
        [repo] = entry["locationOrLoadError"]["repositories"]
        selector = {"repositoryLocationName": entry["name"], "repositoryName": repo["name"]}
        with dg.DagsterInstance.from_config(str(home)) as instance:
            cursor = None
            for tick in range(4):  # the first tick registers AAPL, three more follow
                if tick == 1:
                    added = gql(ADD_PARTITION, {"repo": selector, "name": "symbols",
                                                "key": "MSFT"})["addDynamicPartition"]
                    assert added == {"__typename": "AddDynamicPartitionSuccess",
                                     "partitionKey": "MSFT"}, added
                result = symbols_sensor(dg.build_sensor_context(
                    instance=instance, resources=resources, cursor=cursor))
                for request in result.dynamic_partitions_requests or []:
                    assert isinstance(request, dg.AddDynamicPartitionsRequest), request
                    instance.add_dynamic_partitions("symbols", list(request.partition_keys))
                cursor = result.cursor or cursor
            assert sorted(instance.get_dynamic_partitions("symbols")) == ["AAPL", "MSFT"]
        assert load_universe(universe).keys == ["AAPL", "MSFT"]
        assert universe.read_text().startswith("# the desk's list\n")
    finally:
        leftovers = procs.stop()
        tails = procs.tails()
    assert not leftovers, f"processes survived SIGTERM: {leftovers}\n{tails}"

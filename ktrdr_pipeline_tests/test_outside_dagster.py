"""Work done outside Dagster (``ktrdr-pipeline load``, ``greeks run --once``) is reported
to the Dagster instance at ``DAGSTER_HOME``, so the UI (read here through the webserver's
GraphQL API) shows those partitions as materialized, with their own metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import dagster as dg
import pyarrow.parquet as pq
import pytest

from ktrdr_pipeline.services import GraphQL, Processes, free_port
from ktrdr_pipeline.simulator.server import GatewayThread
from ktrdr_pipeline.store.parquet import BarStore

from .test_e2e_dagster import CLOCK, REPO, _bin, _wait_for_location

MATERIALIZATIONS = """
query Materializations($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: $partitions) {
        partition runId
        metadataEntries {
          label
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
          ... on BoolMetadataEntry { boolValue }
        }
      }
    }
  }
}
"""


def _entries(materialization: dict) -> dict[str, object]:
    out: dict[str, object] = {}
    for e in materialization["metadataEntries"]:
        value = next((e[k] for k in ("intValue", "floatValue", "text", "boolValue") if k in e),
                     None)
        out[e["label"]] = value
    return out


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_load_and_greeks_outside_dagster_show_as_materialized(tmp_path):
    home, data_dir = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("symbols", ["AAPL"])
    web_port = free_port()
    procs = Processes(tmp_path, cwd=REPO)
    with GatewayThread(clock=datetime.fromisoformat(CLOCK), latency="none") as gw:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                   [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "DAGSTER_HOME": str(home), "KTRDR_DATA_DIR": str(data_dir),
               "IB_PORT": str(gw.port), "IB_CLIENT_ID": "300", "KTRDR_CLOCK": CLOCK,
               "KTRDR_RESET_WINDOW": "off", "KTRDR_TIMEFRAMES": "1h,1d"}
        loaded = _cli("load", "AAPL", "--timeframe", "1d", "--start", "2026-10-01",
                      "--end", "2026-10-30", "--json", env=env)
        assert loaded.returncode == 0, loaded.stderr
        assert "reported 1 materialization(s) to the Dagster instance" in loaded.stderr
        greeks = _cli("greeks", "run", "--once", env=env)
        assert greeks.returncode == 0, greeks.stderr
    stored = pq.read_table(BarStore(data_dir).path("1d", "AAPL", "2026"))
    gql = GraphQL(web_port)
    try:
        procs.start("webserver", [_bin("dagster-webserver"), "-w", "workspace.yaml",
                                  "-h", "127.0.0.1", "-p", str(web_port)], env)
        _wait_for_location(gql, procs)
        bars = gql(MATERIALIZATIONS, {"key": {"path": ["bars_1d"]},
                                      "partitions": ["2026|AAPL"]})["assetOrError"]
        assert bars["__typename"] == "Asset", bars
        (mat,) = bars["assetMaterializations"]
        meta = _entries(mat)
        assert mat["partition"] == "2026|AAPL" and mat["runId"] == ""  # runless: no run
        assert meta["rows"] == stored.num_rows == 22  # the October sessions it loaded
        ts = stored.column("ts").to_pylist()
        assert meta["first_bar"] == ts[0].isoformat() and meta["last_bar"] == ts[-1].isoformat()
        assert meta["use_rth"] is True and meta["what_to_show"] == "TRADES"
        portfolio = gql(MATERIALIZATIONS, {"key": {"path": ["portfolio_greeks"]},
                                           "partitions": None})["assetOrError"]
        (snap,) = portfolio["assetMaterializations"]
        meta = _entries(snap)
        assert meta["snapshots"] == meta["ticks"] == 1 and meta["portfolio_positions"] == 8
    finally:
        procs.stop()

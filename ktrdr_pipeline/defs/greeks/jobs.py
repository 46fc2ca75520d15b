"""``greeks_snapshot_job``: separate from the bar jobs (no ``ib_api`` pool: a long
backfill never delays the Greeks)."""

from __future__ import annotations

import dagster as dg

from .assets import portfolio_greeks

JOB_NAME = "greeks_snapshot_job"


greeks_snapshot_job = dg.define_asset_job(
    JOB_NAME, selection=dg.AssetSelection.assets(portfolio_greeks),
    description="Portfolio Greeks snapshots until the schedule's next tick.")

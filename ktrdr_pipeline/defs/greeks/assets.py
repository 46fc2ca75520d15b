"""``portfolio_greeks``: the DuckDB table ``portfolio_greeks`` as an asset, and its check
``portfolio_greeks_fresh``.

A scheduled run takes a snapshot every ``BRIDGE_POLL_INTERVAL`` seconds on the wall-clock
grid until the schedule's next tick plus ``GREEKS_RUN_OVERLAP`` seconds (the next run's
start-up time; ticks are claimed across processes and stored once, so the overlap costs
nothing). A run without config (materialized by hand) takes one snapshot. The check: the
newest snapshot is at most ``GREEKS_MAX_AGE`` seconds older than the schedule says it
should be (warning severity).
"""


import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime

import dagster as dg

from ...greeks.config import GreeksConfig
from ...greeks.health import Freshness, check_freshness
from ...greeks.model import Snapshot
from ...greeks.runner import RunStats, run_snapshots
from ...settings import parse_utc_time
from ..resources import KtrdrSettings
from .ticks import GreeksSchedule

ASSET_NAME = "portfolio_greeks"


class GreeksRunConfig(dg.Config):
    """``until``: ISO 8601 time at which the run stops taking snapshots (set by the
    schedule); empty: take one snapshot. ``scheduled``: the schedule tick, for the record."""

    until: str = ""
    scheduled: str = ""


def _meta(values: Mapping[str, object]) -> dict[str, object]:
    return {k: "" if v is None else v for k, v in values.items()}


def _parse_time(text: str, name: str) -> datetime:
    try:
        return parse_utc_time(text)
    except ValueError:
        raise dg.Failure(f"{name} must be an ISO 8601 time, got {text!r}") from None


@dg.asset(
    name=ASSET_NAME,
    group_name="greeks",
    kinds={"duckdb"},
    description="Portfolio option Greeks: one PORTFOLIO aggregate row and one row per "
                "position every BRIDGE_POLL_INTERVAL seconds, in KTRDR_DATA_DIR/greeks.duckdb "
                "(table portfolio_greeks; connection events in api_logs).",
)
def portfolio_greeks(context: dg.AssetExecutionContext, config: GreeksRunConfig,
                     ktrdr: KtrdrSettings) -> dg.MaterializeResult:
    cfg = GreeksConfig.from_env(settings=ktrdr.settings())  # bad settings fail here, first
    until = _parse_time(config.until, "until") if config.until else None
    context.log.info(f"{cfg.mode} bridge: "
                     + (f"snapshots until {until.isoformat()}" if until else "one snapshot"))
    stats, snap = asyncio.run(run_snapshots(cfg, until=until, once=until is None))
    if until is not None and stats.ticks and not stats.snapshots and not stats.taken_elsewhere:
        raise dg.Failure(f"no snapshot in {stats.ticks} tick(s): IB unreachable "
                         f"({cfg.mode}); see api_logs", metadata=_meta(stats.as_dict()))
    meta = run_metadata(cfg, stats, snap)
    if config.scheduled:
        meta["scheduled"] = config.scheduled
    return dg.MaterializeResult(metadata=meta)


def run_metadata(cfg: GreeksConfig, stats: RunStats,
                 snap: Snapshot | None) -> dict[str, object]:
    """What a run of the bridge records on ``portfolio_greeks``: its statistics, mode and
    database, and the portfolio row of its last snapshot."""
    meta: dict[str, object] = {**stats.as_dict(), "mode": cfg.mode,
                               "database": str(cfg.db_path)}
    if snap is not None:
        meta.update({f"portfolio_{k}": v for k, v in snap.summary().items()
                     if k != "snapshot_id"})
    return _meta(meta)


def greeks_materialization(cfg: GreeksConfig, stats: RunStats,
                           snap: Snapshot | None) -> dg.AssetMaterialization:
    """A run of ``ktrdr-pipeline greeks run`` as a materialization of ``portfolio_greeks``."""
    return dg.AssetMaterialization(asset_key=ASSET_NAME, metadata=run_metadata(cfg, stats, snap),
                                   description="snapshots taken by ktrdr-pipeline greeks run")


@dg.asset_check(asset=portfolio_greeks, name="portfolio_greeks_fresh",
                description="The newest snapshot is at most GREEKS_MAX_AGE seconds older than "
                            "the schedule expects (now during scheduled hours, else the end "
                            "of the last scheduled run).")
def portfolio_greeks_fresh(ktrdr: KtrdrSettings) -> dg.AssetCheckResult:
    report = greeks_freshness(GreeksConfig.from_env(settings=ktrdr.settings()))
    return dg.AssetCheckResult(passed=report.passed, severity=dg.AssetCheckSeverity.WARN,
                               description=report.message, metadata=report.metadata())


def greeks_freshness(config: GreeksConfig, now: datetime | None = None) -> Freshness:
    """The freshness check's verdict at ``now``, the schedule saying when the newest
    snapshot is due."""
    now = now or datetime.now(UTC)
    return check_freshness(config, now, GreeksSchedule.of(config).expected_newest(now))

"""One partitioned asset per timeframe, ``bars_<tf>``, built by one factory."""

import asyncio

import dagster as dg

from ...domain.timeframes import Timeframe
from ...loader import MODES, PartitionResult, PipelineContext, load_partition
from ...settings import DEFAULT_PARTITIONS_START
from ..resources import KtrdrSettings
from .partitions import bar_partitions, symbol_period

#: Runs of IB-bound assets share this concurrency pool (see dagster.yaml in the README).
IB_POOL = "ib_api"
#: A backfill packs up to this many partitions (a range of the period × symbol grid: one
#: symbol's periods, or one period's symbols) into one run, so a multi-year backfill costs
#: one process and one IB connection per run, not per partition.
#: Each partition of such a packed run still records its own materialization metadata
#: (below) and its own check results (checks.py), as a single-partition run does.
MAX_PARTITIONS_PER_RUN = 12
BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN)


class BarLoadConfig(dg.Config):
    """``fill`` (default) fetches only the missing bars; ``full`` re-fetches whole periods."""

    mode: str = "fill"


def partition_metadata(result: PartitionResult) -> dict[str, object]:
    """What one partition's materialization shows: its stored bars and what loading cost."""
    meta: dict[str, object] = {
        "rows": result.rows,
        "first_bar": result.first_bar or "",
        "last_bar": result.last_bar or "",
        "ib_requests": result.ib_requests_made,
        "bars_fetched": result.fetched_bars,
        "gaps_found": result.gaps_found,
        "gaps_filled": result.gaps_filled,
        # expected bars IB answered without (nothing traded): not asked for again
        "known_empty_bars": result.known_empty_bars,
        # bars IB served outside the calendar's sessions: stored, listed by the
        # bars_outside_sessions check
        "bars_outside_sessions": result.bars_outside_sessions,
        "use_rth": result.use_rth,
        "what_to_show": result.what_to_show,
    }
    if result.preview:
        preview = result.preview
        header = "| " + " | ".join(preview[0]) + " |\n|" + "---|" * len(preview[0]) + "\n"
        body = "".join("| " + " | ".join(str(v) for v in row.values()) + " |\n"
                       for row in preview)
        meta["preview"] = dg.MetadataValue.md(header + body)
    return meta


def bar_asset_key(timeframe: str) -> dg.AssetKey:
    return dg.AssetKey(f"bars_{timeframe}")


def build_bar_asset(tf: Timeframe, start: str = DEFAULT_PARTITIONS_START) -> dg.AssetsDefinition:
    """``bars_<tf>``, partitioned by symbol × period from ``start``."""

    @dg.asset(
        name=f"bars_{tf.name}",
        partitions_def=bar_partitions(tf, start),
        pool=IB_POOL,
        backfill_policy=BACKFILL_POLICY,
        group_name="bars",
        kinds={"parquet", "duckdb"},
        description=f"{tf.bar_size} bars from Interactive Brokers as Parquet, partitioned by "
                    f"symbol × {tf.period} period; only missing bars are fetched.",
        tags={"timeframe": tf.name},
    )
    def _bars(context: dg.AssetExecutionContext, config: BarLoadConfig,
              ktrdr: KtrdrSettings) -> dg.MaterializeResult:
        if config.mode not in MODES:
            raise dg.Failure(f"unknown mode {config.mode!r}; allowed: {', '.join(MODES)}")
        keys = list(context.partition_keys)
        results: list[PartitionResult] = []
        try:
            asyncio.run(_load_all(context, ktrdr, tf, [symbol_period(k) for k in keys],
                                  config.mode, results))
        except Exception:
            # the run fails, and Dagster records no materialization for it: the partitions
            # written before the failure are recorded one by one, so the UI shows them
            for key, result in zip(keys, results, strict=False):
                context.log_event(dg.AssetMaterialization(
                    asset_key=context.asset_key, partition=key,
                    metadata=partition_metadata(result)))
            raise
        # Metadata per partition: Dagster writes one materialization per partition of the
        # run, each with its own metadata merged over the run's (which stays empty, so a
        # packed run does not show one partition's figures on all the others).
        for key, result in zip(keys, results, strict=True):
            context.add_asset_metadata(partition_metadata(result), partition_key=key)
        from ...store.catalog import CatalogLockedError, refresh_catalog

        try:
            settings = ktrdr.settings()
            refresh_catalog(settings.data_dir, timeframes=settings.timeframes)
        except CatalogLockedError as exc:  # the bars are written; only the catalog waits
            context.log.warning(f"catalog not refreshed: {exc}")
        return dg.MaterializeResult()

    return _bars


async def _load_all(context: dg.AssetExecutionContext, ktrdr: KtrdrSettings, tf: Timeframe,
                    keys: list[tuple[str, str]], mode: str,
                    results: list[PartitionResult]) -> None:
    """Load ``keys`` in order into ``results`` (which keeps the ones done before a
    failure)."""
    ctx = PipelineContext.from_settings(ktrdr.settings())
    try:
        for symbol, period in keys:
            result = await load_partition(ctx, symbol, tf, period, mode)
            context.log.info(
                f"{symbol} {tf.name} {period}: {result.status}, {result.cached_before} stored, "
                f"{result.gaps_found} gap(s), {result.ib_requests_made} IB request(s), "
                f"{result.fetched_bars} bar(s) fetched, {result.rows} rows")
            results.append(result)
    finally:
        await ctx.close()

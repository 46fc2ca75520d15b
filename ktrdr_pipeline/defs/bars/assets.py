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
#: A backfill packs up to this many partitions (of one symbol) into one run, so a
#: multi-year backfill costs one process and one IB connection per run, not per period.
#: Dagster records the checks of such a packed run once for the run (they evaluate every
#: partition in it, see checks.py); single-partition runs (sensors, the UI) get results
#: per partition.
MAX_PARTITIONS_PER_RUN = 12
BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN)


class BarLoadConfig(dg.Config):
    """``fill`` (default) fetches only the missing bars; ``full`` re-fetches whole periods."""

    mode: str = "fill"


def _metadata(results: list[PartitionResult]) -> dict[str, object]:
    rows = sum(r.rows for r in results)
    firsts = [r.first_bar for r in results if r.first_bar]
    lasts = [r.last_bar for r in results if r.last_bar]
    meta: dict[str, object] = {
        "partitions": len(results),
        "rows": rows,
        "first_bar": min(firsts) if firsts else "",
        "last_bar": max(lasts) if lasts else "",
        "ib_requests": sum(r.ib_requests_made for r in results),
        "bars_fetched": sum(r.fetched_bars for r in results),
        "gaps_found": sum(r.gaps_found for r in results),
        "gaps_filled": sum(r.gaps_filled for r in results),
        # expected bars IB answered without (nothing traded): not asked for again
        "known_empty_bars": sum(r.known_empty_bars for r in results),
        "use_rth": results[0].use_rth if results else True,
        "what_to_show": results[0].what_to_show if results else "",
    }
    preview = [row for r in results[-1:] for row in r.preview]
    if preview:
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
        keys = [symbol_period(k) for k in context.partition_keys]
        results = asyncio.run(_load_all(context, ktrdr, tf, keys, config.mode))
        from ...store.catalog import CatalogLockedError, refresh_catalog

        try:
            settings = ktrdr.settings()
            refresh_catalog(settings.data_dir, timeframes=settings.timeframes)
        except CatalogLockedError as exc:  # the bars are written; only the catalog waits
            context.log.warning(f"catalog not refreshed: {exc}")
        return dg.MaterializeResult(metadata=_metadata(results))

    return _bars


async def _load_all(context: dg.AssetExecutionContext, ktrdr: KtrdrSettings, tf: Timeframe,
                    keys: list[tuple[str, str]], mode: str) -> list[PartitionResult]:
    ctx = PipelineContext.from_settings(ktrdr.settings())
    results = []
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
    return results

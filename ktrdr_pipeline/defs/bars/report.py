"""Partitions loaded by ``ktrdr-pipeline load``, as materializations of ``bars_<tf>``
(reported to the instance by :mod:`ktrdr_pipeline.defs.instance`)."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from ...loader import PartitionResult
from .assets import bar_asset_key, partition_metadata
from .partitions import bar_partition_key


def load_materializations(results: Sequence[PartitionResult]) -> list[dg.AssetMaterialization]:
    """One materialization per partition the load wrote, with the metadata a run of the
    asset records for it (a partition that was already complete is not re-reported: its
    latest materialization, and the check results that judged it, stay current)."""
    return [dg.AssetMaterialization(asset_key=bar_asset_key(r.timeframe),
                                    partition=bar_partition_key(r.symbol, r.period),
                                    metadata=partition_metadata(r),
                                    description="loaded by ktrdr-pipeline load")
            for r in results if r.bars_written]

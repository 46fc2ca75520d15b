"""One job per timeframe: one job cannot span assets with different partitions, so the
sensors and schedules of the bar assets target these."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

from ...domain.timeframes import Timeframe
from .assets import bar_asset_key

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )


def bar_job_name(timeframe: str) -> str:
    return f"bars_{timeframe}_job"


def build_bar_job(tf: Timeframe) -> UnresolvedAssetJobDefinition:
    """``bars_<tf>_job``: the asset ``bars_<tf>`` with its checks."""
    return dg.define_asset_job(bar_job_name(tf.name),
                               selection=dg.AssetSelection.assets(bar_asset_key(tf.name)),
                               tags={"ktrdr/timeframe": tf.name})

"""The Dagster Definitions, assembled from ``defs/``."""

from __future__ import annotations

import dagster as dg

from .defs.assets import bar_assets, bar_jobs
from .defs.automation import (
    daily_tail_fill,
    daily_tail_fill_job,
    symbols_sensor,
    tail_fill_sensor,
)
from .defs.checks import bar_checks
from .defs.greeks import greeks_definitions
from .defs.resources import KtrdrSettings

defs = dg.Definitions.merge(
    dg.Definitions(
        assets=bar_assets(),
        asset_checks=bar_checks(),
        sensors=[symbols_sensor, tail_fill_sensor],
        schedules=[daily_tail_fill],
        jobs=[daily_tail_fill_job, *bar_jobs()],
        resources={"ktrdr": KtrdrSettings()},
    ),
    greeks_definitions(),
)

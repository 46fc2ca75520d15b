"""The Dagster Definitions, assembled from ``defs/``."""

from __future__ import annotations

import dagster as dg

from .defs.assets import bar_assets
from .defs.checks import bar_checks
from .defs.resources import KtrdrSettings

defs = dg.Definitions(
    assets=bar_assets(),
    asset_checks=bar_checks(),
    resources={"ktrdr": KtrdrSettings()},
)

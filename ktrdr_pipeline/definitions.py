"""The code location: the Definitions of every domain under ``defs/``, merged.

Built when Dagster loads the code location (``@dg.definitions``), not at import time, so
the settings are read then and a bad one stops the load with the variable named."""

from __future__ import annotations

import dagster as dg

from .defs import bars, greeks
from .defs.resources import ktrdr_resource
from .settings import AutomationSettings, Settings, environment


@dg.definitions
def defs() -> dg.Definitions:
    settings = Settings.from_env()
    return dg.Definitions.merge(
        bars.defs(settings, AutomationSettings.from_env()),
        greeks.defs(),
        dg.Definitions(resources={"ktrdr": ktrdr_resource(environment())}),
    )

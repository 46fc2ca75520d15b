"""The code location: the Definitions of every domain under ``defs/``, merged.

Built when Dagster loads the code location (``@dg.definitions``), not at import time, so
the settings are read then and a bad one stops the load with the variable named."""

from __future__ import annotations

import warnings

import dagster as dg

from .defs import bars, greeks
from .defs.resources import ktrdr_resource
from .settings import AutomationSettings, Settings, environment


@dg.definitions
def defs() -> dg.Definitions:
    settings = Settings.from_env()
    with warnings.catch_warnings():
        # Chosen on purpose and pinned with Dagster 1.13: backfill policies (beta) and
        # partitioned asset checks (preview). Their warnings, repeated on every load of the
        # code location by the daemon, would read like failures in its log.
        warnings.simplefilter("ignore", dg.BetaWarning)
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.Definitions.merge(
            bars.defs(settings, AutomationSettings.from_env()),
            greeks.defs(),
            dg.Definitions(resources={"ktrdr": ktrdr_resource(environment())}),
        )

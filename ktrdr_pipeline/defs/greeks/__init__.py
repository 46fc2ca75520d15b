"""The portfolio Greeks in Dagster (the core is :mod:`ktrdr_pipeline.greeks`): the asset
``portfolio_greeks`` with its check, ``greeks_snapshot_job`` and
``greeks_snapshot_schedule``; :mod:`.ticks` does the schedule's cron arithmetic with the
code Dagster's scheduler runs.

Merge :func:`defs` into the code location's ``Definitions``; it expects the ``ktrdr``
resource (:class:`~ktrdr_pipeline.defs.resources.KtrdrSettings`) defined there.
"""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from ..resources import KtrdrSettings
from .assets import portfolio_greeks, portfolio_greeks_fresh
from .jobs import greeks_snapshot_job
from .schedules import build_schedule


def defs(env: Mapping[str, str] | None = None, *, standalone: bool = False) -> dg.Definitions:
    """The Greeks asset, its check, job and schedule, to merge with the code location's
    ``Definitions`` (which provides the ``ktrdr`` resource; Dagster refuses two resource
    objects under one key). ``standalone=True`` adds the ``ktrdr`` resource, for using
    these definitions on their own."""
    return dg.Definitions(
        assets=[portfolio_greeks],
        asset_checks=[portfolio_greeks_fresh],
        jobs=[greeks_snapshot_job],
        schedules=[build_schedule(env)],
        resources={"ktrdr": KtrdrSettings()} if standalone else None,
    )

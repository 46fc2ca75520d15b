"""Reporting work done outside Dagster to the Dagster instance, so the UI shows it.

``ktrdr-pipeline load`` and ``ktrdr-pipeline greeks run`` write the same files as the
assets; when there is a Dagster instance (``DAGSTER_HOME``, or ``KTRDR_DATA_DIR/dagster``
where the demo keeps one) they also record what they wrote as runless asset
materializations (``instance.report_runless_asset_event``), with the metadata a run of the
asset records, so those partitions read as materialized in the UI. With no instance,
nothing is reported (none is created just for that).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import dagster as dg

from ..settings import Settings

log = logging.getLogger(__name__)


@contextmanager
def reporting_instance(settings: Settings) -> Iterator[dg.DagsterInstance | None]:
    """The instance the CLI works with (closed on exit), or None when there is none."""
    if not settings.has_dagster_instance():
        yield None
        return
    home = settings.dagster_instance_home
    home.mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def report_materializations(settings: Settings,
                            events: Sequence[dg.AssetMaterialization]) -> int:
    """Record ``events`` as runless materializations; returns how many were recorded."""
    if not events:
        return 0
    with reporting_instance(settings) as instance:
        if instance is None:
            log.debug("no Dagster instance: %d materialization(s) not reported", len(events))
            return 0
        for event in events:
            instance.report_runless_asset_event(event)
        log.info("reported %d materialization(s) to the Dagster instance at %s", len(events),
                 settings.dagster_instance_home)
        return len(events)

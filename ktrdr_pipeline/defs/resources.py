"""Dagster resources: settings and the per-run pipeline context."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dagster as dg

from ..settings import Settings


class KtrdrSettings(dg.ConfigurableResource):
    """Where IB is and where data lives. Empty values fall back to the environment
    (``IB_HOST``, ``IB_PORT``, ``IB_CLIENT_ID``, ``KTRDR_DATA_DIR``; see ``.env.example``)."""

    ib_host: str = ""
    ib_port: int = 0
    ib_client_id: int = -1
    data_dir: str = ""

    def settings(self) -> Settings:
        base = Settings.from_env()
        changes: dict[str, object] = {}
        if self.ib_host:
            changes["ib_host"] = self.ib_host
        if self.ib_port:
            changes["ib_port"] = self.ib_port
        if self.ib_client_id >= 0:
            changes["ib_client_id"] = self.ib_client_id
        if self.data_dir:
            changes["data_dir"] = Path(self.data_dir)
        return dataclasses.replace(base, **changes)

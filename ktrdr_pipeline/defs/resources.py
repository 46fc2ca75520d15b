"""Dagster resources: the settings, shared by every domain of the code location."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from ..settings import Settings, SettingsError, data_dir_problem, validate_port

#: The resource's fields and the variables that set them (see ``.env.example``).
ENV_VARS = {"ib_host": "IB_HOST", "ib_port": "IB_PORT", "ib_client_id": "IB_CLIENT_ID",
            "data_dir": "KTRDR_DATA_DIR"}
_INT_FIELDS = ("ib_port", "ib_client_id")


class KtrdrSettings(dg.ConfigurableResource):
    """Where IB is and where data lives. Empty values fall back to the settings read from
    the environment (``IB_HOST``, ``IB_PORT``, ``IB_CLIENT_ID``, ``KTRDR_DATA_DIR``, with
    the defaults of ``.env.example``); every other setting comes from there too."""

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
            changes["ib_port"] = validate_port(self.ib_port, "ib_port")
        if self.ib_client_id >= 0:
            changes["ib_client_id"] = self.ib_client_id
        if self.data_dir:
            problem = data_dir_problem(Path(self.data_dir))
            if problem:  # the same check as for KTRDR_DATA_DIR, for a value set in Dagster
                raise SettingsError(f"the ktrdr resource's data_dir={self.data_dir!r} cannot "
                                    f"hold the data: {problem}")
            changes["data_dir"] = Path(self.data_dir)
        return dataclasses.replace(base, **changes)


def ktrdr_resource(env: Mapping[str, str]) -> KtrdrSettings:
    """The code location's ``ktrdr`` resource: each field set in ``env`` is bound to its
    variable with ``dg.EnvVar`` (Dagster resolves it in each run and the UI shows where the
    value comes from); an unset one keeps its default, i.e. the documented default."""
    fields: dict[str, object] = {}
    for name, var in ENV_VARS.items():
        if (env.get(var) or "").strip():
            fields[name] = dg.EnvVar.int(var) if name in _INT_FIELDS else dg.EnvVar(var)
    return KtrdrSettings(**fields)


__all__ = ["ENV_VARS", "KtrdrSettings", "SettingsError", "ktrdr_resource"]

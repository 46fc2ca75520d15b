"""Settings of the portfolio Greeks bridge: the base settings plus the bridge's own, as
:mod:`ktrdr_pipeline.settings` reads them (:class:`~ktrdr_pipeline.settings.GreeksSettings`).

Every value is validated when :meth:`GreeksConfig.from_env` runs (at the start of
``ktrdr-pipeline greeks run``, of a Dagster run, or of a test), before anything connects or
writes; a bad value raises :class:`~ktrdr_pipeline.settings.SettingsError` (a
``ValueError``) whose message names the variable. The cron expressions themselves are
checked by Dagster's own cron code, in the Dagster layer (:mod:`ktrdr_pipeline.defs.greeks`,
when the definitions load): this package does no cron arithmetic.

========================== ================================================ ==============
variable                   meaning                                          default
========================== ================================================ ==============
``IB_API_MODE``            ``SOCKET`` (TWS API via ib_async) or ``PORTAL``  ``SOCKET``
                           (Client Portal Web API)
``BRIDGE_POLL_INTERVAL``   seconds between snapshots, on a wall-clock grid  ``5``
``BRIDGE_BUFFER_PATH``     JSONL outage buffer                              ``KTRDR_DATA_DIR/greeks_buffer.jsonl``
``BRIDGE_FLUSH_INTERVAL``  seconds between flush attempts of the buffer     ``60``
``IB_PORTAL_URL``          Client Portal base URL                           ``https://127.0.0.1:5000/v1/api``
``IB_PORTAL_VERIFY``       TLS: ``true`` (system CAs), a PEM file (the      ``true``
                           gateway's certificate) or ``false`` (off)
``GREEKS_SCHEDULE_CRON``   Dagster schedule; several crons separated by     ``30-59 9 * * 1-5;* 10-15 * * 1-5``
                           ``;``
``GREEKS_SCHEDULE_TIMEZONE`` time zone of the crons                         ``America/New_York``
``GREEKS_RUN_OVERLAP``     seconds a scheduled run keeps going past the     ``30``
                           next tick (covers the next run's start-up)
``GREEKS_MAX_AGE``         freshness check: newest snapshot at most this    ``120``
                           many seconds older than expected
========================== ================================================ ==============

The snapshots live in ``KTRDR_DATA_DIR/greeks.duckdb`` (fixed: ``ktrdr-pipeline sql``
attaches that file read-only as ``greeks``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..settings import (
    DEFAULT_GREEKS_CRON,
    DEFAULT_GREEKS_TIMEZONE,
    DEFAULT_PORTAL_URL,
    GreeksSettings,
    Settings,
    SettingsError,
)
from ..settings import GREEKS_MODES as MODES
from ..settings import parse_mode as parse_mode  # re-exported: validates IB_API_MODE

GREEKS_DB_FILE = "greeks.duckdb"  # the name store.catalog attaches (GREEKS_FILE)
BUFFER_FILE = "greeks_buffer.jsonl"
DEFAULT_CRON = DEFAULT_GREEKS_CRON
DEFAULT_TIMEZONE = DEFAULT_GREEKS_TIMEZONE

__all__ = ["BUFFER_FILE", "DEFAULT_CRON", "DEFAULT_PORTAL_URL", "DEFAULT_TIMEZONE",
           "GREEKS_DB_FILE", "MODES", "GreeksConfig", "parse_mode"]


@dataclass(frozen=True)
class GreeksConfig:
    """Everything the Greeks bridge needs; build it with :meth:`from_env`."""

    settings: Settings = dataclasses.field(default_factory=Settings)
    mode: str = "SOCKET"
    poll_interval: float = 5.0
    buffer_path: Path = Path("./data") / BUFFER_FILE
    flush_interval: float = 60.0
    portal_url: str = DEFAULT_PORTAL_URL
    portal_verify: bool | str = True
    schedule_cron: tuple[str, ...] = tuple(DEFAULT_CRON.split(";"))
    schedule_timezone: str = DEFAULT_TIMEZONE
    run_overlap: float = 30.0
    max_age: float = 120.0

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    @property
    def db_path(self) -> Path:
        """``KTRDR_DATA_DIR/greeks.duckdb``: where ``ktrdr-pipeline sql`` looks for it."""
        return self.settings.data_dir / GREEKS_DB_FILE

    @property
    def claims_path(self) -> Path:
        """Which poll tick was last taken, shared by every process on this data dir."""
        return self.settings.data_dir / "greeks_ticks.claim"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 settings: Settings | None = None) -> GreeksConfig:
        """Read and validate every setting; ``settings`` overrides the base settings
        (IB host/port/client id, data dir), e.g. from a Dagster resource."""
        greeks = GreeksSettings.from_env(env)  # first: a bad IB_API_MODE stops everything
        base = settings if settings is not None else Settings.from_env(env)
        return cls.from_settings(base, greeks)

    @classmethod
    def from_settings(cls, base: Settings, greeks: GreeksSettings) -> GreeksConfig:
        """The bridge's configuration from settings already read and validated."""
        buffer_path = greeks.buffer_path or base.data_dir / BUFFER_FILE
        if buffer_path.exists() and buffer_path.is_dir():
            raise SettingsError(f"BRIDGE_BUFFER_PATH must be a file, {buffer_path} is a "
                                "directory")
        return cls(
            settings=base,
            mode=greeks.mode,
            poll_interval=greeks.poll_interval,
            buffer_path=buffer_path,
            flush_interval=greeks.flush_interval,
            portal_url=greeks.portal_url,
            portal_verify=greeks.portal_verify,
            schedule_cron=greeks.schedule_cron,
            schedule_timezone=greeks.schedule_timezone,
            run_overlap=greeks.run_overlap,
            max_age=greeks.max_age,
        )

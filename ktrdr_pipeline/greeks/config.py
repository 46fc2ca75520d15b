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

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..settings import GreeksSettings, Settings, SettingsError
from ..store.catalog import GREEKS_FILE as GREEKS_DB_FILE  # the file `sql` attaches

BUFFER_FILE = "greeks_buffer.jsonl"


@dataclass(frozen=True)
class GreeksConfig:
    """Everything the Greeks bridge needs; build it with :meth:`from_env` or
    :meth:`from_settings` (the defaults live in :class:`~ktrdr_pipeline.settings.GreeksSettings`
    only)."""

    settings: Settings
    mode: str
    poll_interval: float
    buffer_path: Path
    flush_interval: float
    portal_url: str
    portal_verify: bool | str
    schedule_cron: tuple[str, ...]
    schedule_timezone: str
    run_overlap: float
    max_age: float

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

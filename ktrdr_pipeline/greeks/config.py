"""Settings of the portfolio Greeks bridge, read from the environment.

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
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..settings import Settings, SettingsError

MODES = ("SOCKET", "PORTAL")
GREEKS_DB_FILE = "greeks.duckdb"  # the name store.catalog attaches (GREEKS_FILE)
BUFFER_FILE = "greeks_buffer.jsonl"
DEFAULT_PORTAL_URL = "https://127.0.0.1:5000/v1/api"
DEFAULT_CRON = "30-59 9 * * 1-5;* 10-15 * * 1-5"
DEFAULT_TIMEZONE = "America/New_York"


def parse_mode(raw: str | None) -> str:
    """``SOCKET`` or ``PORTAL`` (case-insensitive; unset or empty means ``SOCKET``)."""
    text = (raw or "").strip()
    if not text:
        return "SOCKET"
    if text.upper() not in MODES:
        raise SettingsError(
            f"IB_API_MODE must be one of {', '.join(MODES)}, got {raw!r}")
    return text.upper()


def _seconds(env: Mapping[str, str], name: str, default: float, lo: float,
             hi: float = 86400.0) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not lo <= value <= hi or value != value:
        raise SettingsError(f"{name} must be a number of seconds from {lo:g} to {hi:g}, "
                            f"got {raw!r}")
    return value


def _portal_url(env: Mapping[str, str]) -> str:
    raw = (env.get("IB_PORTAL_URL") or "").strip() or DEFAULT_PORTAL_URL
    parts = urlsplit(raw)
    try:
        port = parts.port
    except ValueError:
        raise SettingsError(f"IB_PORTAL_URL has an invalid port: {raw!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"IB_PORTAL_URL must be an http(s) URL such as "
                            f"{DEFAULT_PORTAL_URL}, got {raw!r}")
    if port is not None and not 1 <= port <= 65535:
        raise SettingsError(f"IB_PORTAL_URL port must be 1-65535, got {raw!r}")
    return raw.rstrip("/")


def _portal_verify(env: Mapping[str, str]) -> bool | str:
    raw = (env.get("IB_PORTAL_VERIFY") or "").strip()
    if raw.lower() in ("", "true", "1", "yes", "on"):
        return True
    if raw.lower() in ("false", "0", "no", "off"):
        return False
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SettingsError(
            f"IB_PORTAL_VERIFY must be 'true', 'false' or the path of the gateway's "
            f"certificate (PEM); {raw!r} is not a file")
    return str(path)


def schedule_settings(env: Mapping[str, str] | None = None) -> tuple[tuple[str, ...], str]:
    """``GREEKS_SCHEDULE_CRON`` (split on ``;``) and ``GREEKS_SCHEDULE_TIMEZONE`` (validated;
    the crons are checked where they are evaluated, in the Dagster layer)."""
    env = os.environ if env is None else env
    tz = (env.get("GREEKS_SCHEDULE_TIMEZONE") or "").strip() or DEFAULT_TIMEZONE
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"GREEKS_SCHEDULE_TIMEZONE must be an IANA time zone such as "
                            f"America/New_York, got {tz!r}") from None
    raw = (env.get("GREEKS_SCHEDULE_CRON") or "").strip() or DEFAULT_CRON
    crons = tuple(c.strip() for c in raw.split(";") if c.strip())
    if not crons:
        raise SettingsError(f"GREEKS_SCHEDULE_CRON: no cron expression in {raw!r}")
    return crons, tz


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
        env = os.environ if env is None else env
        mode = parse_mode(env.get("IB_API_MODE"))  # first: a bad mode stops everything
        base = settings if settings is not None else Settings.from_env(env)
        buffer_raw = (env.get("BRIDGE_BUFFER_PATH") or "").strip()
        buffer_path = Path(buffer_raw).expanduser() if buffer_raw else base.data_dir / BUFFER_FILE
        if buffer_path.exists() and buffer_path.is_dir():
            raise SettingsError(f"BRIDGE_BUFFER_PATH must be a file, {buffer_path} is a "
                                "directory")
        crons, tz = schedule_settings(env)
        return cls(
            settings=base,
            mode=mode,
            poll_interval=_seconds(env, "BRIDGE_POLL_INTERVAL", 5.0, 0.1, 3600.0),
            buffer_path=buffer_path,
            flush_interval=_seconds(env, "BRIDGE_FLUSH_INTERVAL", 60.0, 0.1, 3600.0),
            portal_url=_portal_url(env),
            portal_verify=_portal_verify(env),
            schedule_cron=crons,
            schedule_timezone=tz,
            run_overlap=_seconds(env, "GREEKS_RUN_OVERLAP", 30.0, 0.0, 3600.0),
            max_age=_seconds(env, "GREEKS_MAX_AGE", 120.0, 1.0, 7 * 86400.0),
        )

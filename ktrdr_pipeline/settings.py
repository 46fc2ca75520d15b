"""Every setting, read from the environment and validated here, with errors that name the
variable. No other module reads ``os.environ``: the rest of the code gets typed values.

- :class:`Settings`: where IB is, where data lives, the pipeline (timeframes, universe,
  partitions, Dagster's home);
- :class:`AutomationSettings`: the tail-fill sensor and the daily tail-fill schedule;
- :class:`GreeksSettings`: the portfolio Greeks bridge;
- :func:`pipeline_now`: ``KTRDR_CLOCK``, read at each call (sensors and checks);
- :func:`load_env_file`: ``.env`` into the environment, the shell's variables winning.

Every setting is documented in ``.env.example``. Values are read when a ``from_env`` runs
(at start of the CLI, in a Dagster resource or when Dagster loads the code location, in a
test), never at import time.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from .domain.request_budget import DEFAULT_MAX_BARS_PER_REQUEST
from .domain.reset_window import DEFAULT_RESET_WINDOW, ResetWindow
from .domain.timeframes import DEFAULT_TIMEFRAMES, Timeframe, get_timeframe

DEFAULT_DATA_DIR = Path("./data")
DEFAULT_PARTITIONS_START = "2024-01-01"
UNIVERSE_FILE = "universe.yaml"


class SettingsError(ValueError):
    """A setting from the environment is missing or malformed."""


def environment() -> dict[str, str]:
    """A copy of the process environment, e.g. to build a child process's environment."""
    return dict(os.environ)


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _text(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or "").strip()


def _int_setting(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be an integer from {lo} to {hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be an integer from {lo} to {hi}, got {value}")
    return value


def _float_setting(env: Mapping[str, str], name: str, default: float, lo: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be a number > {lo}, got {raw!r}") from None
    if not value > lo:
        raise SettingsError(f"{name} must be a number > {lo}, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = _text(env, name).lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be 1 or 0, got {env.get(name)!r}")


def _zone(env: Mapping[str, str], name: str, default: str) -> str:
    tz = _text(env, name) or default
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"{name} must be an IANA time zone such as "
                            f"America/New_York, got {tz!r}") from None
    return tz


def validate_port(value: int, name: str = "port") -> int:
    """Return ``value`` if it is a TCP port (1–65535), else raise naming ``name``."""
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise SettingsError(f"{name} must be an integer from 1 to 65535, got {value!r}")
    return value


# -- the pipeline ------------------------------------------------------------------------------
def timeframe_names(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``KTRDR_TIMEFRAMES`` (comma-separated, duplicates dropped) or the default
    ``1m,5m,15m,1h,1d``."""
    raw = _env(env).get("KTRDR_TIMEFRAMES", "")
    names = [n.strip() for n in raw.split(",") if n.strip()] or list(DEFAULT_TIMEFRAMES)
    try:
        return tuple(get_timeframe(n).name for n in dict.fromkeys(names))
    except ValueError as exc:
        raise SettingsError(f"KTRDR_TIMEFRAMES: {exc}") from None


def universe_file(env: Mapping[str, str] | None = None) -> Path | None:
    """``KTRDR_UNIVERSE``: the universe file, when it is not ``KTRDR_DATA_DIR/universe.yaml``."""
    raw = _text(_env(env), "KTRDR_UNIVERSE")
    return Path(raw).expanduser() if raw else None


def _data_dir(env: Mapping[str, str]) -> Path:
    """``KTRDR_DATA_DIR``: a directory, or a path one can be created at, that this user can
    write. Checked here so that every command (and a Dagster run) says what is wrong
    before it writes or connects anything."""
    raw = env.get("KTRDR_DATA_DIR") or DEFAULT_DATA_DIR
    path = Path(raw).expanduser()
    problem = data_dir_problem(path)
    if problem:
        raise SettingsError(f"KTRDR_DATA_DIR={raw!r} cannot hold the data: {problem}; set "
                            "it to a directory this user can write (it is created when "
                            "missing)")
    return path


def data_dir_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a writable data directory, or None."""
    for candidate in (path, *path.absolute().parents):  # the nearest existing one decides
        if candidate.exists():
            if not candidate.is_dir():
                return f"{candidate} is a file, not a directory"
            if not os.access(candidate, os.W_OK | os.X_OK):
                return f"{candidate} is not writable by this user"
            return None
    return None


def _reset_window(env: Mapping[str, str]) -> str:
    raw = _text(env, "KTRDR_RESET_WINDOW") or DEFAULT_RESET_WINDOW
    try:
        ResetWindow.parse(raw)
    except ValueError as exc:
        raise SettingsError(f"KTRDR_RESET_WINDOW: {exc}") from None
    return raw


def _partitions_start(env: Mapping[str, str]) -> str:
    raw = _text(env, "KTRDR_PARTITIONS_START") or DEFAULT_PARTITIONS_START
    try:
        if len(raw) != 10:
            raise ValueError(raw)
        date.fromisoformat(raw)
    except ValueError:
        raise SettingsError(f"KTRDR_PARTITIONS_START must be a date (YYYY-MM-DD), "
                            f"got {raw!r}") from None
    return raw


@dataclass(frozen=True)
class Settings:
    """Where IB is, where data lives, and what the pipeline loads."""

    ib_host: str = "127.0.0.1"
    ib_port: int = 4002
    ib_client_id: int = 1
    data_dir: Path = DEFAULT_DATA_DIR
    pacing_time_scale: float = 1.0
    client_id_span: int = 10
    #: validated with :meth:`ResetWindow.parse <..domain.reset_window.ResetWindow.parse>`
    reset_window: str = DEFAULT_RESET_WINDOW
    max_concurrent_large: int = 6
    #: ``KTRDR_MAX_BARS_PER_REQUEST``: the planner's per-request bar budget (LEAN's 7 D of
    #: regular-hours minute bars; see :mod:`ktrdr_pipeline.domain.planning`)
    max_bars_per_request: int = DEFAULT_MAX_BARS_PER_REQUEST
    timeframes: tuple[str, ...] = tuple(DEFAULT_TIMEFRAMES)
    universe_file: Path | None = None
    partitions_start: str = DEFAULT_PARTITIONS_START
    #: ``DAGSTER_HOME``; unset: the CLI uses ``KTRDR_DATA_DIR/dagster``
    dagster_home: Path | None = None
    #: ``KTRDR_PROGRESS``: draw the load progress bar even when stderr is no terminal
    progress_bar: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = _env(env)
        host = (env.get("IB_HOST") or "127.0.0.1").strip()
        if not host or any(c.isspace() for c in host):
            raise SettingsError(f"IB_HOST must be a host name or address, got {host!r}")
        home = _text(env, "DAGSTER_HOME")
        return cls(
            ib_host=host,
            ib_port=_int_setting(env, "IB_PORT", 4002, 1, 65535),
            ib_client_id=_int_setting(env, "IB_CLIENT_ID", 1, 0, 2**31 - 1),
            data_dir=_data_dir(env),
            pacing_time_scale=_float_setting(env, "KTRDR_PACING_TIME_SCALE", 1.0, 0.0),
            client_id_span=_int_setting(env, "IB_CLIENT_ID_SPAN", 10, 1, 1000),
            reset_window=_reset_window(env),
            max_concurrent_large=_int_setting(env, "KTRDR_MAX_CONCURRENT_LARGE", 6, 1, 50),
            max_bars_per_request=_int_setting(env, "KTRDR_MAX_BARS_PER_REQUEST",
                                              DEFAULT_MAX_BARS_PER_REQUEST, 1, 1_000_000),
            timeframes=timeframe_names(env),
            universe_file=universe_file(env),
            partitions_start=_partitions_start(env),
            dagster_home=Path(home) if home else None,
            progress_bar=_flag(env, "KTRDR_PROGRESS"),
        )

    @property
    def dagster_instance_home(self) -> Path:
        """The Dagster instance the CLI works with: ``DAGSTER_HOME``, else
        ``KTRDR_DATA_DIR/dagster`` (where the demo keeps its instance)."""
        return (self.dagster_home or Path(self.data_dir) / "dagster").expanduser().resolve()

    def has_dagster_instance(self) -> bool:
        """Whether work done outside Dagster is reported to an instance: ``DAGSTER_HOME`` is
        set, or the default instance exists (none is created just to report)."""
        return self.dagster_home is not None or self.dagster_instance_home.exists()

    @property
    def universe_path(self) -> Path:
        """The universe file the symbols sensor watches."""
        return self.universe_file or Path(self.data_dir) / UNIVERSE_FILE

    def enabled_timeframes(self) -> list[Timeframe]:
        """The timeframes that get a ``bars_<tf>`` asset."""
        return [get_timeframe(n) for n in self.timeframes]


# -- automation (Dagster sensors and schedules) -----------------------------------------------
DEFAULT_DAILY_FILL_CRON = "15 17 * * 1-5"
DEFAULT_DAILY_FILL_TZ = "US/Eastern"
DEFAULT_TAIL_FILL_INTERVAL = 300


def _interval(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _text(env, name)
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SettingsError(f"{name} must be a whole number of seconds, got {raw!r}") from None
    if value < 30:
        raise SettingsError(f"{name} must be at least 30 seconds, got {value}")
    return value


def _cron(env: Mapping[str, str], name: str, default: str) -> str:
    raw = _text(env, name) or default
    if not raw.startswith("@") and len(raw.split()) != 5:
        raise SettingsError(f"{name} must be a cron expression (5 fields), got {raw!r}")
    return raw


@dataclass(frozen=True)
class AutomationSettings:
    """When the sensors and the daily schedule of the bar assets run."""

    daily_fill_cron: str = DEFAULT_DAILY_FILL_CRON
    daily_fill_tz: str = DEFAULT_DAILY_FILL_TZ
    tail_fill_interval: int = DEFAULT_TAIL_FILL_INTERVAL

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AutomationSettings:
        env = _env(env)
        return cls(
            daily_fill_cron=_cron(env, "KTRDR_DAILY_FILL_CRON", DEFAULT_DAILY_FILL_CRON),
            daily_fill_tz=_zone(env, "KTRDR_DAILY_FILL_TZ", DEFAULT_DAILY_FILL_TZ),
            tail_fill_interval=_interval(env, "KTRDR_TAIL_FILL_INTERVAL",
                                         DEFAULT_TAIL_FILL_INTERVAL),
        )


# -- the portfolio Greeks bridge --------------------------------------------------------------
GREEKS_MODES = ("SOCKET", "PORTAL")
DEFAULT_PORTAL_URL = "https://127.0.0.1:5000/v1/api"
DEFAULT_GREEKS_CRON = "30-59 9 * * 1-5;* 10-15 * * 1-5"
DEFAULT_GREEKS_TIMEZONE = "America/New_York"


def parse_mode(raw: str | None) -> str:
    """``SOCKET`` or ``PORTAL`` (case-insensitive; unset or empty means ``SOCKET``)."""
    text = (raw or "").strip()
    if not text:
        return "SOCKET"
    if text.upper() not in GREEKS_MODES:
        raise SettingsError(
            f"IB_API_MODE must be one of {', '.join(GREEKS_MODES)}, got {raw!r}")
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
    raw = _text(env, "IB_PORTAL_URL") or DEFAULT_PORTAL_URL
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
    raw = _text(env, "IB_PORTAL_VERIFY")
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


def greeks_schedule(env: Mapping[str, str] | None = None) -> tuple[tuple[str, ...], str]:
    """``GREEKS_SCHEDULE_CRON`` (split on ``;``) and ``GREEKS_SCHEDULE_TIMEZONE`` (validated);
    the cron syntax is checked by Dagster's own cron code where the schedule is built
    (:mod:`ktrdr_pipeline.defs.greeks`)."""
    env = _env(env)
    tz = _zone(env, "GREEKS_SCHEDULE_TIMEZONE", DEFAULT_GREEKS_TIMEZONE)
    raw = _text(env, "GREEKS_SCHEDULE_CRON") or DEFAULT_GREEKS_CRON
    crons = tuple(c.strip() for c in raw.split(";") if c.strip())
    if not crons:
        raise SettingsError(f"GREEKS_SCHEDULE_CRON: no cron expression in {raw!r}")
    return crons, tz


@dataclass(frozen=True)
class GreeksSettings:
    """The Greeks bridge's own settings (IB and the data dir are in :class:`Settings`)."""

    mode: str = "SOCKET"
    poll_interval: float = 5.0
    #: ``BRIDGE_BUFFER_PATH``; ``None``: ``KTRDR_DATA_DIR/greeks_buffer.jsonl``
    buffer_path: Path | None = None
    flush_interval: float = 60.0
    portal_url: str = DEFAULT_PORTAL_URL
    portal_verify: bool | str = True
    schedule_cron: tuple[str, ...] = tuple(DEFAULT_GREEKS_CRON.split(";"))
    schedule_timezone: str = DEFAULT_GREEKS_TIMEZONE
    run_overlap: float = 30.0
    max_age: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GreeksSettings:
        env = _env(env)
        mode = parse_mode(env.get("IB_API_MODE"))  # first: a bad mode stops everything
        buffer_raw = _text(env, "BRIDGE_BUFFER_PATH")
        crons, tz = greeks_schedule(env)
        return cls(
            mode=mode,
            poll_interval=_seconds(env, "BRIDGE_POLL_INTERVAL", 5.0, 0.1, 3600.0),
            buffer_path=Path(buffer_raw).expanduser() if buffer_raw else None,
            flush_interval=_seconds(env, "BRIDGE_FLUSH_INTERVAL", 60.0, 0.1, 3600.0),
            portal_url=_portal_url(env),
            portal_verify=_portal_verify(env),
            schedule_cron=crons,
            schedule_timezone=tz,
            run_overlap=_seconds(env, "GREEKS_RUN_OVERLAP", 30.0, 0.0, 3600.0),
            max_age=_seconds(env, "GREEKS_MAX_AGE", 120.0, 1.0, 7 * 86400.0),
        )


# -- the clock and .env -----------------------------------------------------------------------
def pipeline_now(env: Mapping[str, str] | None = None) -> datetime:
    """Now for code that does not talk to IB (sensors, checks): ``KTRDR_CLOCK`` (ISO 8601)
    when set — for a simulator started with ``--clock`` and for tests — else the UTC clock."""
    raw = _text(_env(env), "KTRDR_CLOCK")
    if not raw:
        return datetime.now(UTC)
    try:
        return parse_utc_time(raw)
    except ValueError:
        raise SettingsError(f"KTRDR_CLOCK must be an ISO 8601 time, got {raw!r}") from None


def parse_utc_time(text: str) -> datetime:
    """An ISO 8601 time (``Z`` allowed; UTC when it names no zone); ``ValueError`` else."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def load_env_file(path: Path = Path(".env"), env: dict[str, str] | None = None) -> list[str]:
    """Read ``path`` (python-dotenv's syntax: ``KEY=VALUE``, ``export``, quotes, comments)
    into the environment without overriding variables already set: the shell wins.
    Returns the keys it set. ``dagster dev`` reads the same ``.env`` by itself."""
    target = os.environ if env is None else env
    if not path.is_file():
        return []
    text = path.read_text()
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:  # python-dotenv would skip the line with a warning
            original = binding.original.string
            line = binding.original.line + len(original) - len(original.lstrip("\n"))
            raise SettingsError(f"{path}:{line}: expected KEY=VALUE, "
                                f"got {original.strip()!r}")
    loaded = []
    for key, value in dotenv_values(stream=io.StringIO(text)).items():
        if value is not None and key not in target:
            target[key] = value
            loaded.append(key)
    return loaded

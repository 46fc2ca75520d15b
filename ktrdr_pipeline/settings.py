"""Settings read from the environment, validated with errors that name the variable.

Every setting is documented in `.env.example`. Values are read when `Settings.from_env()`
is called (at start of the CLI, a Dagster resource, or a test), never at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


class SettingsError(ValueError):
    """A setting from the environment is missing or malformed."""


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


def validate_port(value: int, name: str = "port") -> int:
    """Return ``value`` if it is a TCP port (1–65535), else raise naming ``name``."""
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise SettingsError(f"{name} must be an integer from 1 to 65535, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Where IB is and where data lives."""

    ib_host: str = "127.0.0.1"
    ib_port: int = 4002
    ib_client_id: int = 1
    data_dir: Path = Path("./data")
    pacing_time_scale: float = 1.0
    client_id_span: int = 10
    reset_window: str = "23:40-00:05"
    max_concurrent_large: int = 6

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        host = (env.get("IB_HOST") or "127.0.0.1").strip()
        if not host or any(c.isspace() for c in host):
            raise SettingsError(f"IB_HOST must be a host name or address, got {host!r}")
        return cls(
            ib_host=host,
            ib_port=_int_setting(env, "IB_PORT", 4002, 1, 65535),
            ib_client_id=_int_setting(env, "IB_CLIENT_ID", 1, 0, 2**31 - 1),
            data_dir=Path(env.get("KTRDR_DATA_DIR") or "./data"),
            pacing_time_scale=_float_setting(env, "KTRDR_PACING_TIME_SCALE", 1.0, 0.0),
            client_id_span=_int_setting(env, "IB_CLIENT_ID_SPAN", 10, 1, 1000),
            reset_window=_reset_window(env),
            max_concurrent_large=_int_setting(env, "KTRDR_MAX_CONCURRENT_LARGE", 6, 1, 50),
        )


def _reset_window(env: Mapping[str, str]) -> str:
    raw = (env.get("KTRDR_RESET_WINDOW") or "23:40-00:05").strip()
    from .ib.connection import ResetWindow

    try:
        ResetWindow.parse(raw)
    except ValueError as exc:
        raise SettingsError(f"KTRDR_RESET_WINDOW: {exc}") from None
    return raw


def pipeline_now(env: Mapping[str, str] | None = None) -> datetime:
    """Now for code that does not talk to IB (sensors, checks): ``KTRDR_CLOCK`` (ISO 8601)
    when set — for a simulator started with ``--clock`` and for tests — else the UTC clock."""
    raw = (os.environ if env is None else env).get("KTRDR_CLOCK", "").strip()
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
    """Read ``KEY=VALUE`` lines from ``path`` into the environment without overriding
    variables already set (the shell wins). Returns the keys it set. ``dagster dev`` reads
    the same ``.env`` by itself."""
    target = os.environ if env is None else env
    if not path.is_file():
        return []
    loaded = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key not in target:
            target[key] = value
            loaded.append(key)
    return loaded

"""Greeks bridge settings, the IB_API_MODE toggle, cron arithmetic and the CLI entry."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from dagster._utils.schedules import cron_string_iterator, reverse_cron_string_iterator

from ktrdr_pipeline.defs.greeks.schedules import build_schedule
from ktrdr_pipeline.defs.greeks.ticks import GreeksSchedule
from ktrdr_pipeline.greeks.bridges import PortalBridge, SocketBridge, make_bridge
from ktrdr_pipeline.greeks.cli import add_greeks_parser, cmd_greeks
from ktrdr_pipeline.greeks.config import GreeksConfig
from ktrdr_pipeline.greeks.store import GreeksStore
from ktrdr_pipeline.settings import SettingsError, parse_mode


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"KTRDR_DATA_DIR": str(tmp_path), **extra}


# -- the mode toggle ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw, mode", [(None, "SOCKET"), ("", "SOCKET"), ("SOCKET", "SOCKET"),
                                       ("PORTAL", "PORTAL"), (" portal ", "PORTAL")])
def test_mode_toggle_selects_the_bridge(tmp_path, raw, mode):
    env = _env(tmp_path)
    if raw is not None:
        env["IB_API_MODE"] = raw
    cfg = GreeksConfig.from_env(env)
    assert cfg.mode == mode
    store = GreeksStore(cfg.db_path, cfg.buffer_path)
    bridge = make_bridge(cfg, store)
    assert isinstance(bridge, SocketBridge if mode == "SOCKET" else PortalBridge)
    assert bridge.mode == mode


@pytest.mark.parametrize("raw", ["WEB", "TWS", "socket_api", "REST", "1"])
def test_any_other_mode_is_a_value_error_naming_the_allowed_values(tmp_path, raw):
    with pytest.raises(ValueError) as err:
        GreeksConfig.from_env(_env(tmp_path, IB_API_MODE=raw))
    text = str(err.value)
    assert "IB_API_MODE" in text and "SOCKET" in text and "PORTAL" in text and raw in text
    with pytest.raises(ValueError):
        parse_mode(raw)


def test_a_bad_mode_stops_the_command_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("KTRDR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IB_API_MODE", "CLIENT_PORTAL")
    monkeypatch.setenv("IB_PORT", "1")  # nothing listens there: a connect would fail late
    parser = argparse.ArgumentParser()
    add_greeks_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["greeks", "run", "--once"])
    assert args.func is cmd_greeks and args.once
    with pytest.raises(ValueError, match="IB_API_MODE must be one of SOCKET, PORTAL"):
        args.func(args)
    assert not (tmp_path / "data").exists()  # no database, no buffer, nothing


# -- other settings ----------------------------------------------------------------------------
def test_defaults(tmp_path):
    cfg = GreeksConfig.from_env(_env(tmp_path))
    assert cfg.poll_interval == 5.0
    assert cfg.flush_interval == 60.0
    assert cfg.buffer_path == tmp_path / "greeks_buffer.jsonl"
    assert cfg.db_path == tmp_path / "greeks.duckdb"
    assert cfg.portal_url == "https://127.0.0.1:5000/v1/api"
    assert cfg.portal_verify is True
    assert cfg.schedule_timezone == "America/New_York"
    assert cfg.schedule_cron == ("30-59 9 * * 1-5", "* 10-15 * * 1-5")


@pytest.mark.parametrize("name, value", [
    ("BRIDGE_POLL_INTERVAL", "fast"), ("BRIDGE_POLL_INTERVAL", "0"),
    ("BRIDGE_POLL_INTERVAL", "-5"), ("BRIDGE_FLUSH_INTERVAL", "soon"),
    ("IB_PORTAL_URL", "ftp://127.0.0.1:5000/v1/api"), ("IB_PORTAL_URL", "https://:5000"),
    ("IB_PORTAL_URL", "https://127.0.0.1:99999/v1/api"),
    ("IB_PORTAL_VERIFY", "/no/such/cert.pem"), ("GREEKS_SCHEDULE_CRON", " ; "),
    ("GREEKS_SCHEDULE_TIMEZONE", "Mars/Olympus"), ("GREEKS_RUN_OVERLAP", "x"),
    ("GREEKS_MAX_AGE", "0"), ("IB_PORT", "70000"),
])
def test_invalid_values_name_the_variable(tmp_path, name, value):
    with pytest.raises(SettingsError, match=name):
        GreeksConfig.from_env(_env(tmp_path, **{name: value}))


@pytest.mark.parametrize("value", ["* * *", "61 * * * *", "0 0 31 2 *", "0 0 31 4 *",
                                   "* 10-15 * * 1-5;5-1 * * * *"])
def test_invalid_crons_name_the_variable(tmp_path, value):
    # the crons are checked by Dagster's cron code, when the definitions load
    with pytest.raises(SettingsError, match="GREEKS_SCHEDULE_CRON"):
        build_schedule(_env(tmp_path, GREEKS_SCHEDULE_CRON=value))


def test_settings_values(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = GreeksConfig.from_env(_env(
        tmp_path, BRIDGE_POLL_INTERVAL="2.5", BRIDGE_BUFFER_PATH=str(tmp_path / "b.jsonl"),
        BRIDGE_FLUSH_INTERVAL="3", IB_PORTAL_URL="https://gw.local:5001/v1/api/",
        IB_PORTAL_VERIFY=str(cert), GREEKS_SCHEDULE_CRON="*/5 * * * *",
        GREEKS_SCHEDULE_TIMEZONE="UTC"))
    assert cfg.poll_interval == 2.5 and cfg.flush_interval == 3.0
    assert cfg.buffer_path == tmp_path / "b.jsonl"
    assert cfg.portal_url == "https://gw.local:5001/v1/api"
    assert cfg.portal_verify == str(cert)
    assert cfg.schedule_cron == ("*/5 * * * *",)
    for off in ("false", "FALSE", "0", "off"):
        assert GreeksConfig.from_env(_env(tmp_path, IB_PORTAL_VERIFY=off)).portal_verify is False


# -- cron ---------------------------------------------------------------------------------------
def _et(*args: int) -> datetime:
    from zoneinfo import ZoneInfo

    return datetime(*args, tzinfo=ZoneInfo("America/New_York")).astimezone(UTC)


def test_default_schedule_covers_us_market_hours_every_minute():
    sched = GreeksSchedule(("30-59 9 * * 1-5", "* 10-15 * * 1-5"), "America/New_York")
    wed = _et(2026, 11, 18, 9, 29)
    assert sched.next_after(wed) == _et(2026, 11, 18, 9, 30)
    assert sched.next_after(_et(2026, 11, 18, 9, 30)) == _et(2026, 11, 18, 9, 31)
    assert sched.next_after(_et(2026, 11, 18, 15, 59)) == _et(2026, 11, 19, 9, 30)
    assert sched.next_after(_et(2026, 11, 20, 16, 0)) == _et(2026, 11, 23, 9, 30)  # Fri->Mon
    # a run lasts until the next tick; the day's last run one minute, not until tomorrow
    assert sched.run_end(_et(2026, 11, 18, 10, 0)) == _et(2026, 11, 18, 10, 1)
    assert sched.run_end(_et(2026, 11, 18, 15, 59), 30) == _et(2026, 11, 18, 16, 0) + \
        timedelta(seconds=30)
    assert sched.run_end(_et(2026, 11, 18, 9, 30)) == _et(2026, 11, 18, 9, 31)
    assert sched.latest_at_or_before(_et(2026, 11, 21, 12, 0)) == _et(2026, 11, 20, 15, 59)


def test_cron_syntax_and_dst():
    s = GreeksSchedule("*/15 2 * * SUN", "America/New_York")
    # 2026-03-08 is the spring-forward Sunday: 02:xx does not exist; Dagster fires once,
    # at 03:00 (the old cron.py skipped the day), then every 15 minutes of 02:xx again
    assert s.next_after(_et(2026, 3, 7, 12, 0)) == _et(2026, 3, 8, 3, 0)
    assert s.next_after(_et(2026, 3, 8, 3, 0)) == _et(2026, 3, 15, 2, 0)
    assert GreeksSchedule("@hourly").next_after(datetime(2026, 1, 1, 0, 30, tzinfo=UTC)) == \
        datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    # day-of-month OR day-of-week when both are restricted
    s = GreeksSchedule("0 0 1 * MON", "UTC")
    assert s.next_after(datetime(2026, 6, 1, 0, 0, tzinfo=UTC)) == datetime(2026, 6, 8, tzinfo=UTC)
    for bad in ("", "* * * * * *", "5-1 * * * *", "*/0 * * * *", "a b c d e"):
        with pytest.raises(SettingsError, match="GREEKS_SCHEDULE_CRON"):
            GreeksSchedule(bad)


NY = "America/New_York"


def _dagster_ticks(cron: str, start: datetime, n: int, ascending: bool = True) -> list[datetime]:
    """What Dagster's own cron iterator says, in UTC."""
    it = (cron_string_iterator(start.timestamp(), cron, NY) if ascending
          else reverse_cron_string_iterator(start.timestamp(), cron, NY))
    return [next(it).astimezone(UTC) for _ in range(n)]


def _local(t: datetime) -> str:
    return t.astimezone(ZoneInfo(NY)).strftime("%Y-%m-%d %H:%M %Z")


def test_dst_days_fire_as_dagster_does():
    # spring forward, 2026-03-08: 02:30 does not exist in New York; Dagster fires at 03:00
    s = GreeksSchedule("30 2 * * *", NY)
    start = _et(2026, 3, 7, 12, 0)
    ticks = [s.next_after(start)]
    for _ in range(2):
        ticks.append(s.next_after(ticks[-1]))
    assert [_local(t) for t in ticks] == ["2026-03-08 03:00 EDT", "2026-03-09 02:30 EDT",
                                          "2026-03-10 02:30 EDT"]
    assert ticks == _dagster_ticks("30 2 * * *", start, 3)
    back = _et(2026, 3, 9, 12, 0)
    assert s.latest_at_or_before(_et(2026, 3, 8, 12, 0)) == ticks[0]
    assert list(islice(s.ticks(back, ascending=False), 3)) == \
        _dagster_ticks("30 2 * * *", back, 3, ascending=False)
    # the run of the 03:00 tick lasts until the next day's 02:30 (23.5 h), as scheduled
    assert s.run_end(ticks[0]) == ticks[1]
    # fall back, 2026-11-01: 01:30 happens twice; Dagster fires once, at the second (EST)
    s = GreeksSchedule("30 1 * * *", NY)
    start = _et(2026, 10, 31, 12, 0)
    first = s.next_after(start)
    assert _local(first) == "2026-11-01 01:30 EST"
    assert first == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    assert [first, s.next_after(first)] == _dagster_ticks("30 1 * * *", start, 2)
    assert s.next_after(first) == datetime(2026, 11, 2, 6, 30, tzinfo=UTC)
    # every half hour through the repeated hour: the ticks Dagster gives, none twice
    s = GreeksSchedule("*/30 0-2 * * *", NY)
    start = _et(2026, 11, 1, 0, 0)
    ticks = [start]
    for _ in range(5):
        ticks.append(s.next_after(ticks[-1]))
    assert ticks == _dagster_ticks("*/30 0-2 * * *", start, 6)
    assert len(set(ticks)) == 6

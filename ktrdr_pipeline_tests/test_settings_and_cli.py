"""Settings from the environment and the ``ktrdr-pipeline gateway`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ib_async import IB, Stock

from ktrdr_pipeline.settings import Settings, SettingsError

from .conftest import read_audit


def test_defaults():
    s = Settings.from_env({})
    assert (s.ib_host, s.ib_port, s.ib_client_id) == ("127.0.0.1", 4002, 1)
    assert s.data_dir == Path("./data")


def test_values_from_environment():
    s = Settings.from_env({"IB_HOST": "10.0.0.5", "IB_PORT": "7497", "IB_CLIENT_ID": "17",
                           "KTRDR_DATA_DIR": "/tmp/x"})
    assert (s.ib_host, s.ib_port, s.ib_client_id, s.data_dir) == ("10.0.0.5", 7497, 17,
                                                                   Path("/tmp/x"))


@pytest.mark.parametrize(("env", "name"), [
    ({"IB_PORT": "0"}, "IB_PORT"),
    ({"IB_PORT": "65536"}, "IB_PORT"),
    ({"IB_PORT": "http"}, "IB_PORT"),
    ({"IB_CLIENT_ID": "1.5"}, "IB_CLIENT_ID"),
    ({"IB_CLIENT_ID": "abc"}, "IB_CLIENT_ID"),
    ({"IB_CLIENT_ID": "-3"}, "IB_CLIENT_ID"),
    ({"IB_HOST": "bad host"}, "IB_HOST"),
])
def test_invalid_settings_name_the_variable(env, name):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, **kw)


def test_cli_rejects_bad_settings_and_ports():
    bad_env = _cli("gateway", "--port", "0", env={"IB_PORT": "99999"})
    assert bad_env.returncode == 2 and "IB_PORT" in bad_env.stderr
    bad_port = _cli("gateway", "--port", "70000")
    assert bad_port.returncode == 2 and "1 to 65535" in bad_port.stderr
    bad_clock = _cli("gateway", "--clock", "yesterday")
    assert bad_clock.returncode == 2 and "ISO 8601" in bad_clock.stderr


@pytest.mark.slow
def test_gateway_command_serves_until_interrupted(tmp_path):
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ktrdr_pipeline.cli", "gateway", "--port", "0", "--latency",
         "none", "--clock", "2026-11-18T15:00:00+00:00", "--seed", "3", "--audit-log",
         str(audit)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.strip().rsplit(":", 1)[1])
        ib = IB()
        ib.connect("127.0.0.1", port, clientId=5, timeout=5)
        bars = ib.reqHistoricalData(Stock("TSLA", "SMART", "USD"), "", "1 D", "1 hour",
                                    "TRADES", True, 2)
        assert bars
        ib.disconnect()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert any(e["message"] == "historicalData" for e in read_audit(audit))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_gateway_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _cli("gateway", "--port", str(port))  # exits (within _cli's deadline)
        assert result.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_reset_window_and_client_id_span_settings():
    s = Settings.from_env({"KTRDR_RESET_WINDOW": "23:30-00:30", "IB_CLIENT_ID_SPAN": "3",
                           "IB_CLIENT_ID": "7"})
    from ktrdr_pipeline.ib.connection import IBConnection

    conn = IBConnection.from_settings(s)
    assert list(conn.client_ids) == [7, 8, 9]
    assert conn.reset_window.start.hour == 23 and conn.reset_window.end.minute == 30
    with pytest.raises(SettingsError, match="KTRDR_RESET_WINDOW"):
        Settings.from_env({"KTRDR_RESET_WINDOW": "tonight"})
    with pytest.raises(SettingsError, match="KTRDR_MAX_CONCURRENT_LARGE"):
        Settings.from_env({"KTRDR_MAX_CONCURRENT_LARGE": "51"})


def test_env_file_is_read_without_overriding_the_shell(tmp_path):
    from ktrdr_pipeline.settings import load_env_file

    path = tmp_path / ".env"
    path.write_text("# comment\nIB_PORT=7497\nexport IB_HOST='10.1.2.3'\nIB_CLIENT_ID=5\n\n")
    env = {"IB_CLIENT_ID": "9"}
    assert load_env_file(path, env) == ["IB_PORT", "IB_HOST"]
    assert Settings.from_env(env).ib_port == 7497 and env["IB_HOST"] == "10.1.2.3"
    assert env["IB_CLIENT_ID"] == "9"
    path.write_text("not a setting\n")
    with pytest.raises(SettingsError, match=".env:1"):
        load_env_file(path, {})
    assert load_env_file(tmp_path / "missing", {}) == []


def test_cli_reads_dot_env_in_the_working_directory(tmp_path):
    (tmp_path / ".env").write_text("IB_PORT=99999\n")
    env = {k: v for k, v in os.environ.items() if k != "IB_PORT"}
    result = subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "status"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "IB_PORT" in result.stderr


def test_settings_read_dot_env_without_overriding_the_shell(tmp_path, monkeypatch):
    from ktrdr_pipeline.settings import load_env_file

    (tmp_path / ".env").write_text('IB_PORT=7497\nKTRDR_TIMEFRAMES="1h, 1d"\n'
                                   "KTRDR_DAILY_FILL_TZ=UTC\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IB_PORT", "4001")  # the shell's value wins over .env
    for name in ("KTRDR_TIMEFRAMES", "KTRDR_DAILY_FILL_TZ"):
        monkeypatch.delenv(name, raising=False)
    assert sorted(load_env_file()) == ["KTRDR_DAILY_FILL_TZ", "KTRDR_TIMEFRAMES"]
    s = Settings.from_env()
    assert s.ib_port == 4001 and s.timeframes == ("1h", "1d")
    assert [tf.name for tf in s.enabled_timeframes()] == ["1h", "1d"]
    from ktrdr_pipeline.settings import AutomationSettings

    assert AutomationSettings.from_env().daily_fill_tz == "UTC"


def test_pipeline_and_automation_settings():
    from ktrdr_pipeline.settings import DEFAULT_RESET_WINDOW, AutomationSettings

    s = Settings.from_env({})
    assert s.timeframes == ("1m", "5m", "15m", "1h", "1d")
    assert s.universe_path == Path("./data/universe.yaml") and s.dagster_home is None
    assert s.partitions_start == "2024-01-01" and s.reset_window == DEFAULT_RESET_WINDOW
    assert not s.progress_bar
    s = Settings.from_env({"KTRDR_UNIVERSE": "/tmp/u.yaml", "DAGSTER_HOME": "/tmp/dh",
                           "KTRDR_PARTITIONS_START": "2020-03-01", "KTRDR_PROGRESS": "1",
                           "KTRDR_TIMEFRAMES": "1d,1h,1d"})
    assert s.universe_path == Path("/tmp/u.yaml") and s.dagster_home == Path("/tmp/dh")
    assert s.partitions_start == "2020-03-01" and s.progress_bar
    assert s.timeframes == ("1d", "1h")
    a = AutomationSettings.from_env({})
    assert (a.daily_fill_cron, a.daily_fill_tz, a.tail_fill_interval) == (
        "15 17 * * 1-5", "US/Eastern", 300)
    a = AutomationSettings.from_env({"KTRDR_DAILY_FILL_CRON": "0 18 * * 1-5",
                                     "KTRDR_TAIL_FILL_INTERVAL": "60"})
    assert (a.daily_fill_cron, a.tail_fill_interval) == ("0 18 * * 1-5", 60)


@pytest.mark.parametrize(("name", "value"), [
    ("KTRDR_TIMEFRAMES", "1h,7m"), ("KTRDR_PARTITIONS_START", "2024"),
    ("KTRDR_PARTITIONS_START", "2024-13-01"), ("KTRDR_PROGRESS", "maybe"),
    ("KTRDR_PACING_TIME_SCALE", "0"), ("IB_CLIENT_ID_SPAN", "0"),
    ("KTRDR_RESET_WINDOW", "23:40"),
])
def test_a_bad_pipeline_setting_names_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(("name", "value"), [
    ("KTRDR_DAILY_FILL_CRON", "17 * *"), ("KTRDR_DAILY_FILL_TZ", "Mars/Olympus"),
    ("KTRDR_TAIL_FILL_INTERVAL", "10"), ("KTRDR_TAIL_FILL_INTERVAL", "often"),
])
def test_a_bad_automation_setting_names_the_variable(name, value):
    from ktrdr_pipeline.settings import AutomationSettings

    with pytest.raises(SettingsError, match=name):
        AutomationSettings.from_env({name: value})


def test_pipeline_clock():
    from datetime import UTC, datetime

    from ktrdr_pipeline.settings import pipeline_now

    assert pipeline_now({"KTRDR_CLOCK": "2026-11-18T15:00:00Z"}) == datetime(
        2026, 11, 18, 15, tzinfo=UTC)
    with pytest.raises(SettingsError, match="KTRDR_CLOCK"):
        pipeline_now({"KTRDR_CLOCK": "yesterday"})


def test_reset_window_has_one_parser_and_one_default():
    from datetime import time

    from ktrdr_pipeline.domain.reset_window import DEFAULT_RESET_WINDOW, ResetWindow
    from ktrdr_pipeline.greeks.watchdog import DEFAULT_WINDOW
    from ktrdr_pipeline.ib.connection import IBConnection

    assert ResetWindow() == ResetWindow.parse(DEFAULT_RESET_WINDOW) == DEFAULT_WINDOW
    assert (ResetWindow().start, ResetWindow().end) == (time(23, 40), time(0, 5))
    assert IBConnection.from_settings(Settings()).reset_window == ResetWindow()
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        ResetWindow.parse("23:40")



def test_only_the_settings_module_reads_the_environment():
    """Settings are read and validated in one place: ``ktrdr_pipeline/settings.py``."""
    package = Path(__file__).resolve().parents[1] / "ktrdr_pipeline"
    readers = sorted(
        str(path.relative_to(package)) for path in package.rglob("*.py")
        if path.name != "settings.py" or path.parent != package
        if any(word in path.read_text() for word in ("os.environ", "getenv", "environ[")))
    assert readers == []


def test_a_fresh_dagster_home_is_set_up_without_noise(tmp_path):
    """Creating the Dagster instance's storage (the first `symbols` command, the demo) runs
    its migrations quietly: nothing a user would read as news or as a failure."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster"),
           "KTRDR_DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "dagster").mkdir()
    out = subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "symbols", "list"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "alembic" not in out.stderr and "Warning" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", [
    ["load", "AAPL", "--timeframe", "1d"], ["greeks", "run", "--once"], ["sql", "SELECT 1"],
])
@pytest.mark.parametrize("layout", ["a file", "under a file"])
def test_a_bad_data_directory_is_named_by_every_command(tmp_path, command, layout):
    """KTRDR_DATA_DIR that is a file, or lies under one, stops every command with a message
    naming the variable and what is wrong, before anything is written or connected."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("keep me")
    data_dir = blocker if layout == "a file" else blocker / "data"
    env = {**os.environ, "KTRDR_DATA_DIR": str(data_dir), "IB_PORT": "1"}
    out = subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", *command], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"KTRDR_DATA_DIR={str(data_dir)!r} cannot hold the data" in out.stderr
    assert f"{blocker} is a file, not a directory" in out.stderr
    assert "Traceback" not in out.stderr
    assert blocker.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [blocker]


def test_malformed_symbols_are_refused_before_anything_is_created(tmp_path):
    data_dir = tmp_path / "data"
    env = {**os.environ, "KTRDR_DATA_DIR": str(data_dir), "IB_PORT": "1",
           "DAGSTER_HOME": str(tmp_path / "dagster")}
    out = subprocess.run([sys.executable, "-m", "ktrdr_pipeline.cli", "symbols", "add",
                          "../x", "A" * 30], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stderr
    errors = json.loads(out.stdout)
    assert "'..'" in errors["../x"]["error"] and "at most 24" in errors["A" * 30]["error"]
    assert not data_dir.exists() and not (tmp_path / "dagster").exists()

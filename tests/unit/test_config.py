"""Configuration: one model, env vars with one prefix, secrets from files, clear errors."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from shared.config import ConfigError, load_settings, masked


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PLANNERSYNC_"):
            monkeypatch.delenv(name)


def test_defaults_are_valid_and_embedded() -> None:
    settings = load_settings()
    assert settings.database.url.startswith("sqlite")
    assert settings.busy.busy_statuses == ["Busy", "Tentative", "OOF"]
    assert settings.planner.batch_size == 15
    assert sum(settings.retry.ladder, timedelta()) >= timedelta(hours=6)


def test_nested_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNERSYNC_PLANNER__BATCH_SIZE", "7")
    monkeypatch.setenv("PLANNERSYNC_RETRY__LADDER", "1s,250ms,2m")
    monkeypatch.setenv("PLANNERSYNC_BUSY__BUSY_STATUSES", "Busy,OOF")
    settings = load_settings()
    assert settings.planner.batch_size == 7
    assert settings.retry.ladder == [timedelta(seconds=1), timedelta(milliseconds=250), timedelta(minutes=2)]
    assert settings.busy.busy_statuses == ["Busy", "OOF"]


def test_a_secret_is_read_from_its_file_and_masked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "amqp"
    secret.write_text("s3cret-from-file\n")
    monkeypatch.setenv("PLANNERSYNC_BROKER__PASSWORD_FILE", str(secret))
    settings = load_settings()
    assert settings.broker.password.get_secret_value() == "s3cret-from-file"
    assert "s3cret-from-file" not in str(masked(settings))
    assert "s3cret" in settings.broker.amqp_url()


def test_an_unreadable_secret_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PLANNERSYNC_BROKER__PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "PLANNERSYNC_BROKER" in str(caught.value) and "cannot read secret file" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("PLANNERSYNC_BROKER__PORT", "not-a-port", "PLANNERSYNC_BROKER__PORT"),
        ("PLANNERSYNC_BUSY__TIME_ZONE", "Mars/Olympus", "unknown IANA time zone"),
        ("PLANNERSYNC_BUSY__BUSY_STATUSES", "Busy,Sleeping", "unknown free/busy status"),
        ("PLANNERSYNC_RETRY__LADDER", "10s,-1s", "PLANNERSYNC_RETRY__LADDER"),
        ("PLANNERSYNC_DATABASE__URL", "oracle://x", "PLANNERSYNC_DATABASE__URL"),
        ("PLANNERSYNC_PLANNER__JOBCENTER_NUMBER", "abc", "PLANNERSYNC_PLANNER__JOBCENTER_NUMBER"),
        ("PLANNERSYNC_BROKER__PREFIX", "Bad Prefix!", "PLANNERSYNC_BROKER__PREFIX"),
        ("PLANNERSYNC_NO_SUCH_SETTING", "1", "PLANNERSYNC_NO_SUCH_SETTING"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert expected in str(caught.value)


def test_config_check_exits_2_and_names_the_variable_before_connecting() -> None:
    env = {"PATH": "/usr/bin:/bin", "PLANNERSYNC_BROKER__HEARTBEAT": "0", "PLANNERSYNC_BROKER__HOST": "192.0.2.1"}
    done = subprocess.run([sys.executable, "-m", "plannersync.cli", "run", "transformer"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "PLANNERSYNC_BROKER__HEARTBEAT" in done.stderr


def test_config_check_prints_the_effective_configuration_with_secrets_masked() -> None:
    env = {"PATH": "/usr/bin:/bin", "PLANNERSYNC_BROKER__PASSWORD": "hunter2-visible?"}
    done = subprocess.run([sys.executable, "-m", "plannersync.cli", "config", "check"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout
    assert '"prefix": "plannersync"' in done.stdout


def test_a_database_password_from_its_secret_is_put_into_the_url_percent_encoded() -> None:
    from sqlalchemy.engine import make_url

    from shared.config import with_password

    url = with_password("mssql+pymssql://svc_plannersync@sql01.kommune.dk:1433/plannersync?charset=utf8", "p@ss:w/rd%")
    parsed = make_url(url)
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == ("svc_plannersync", "p@ss:w/rd%", "sql01.kommune.dk", 1433, "plannersync")
    assert parsed.query == {"charset": "utf8"}
    assert with_password("sqlite:///var/lib/plannersync/state.db", "x") == "sqlite:///var/lib/plannersync/state.db"
    assert with_password("postgresql+psycopg://u:old@h/db", "new") == "postgresql+psycopg://u:new@h/db"
    assert with_password("postgresql+psycopg://u@h/db", None) == "postgresql+psycopg://u@h/db"

"""Configuration: one model, env vars with one prefix, secrets from files, clear errors."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

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


# --- config check validates the certificate files without connecting (decision 44) -------------------------------


def _config_check(env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(cwd or Path("/tmp"))}
    return subprocess.run([sys.executable, "-m", "plannersync.cli", "config", "check"], env={**base, **env}, capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support.tls import write_pki

    return write_pki(tmp_path_factory.mktemp("pki"))


def test_config_check_accepts_a_good_certificate_and_its_passphrase(pki: Any) -> None:
    done = _config_check({"PLANNERSYNC_PLANNER__CLIENT_CERT_P12": str(pki.client_p12), "PLANNERSYNC_PLANNER__CLIENT_CERT_PASSPHRASE_FILE": str(pki.client_p12_passphrase_file), "PLANNERSYNC_PLANNER__CA_BUNDLE": str(pki.ca_cert)})
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stderr


def test_config_check_names_a_wrong_passphrase(pki: Any, tmp_path: Path) -> None:
    wrong = tmp_path / "passphrase"
    wrong.write_text("not-it\n")
    done = _config_check({"PLANNERSYNC_PLANNER__CLIENT_CERT_P12": str(pki.client_p12), "PLANNERSYNC_PLANNER__CLIENT_CERT_PASSPHRASE_FILE": str(wrong)})
    assert done.returncode == 2
    assert "PLANNERSYNC_PLANNER__CLIENT_CERT_P12: " in done.stderr and "does not open with the passphrase in PLANNERSYNC_PLANNER__CLIENT_CERT_PASSPHRASE" in done.stderr
    assert "not-it" not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_config_check_names_a_key_that_is_not_the_certificates(pki: Any) -> None:
    done = _config_check({"PLANNERSYNC_PLANNER__CLIENT_CERT_PEM": str(pki.client_cert), "PLANNERSYNC_PLANNER__CLIENT_KEY_PEM": str(pki.server_key)})
    assert done.returncode == 2
    assert "PLANNERSYNC_PLANNER__CLIENT_KEY_PEM: " in done.stderr and "is not the private key of the certificate" in done.stderr


def test_config_check_names_a_ca_bundle_that_does_not_parse(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    for variable in ("PLANNERSYNC_PLANNER__CA_BUNDLE", "PLANNERSYNC_EXCHANGE__CA_BUNDLE"):
        done = _config_check({variable: str(bundle)})
        assert done.returncode == 2 and f"{variable}: {bundle} is not a bundle of PEM certificates" in done.stderr, done.stderr


def test_config_check_names_an_expired_certificate_and_warns_before_expiry(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from tests.support.tls import write_client_certificate

    now = datetime.now(timezone.utc)
    expired = write_client_certificate(tmp_path, "expired", not_before=now - timedelta(days=400), not_after=now - timedelta(days=2))
    done = _config_check({"PLANNERSYNC_PLANNER__CLIENT_CERT_P12": str(expired.p12), "PLANNERSYNC_PLANNER__CLIENT_CERT_PASSPHRASE_FILE": str(expired.passphrase_file)})
    assert done.returncode == 2 and "PLANNERSYNC_PLANNER__CLIENT_CERT_P12: the certificate" in done.stderr and "expired on" in done.stderr
    soon = write_client_certificate(tmp_path, "soon", not_after=now + timedelta(days=10, hours=1))
    done = _config_check({"PLANNERSYNC_PLANNER__CLIENT_CERT_PEM": str(soon.cert), "PLANNERSYNC_PLANNER__CLIENT_KEY_PEM": str(soon.key)})
    assert done.returncode == 0 and "warning: PLANNERSYNC_PLANNER__CLIENT_CERT_PEM: the certificate" in done.stderr and "expires in 10 days" in done.stderr


def test_a_missing_certificate_file_names_the_exact_variable() -> None:
    done = _config_check({"PLANNERSYNC_PLANNER__CLIENT_CERT_P12": "/nonexistent/oces.p12"})
    assert done.returncode == 2
    assert "PLANNERSYNC_PLANNER__CLIENT_CERT_P12: file not found: /nonexistent/oces.p12" in done.stderr, done.stderr
    done = _config_check({"PLANNERSYNC_PLANNER__CLIENT_CERT_PASSPHRASE_FILE": "/nonexistent/passphrase"})
    assert "PLANNERSYNC_PLANNER__CLIENT_CERT_PASSPHRASE_FILE: cannot read secret file /nonexistent/passphrase" in done.stderr, done.stderr


def test_config_check_masks_the_password_inside_a_database_url() -> None:
    done = _config_check({"PLANNERSYNC_DATABASE__URL": "postgresql+psycopg://svc:hunter2-in-url@db.kommune.dk/plannersync"})
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "postgresql+psycopg://svc:***@db.kommune.dk/plannersync" in done.stdout


# --- one state directory (decision 45) ----------------------------------------------------------------------------


def test_the_state_directory_is_the_system_one_when_writable_else_the_users(tmp_path: Path) -> None:
    from shared.config import default_state_dir

    system = tmp_path / "var-lib-plannersync"
    home = {"HOME": str(tmp_path / "home")}
    assert default_state_dir(home, system=system) == tmp_path / "home" / ".local" / "state" / "plannersync"
    assert default_state_dir({**home, "XDG_STATE_HOME": str(tmp_path / "xdg")}, system=system) == tmp_path / "xdg" / "plannersync"
    system.mkdir()
    assert default_state_dir(home, system=system) == system


def test_the_store_and_the_health_files_default_under_the_state_directory(tmp_path: Path) -> None:
    settings = load_settings(environ={"PLANNERSYNC_STATE_DIR": str(tmp_path)})
    assert settings.database.url == f"sqlite:///{tmp_path}/state.db"
    assert settings.status.health_dir == tmp_path / "health"
    explicit = load_settings(environ={"PLANNERSYNC_STATE_DIR": str(tmp_path), "PLANNERSYNC_DATABASE__URL": "sqlite:////srv/ps.db", "PLANNERSYNC_STATUS__HEALTH_DIR": "/run/ps"})
    assert (explicit.database.url, explicit.status.health_dir) == ("sqlite:////srv/ps.db", Path("/run/ps"))


@pytest.mark.parametrize(
    ("name", "value"),
    [("PLANNERSYNC_STATE_DIR", "var/state"), ("PLANNERSYNC_DATABASE__URL", "sqlite:///plannersync.db"), ("PLANNERSYNC_STATUS__HEALTH_DIR", "var/health")],
)
def test_a_relative_path_is_refused_because_it_would_depend_on_the_working_directory(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: .*absolute"):
        load_settings(environ={name: value})


def test_a_given_environment_is_read_instead_of_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNERSYNC_BROKER__HOST", "from-the-process")
    assert load_settings(environ={"PLANNERSYNC_BROKER__PORT": "5673"}).broker.host == "127.0.0.1"
    assert load_settings().broker.host == "from-the-process"


# --- AMQP over TLS (decision 46) ---------------------------------------------------------------------------------


def test_tls_to_the_broker_is_configured_in_the_broker_settings(pki: Any) -> None:
    settings = load_settings(environ={"PLANNERSYNC_BROKER__TLS": "true", "PLANNERSYNC_BROKER__CA_BUNDLE": str(pki.ca_cert), "PLANNERSYNC_BROKER__CLIENT_CERT": str(pki.client_cert), "PLANNERSYNC_BROKER__CLIENT_KEY": str(pki.client_key)})
    assert settings.broker.port == 5671 and settings.broker.amqp_url().startswith("amqps://")
    assert load_settings(environ={"PLANNERSYNC_BROKER__TLS": "true", "PLANNERSYNC_BROKER__PORT": "15671"}).broker.port == 15671
    with pytest.raises(ConfigError, match="PLANNERSYNC_BROKER__CLIENT_KEY: client_cert and client_key go together"):
        load_settings(environ={"PLANNERSYNC_BROKER__TLS": "true", "PLANNERSYNC_BROKER__CLIENT_CERT": str(pki.client_cert)})
    with pytest.raises(ConfigError, match="PLANNERSYNC_BROKER__CA_BUNDLE: file not found"):
        load_settings(environ={"PLANNERSYNC_BROKER__TLS": "true", "PLANNERSYNC_BROKER__CA_BUNDLE": "/nonexistent/ca.pem"})
    with pytest.raises(ConfigError, match="PLANNERSYNC_BROKER__TLS: ca_bundle and client_cert are used only with tls=true"):
        load_settings(environ={"PLANNERSYNC_BROKER__CA_BUNDLE": str(pki.ca_cert)})


def test_config_check_names_a_broker_client_key_that_does_not_match(pki: Any) -> None:
    done = _config_check({"PLANNERSYNC_BROKER__TLS": "true", "PLANNERSYNC_BROKER__CLIENT_CERT": str(pki.client_cert), "PLANNERSYNC_BROKER__CLIENT_KEY": str(pki.rogue_server_key)})
    assert done.returncode == 2 and "PLANNERSYNC_BROKER__CLIENT_KEY: " in done.stderr and "is not the private key of the certificate" in done.stderr


# --- the nodes of a cluster (decision 80) ------------------------------------------------------------------------


def test_the_nodes_of_a_cluster_are_listed_in_hosts_and_tried_in_that_order() -> None:
    broker = load_settings(environ={"PLANNERSYNC_BROKER__HOSTS": "rmq1:5672, rmq2:5673,rmq3,[::1]:5674"}).broker
    assert broker.addresses() == [("rmq1", 5672), ("rmq2", 5673), ("rmq3", 5672), ("::1", 5674)]
    assert broker.where() == "amqp://rmq1:5672,rmq2:5673,rmq3:5672,[::1]:5674"
    assert broker.amqp_url(("::1", 5674)) == "amqp://guest:guest@[::1]:5674/%2F"


def test_without_hosts_the_one_broker_is_host_and_port_as_before() -> None:
    broker = load_settings(environ={"PLANNERSYNC_BROKER__HOST": "rabbit", "PLANNERSYNC_BROKER__PORT": "5673"}).broker
    assert broker.addresses() == [("rabbit", 5673)]
    assert broker.amqp_url() == "amqp://guest:guest@rabbit:5673/%2F" and broker.where() == "amqp://rabbit:5673"


def test_a_node_without_a_port_takes_the_tls_port_when_tls_is_on() -> None:
    broker = load_settings(environ={"PLANNERSYNC_BROKER__TLS": "true", "PLANNERSYNC_BROKER__HOSTS": "rmq1,rmq2:15671"}).broker
    assert broker.addresses() == [("rmq1", 5671), ("rmq2", 15671)]
    assert broker.amqp_url().startswith("amqps://")


@pytest.mark.parametrize("value", ["rmq1:notaport", "rmq1:70000", "amqp://rmq1:5672", "rmq1 rmq2"])
def test_a_malformed_node_is_named_with_its_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="PLANNERSYNC_BROKER__HOSTS: .*is not host or host:port"):
        load_settings(environ={"PLANNERSYNC_BROKER__HOSTS": value})


def test_the_lease_ttl_follows_the_safety_interval_unless_set_and_must_fit_inside_it() -> None:
    assert load_settings(environ={}).exchange.lease() == timedelta(seconds=60)   # 15m / 4, at most 60 s
    assert load_settings(environ={"PLANNERSYNC_EXCHANGE__SAFETY_SYNC_INTERVAL": "20s"}).exchange.lease() == timedelta(seconds=5)
    assert load_settings(environ={"PLANNERSYNC_EXCHANGE__LEASE_TTL": "3s"}).exchange.lease() == timedelta(seconds=3)
    with pytest.raises(ConfigError) as refused:   # a TTL plus a pass (a third of it) must stay inside the safety interval
        load_settings(environ={"PLANNERSYNC_EXCHANGE__LEASE_TTL": "12m"})
    assert refused.value.problems[0].startswith("PLANNERSYNC_EXCHANGE__LEASE_TTL: 720s plus a renewal pass")


def test_a_replica_id_defaults_to_the_host_and_process_and_is_checked() -> None:
    import os
    import socket

    assert load_settings(environ={}).exchange.replica() == f"{socket.gethostname()}:{os.getpid()}"
    assert load_settings(environ={"PLANNERSYNC_EXCHANGE__REPLICA_ID": "cp-2"}).exchange.replica() == "cp-2"
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"PLANNERSYNC_EXCHANGE__REPLICA_ID": "two words"})
    assert refused.value.problems[0].startswith("PLANNERSYNC_EXCHANGE__REPLICA_ID:")

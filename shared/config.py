"""The one place configuration comes from.

Environment variables with the ``PLANNERSYNC_`` prefix, nested with ``__``
(``PLANNERSYNC_PLANNER__ENDPOINT``). Every secret can instead be given as a file
with the same name plus ``_FILE`` (``PLANNERSYNC_BROKER__PASSWORD_FILE=/run/secrets/amqp``),
the convention Docker and Kubernetes secrets use. Settings are read once in ``main``
and passed down; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping
from urllib.parse import quote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from shared.domain.busy_rules import BusyPolicy
from shared.domain.delivery_plan import ReceiptAction

ENV_PREFIX = "PLANNERSYNC_"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> Any:
    """Accept ``"10s"``, ``"5m"``, ``"2h"``, ``"250ms"``, plain seconds, or a timedelta."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


def parse_duration_list(value: Any) -> Any:
    """Accept ``"10s,1m,5m"`` as well as a JSON list."""
    if isinstance(value, str) and not value.strip().startswith("["):
        return [parse_duration(part) for part in value.split(",") if part.strip()]
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
DurationList = Annotated[list[Duration], NoDecode, BeforeValidator(parse_duration_list)]


def _split_csv(value: Any) -> Any:
    if isinstance(value, str) and not value.strip().startswith("["):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode, BeforeValidator(_split_csv)]


class _SecretFiles(BaseModel):
    """Fills ``<name>`` from the file named by ``<name>_file`` for every secret field."""

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            file_key = f"{name}_file"
            path = data.get(file_key)
            if field.annotation not in (SecretStr, SecretStr | None) or not path:
                continue
            try:
                data[name] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"{file_key}: cannot read secret file {path}: {exc.strerror}") from None
        return {key: value for key, value in data.items() if not key.endswith("_file") or key[:-5] not in cls.model_fields}


_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?$")


class BrokerSettings(_SecretFiles):
    host: str = "127.0.0.1"
    port: int = Field(5672, ge=1, le=65535)
    hosts: CsvList = Field(
        default_factory=list,
        description="the nodes of a RabbitMQ cluster as host or host:port, comma-separated, tried in this order; when set, host is not used and port is the default port",
    )
    vhost: str = "/"
    user: str = "guest"
    password: SecretStr = SecretStr("guest")
    heartbeat: int = Field(30, ge=5, le=600, description="seconds; never 0 (see runbooks/broker.md)")
    blocked_connection_timeout: Duration = timedelta(seconds=60)
    management_url: str = "http://127.0.0.1:15672"
    prefix: str = Field("plannersync", pattern=r"^[a-z][a-z0-9_-]{0,40}$", description="namespace of every exchange and queue")
    reconnect_max_delay: Duration = timedelta(seconds=30)
    max_queue_length: int = Field(1_000_000, ge=1000)
    delivery_limit: int = Field(10, ge=1, description="crash-loop guard on work queues")
    tls: bool = Field(False, description="AMQP over TLS (amqps); the port defaults to 5671 then")
    ca_bundle: Path | None = Field(None, description="CA bundle for the broker's certificate (AMQP and an https management URL); system store when unset")
    client_cert: Path | None = Field(None, description="PEM client certificate, when the broker asks for one (with client_key)")
    client_key: Path | None = Field(None, description="PEM private key of client_cert (unencrypted)")

    @model_validator(mode="after")
    def _tls_files(self) -> BrokerSettings:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(f"{'client_key' if self.client_key is None else 'client_cert'}: client_cert and client_key go together")
        for name in ("ca_bundle", "client_cert", "client_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file not found: {path}")
        if (self.ca_bundle or self.client_cert) and not self.tls:
            raise ValueError("tls: ca_bundle and client_cert are used only with tls=true")
        if self.tls and "port" not in self.model_fields_set:
            self.port = 5671
        return self

    @model_validator(mode="after")
    def _hosts(self) -> BrokerSettings:  # after _tls_files: an entry without a port takes the TLS default
        for entry in self.hosts:
            match = _ADDRESS.match(entry)
            if match is None or not 1 <= int(match.group(2) or self.port) <= 65535:
                raise ValueError(f"hosts: {entry!r} is not host or host:port (several are separated by commas)")
        return self

    def addresses(self) -> list[tuple[str, int]]:
        """Every node to try, in order: ``hosts`` when set (decision 80 in docs/decisions.md), else ``host``:``port``."""
        out = []
        for entry in self.hosts:
            match = _ADDRESS.match(entry)
            assert match is not None  # checked in _hosts
            out.append((match.group(1).strip("[]"), int(match.group(2) or self.port)))
        return out or [(self.host, self.port)]

    def amqp_url(self, address: tuple[str, int] | None = None) -> str:
        """The URL of ``address`` (default: the first node), with the credentials."""
        host, port = address or self.addresses()[0]
        vhost = quote(self.vhost, safe="")
        user = quote(self.user, safe="")
        password = quote(self.password.get_secret_value(), safe="")
        return f"{'amqps' if self.tls else 'amqp'}://{user}:{password}@{_url_host(host)}:{port}/{vhost}"

    def where(self) -> str:
        """``host:port`` of every node (and the virtual host when it is not ``/``), for messages to the operator."""
        nodes = ",".join(f"{_url_host(host)}:{port}" for host, port in self.addresses())
        return f"{'amqps' if self.tls else 'amqp'}://{nodes}" + ("" if self.vhost == "/" else f"/{self.vhost}")

    def address_settings(self) -> str:
        """The variables that say where the broker is, for messages to the operator."""
        return "PLANNERSYNC_BROKER__HOSTS" if self.hosts else "PLANNERSYNC_BROKER__HOST, PLANNERSYNC_BROKER__PORT"

    def management_verify(self) -> bool | str:
        """What requests verifies an https management URL against: the configured bundle, else the system store."""
        return str(self.ca_bundle) if self.ca_bundle is not None else True


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class DatabaseSettings(_SecretFiles):
    url: str = Field(
        "sqlite:///plannersync.db",  # replaced by <state_dir>/state.db unless set (Settings._derive_paths)
        description="SQLAlchemy URL: sqlite:////abs/path, postgresql+psycopg://user@host/db, mssql+pymssql://user@host/db; default sqlite <state_dir>/state.db",
    )
    password: SecretStr | None = Field(None, description="inserted into the URL, so it need not be written there")
    auto_upgrade: bool = Field(True, description="workers create/migrate the schema at start; set false where DDL rights are separate")
    retention: Duration = Field(timedelta(days=30), description="absent and past rows older than this are pruned nightly (keep it above the retry budget plus replay delay)")

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql(\+psycopg2?)?|mssql\+pymssql)://", value):
            raise ValueError("must start with sqlite://, postgresql+psycopg:// or mssql+pymssql://")
        return value


class RetrySettings(BaseModel):
    ladder: DurationList = Field(
        default_factory=lambda: [parse_duration(x) for x in ("10s", "1m", "5m", "30m", "2h", "2h", "2h")],
        description="broker-side delays between attempts; their sum is the retry budget",
    )
    quick_attempts: int = Field(3, ge=1, le=10, description="in-process tries (tenacity) before the broker ladder")
    quick_max_wait: Duration = timedelta(seconds=4)

    @field_validator("ladder")
    @classmethod
    def _ladder_sane(cls, value: list[timedelta]) -> list[timedelta]:
        if not value:
            raise ValueError("needs at least one delay")
        if any(step <= timedelta(0) for step in value):
            raise ValueError("every delay must be positive")
        if any(step.total_seconds() * 1000 != int(step.total_seconds() * 1000) for step in value):
            raise ValueError("delays are whole milliseconds")
        return value


class BusySettings(BaseModel):
    busy_statuses: CsvList = Field(default_factory=lambda: ["Busy", "Tentative", "OOF"])
    window_months: int = Field(3, ge=1, le=24)
    time_zone: str = "Europe/Copenhagen"
    planner_organizers: CsvList = Field(default_factory=list, description="organizer addresses whose invitations come from Planner")
    planner_uid_patterns: CsvList = Field(default_factory=list, description="regular expressions for UIDs Planner puts in calendars")

    @field_validator("time_zone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @field_validator("busy_statuses")
    @classmethod
    def _statuses_known(cls, value: list[str]) -> list[str]:
        known = {"Free", "Tentative", "Busy", "OOF", "NoData", "WorkingElsewhere"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown free/busy status {unknown}; known: {sorted(known)}")
        return value

    def policy(self) -> BusyPolicy:
        """The busy rules' parameters as the pure core takes them."""
        return BusyPolicy(
            busy_statuses=frozenset(self.busy_statuses),
            window_months=self.window_months,
            zone=ZoneInfo(self.time_zone),
            planner_organizers=frozenset(address.strip().lower() for address in self.planner_organizers),
            planner_uid_patterns=tuple(re.compile(pattern) for pattern in self.planner_uid_patterns),
        )

    @field_validator("planner_uid_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return value


DEFAULT_RECEIPT_ACTIONS: dict[str, ReceiptAction] = {
    "0": "ok",
    "8@create": "update_instead",
    "10@update": "create_instead",
    "10@delete": "ok",
    "13": "planner_originated",
    "15": "retry",
    "16": "retry",
    "*": "dead_letter",
}


class PlannerSettings(_SecretFiles):
    endpoint: str = "http://127.0.0.1:8181/PlannerExternalCalendarService.svc"
    jobcenter_number: str = Field("10100", pattern=r"^[0-9]{1,8}$", description="OrganisationCode of the jobcentre")
    request_user_identifier: str = Field("CVR:55568510-FID:9100000000518", min_length=1, max_length=255)
    user_full_name: str = Field("plannersync", min_length=1, max_length=100)
    client_cert_p12: Path | None = None
    client_cert_passphrase: SecretStr | None = None
    client_cert_pem: Path | None = None
    client_key_pem: Path | None = None
    ca_bundle: Path | None = Field(None, description="CA bundle for Planner's server certificate; system store when unset")
    insecure_skip_verify: bool = Field(False, description="never in production: logs a warning at every start")
    timeout: Duration = timedelta(seconds=60)
    max_response_bytes: int = Field(20 * 1024 * 1024, ge=64 * 1024)
    batch_size: int = Field(15, ge=1, le=500, description="events per Planner call (one mailbox per call)")
    max_batch_messages: int = Field(500, ge=1, le=5000, description="messages taken from the queue at once, grouped per mailbox")
    parallel_calls: int = Field(3, ge=1, le=10, description="mailboxes called in parallel")
    linger: Duration = timedelta(milliseconds=300)
    receipt_actions: dict[str, ReceiptAction] = Field(default_factory=lambda: dict(DEFAULT_RECEIPT_ACTIONS))
    outage_after_failures: int = Field(5, ge=1)
    outage_cooldown: Duration = timedelta(seconds=60)
    call_deadline: Duration | None = Field(None, description="hard total time of one Planner HTTP attempt, dripping answers included; default twice the timeout (decision 51)")
    tls_alert_after: Duration = Field(timedelta(minutes=5), description="TLS failures towards Planner lasting this long are logged at error level and shown in the publisher's health (decision 53)")

    @model_validator(mode="after")
    def _cert_pairs(self) -> PlannerSettings:
        # "<field>: ..." lets load_settings name the exact variable (PLANNERSYNC_PLANNER__<FIELD>)
        if (self.client_cert_pem is None) != (self.client_key_pem is None):
            raise ValueError(f"{'client_key_pem' if self.client_key_pem is None else 'client_cert_pem'}: client_cert_pem and client_key_pem go together")
        if self.client_cert_p12 and self.client_cert_pem:
            raise ValueError("client_cert_p12: give either client_cert_p12 or client_cert_pem/client_key_pem, not both")
        for name in ("client_cert_p12", "client_cert_pem", "client_key_pem", "ca_bundle"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file not found: {path}")
        if "*" not in self.receipt_actions:
            raise ValueError("receipt_actions: needs a '*' entry for codes it does not name")
        return self


class ExchangeSettings(_SecretFiles):
    endpoint: str = "http://127.0.0.1:8282/EWS/Exchange.asmx"
    username: str = "svc-plannersync"
    password: SecretStr = SecretStr("")
    auth_type: Literal["NTLM", "basic"] = "basic"
    version: Literal["Exchange2013_SP1", "Exchange2016", "Exchange2019"] = "Exchange2016"
    ca_bundle: Path | None = None
    subscription: Literal["streaming", "pull"] = "streaming"
    streaming_connections: int = Field(3, ge=1, le=20)
    mailboxes_per_connection: int = Field(200, ge=1, le=200)
    stream_minutes: int = Field(10, ge=1, le=30, description="streaming connection lifetime; reopened when Exchange closes it")
    stream_silence_timeout: Duration = Field(timedelta(minutes=3), description="a stream silent this long (no events, no keep-alives) is reopened")
    pull_interval: Duration = timedelta(seconds=10)
    safety_sync_interval: Duration = timedelta(minutes=15)
    unsubscribed_poll_interval: Duration = Field(timedelta(seconds=30), description="sync interval of a mailbox waiting for its subscription")
    mailbox_reload_interval: Duration = Field(timedelta(seconds=30), description="how often enrolments and removals are read from the store")
    sync_workers: int = Field(4, ge=1, le=32, description="mailboxes read in parallel")
    failure_backoff_max: Duration = Field(timedelta(hours=1), description="slowest retry of a failing mailbox")
    unavailable_retry: Duration = Field(timedelta(minutes=2), description="first retry of an unavailable mailbox (doubles)")
    transient_retry: Duration = Field(timedelta(seconds=2), description="first retry after a transient Exchange error (doubles)")
    call_deadline: Duration = Field(
        timedelta(seconds=120), ge=timedelta(seconds=1),
        description="hard total time of one EWS request, a dripping answer included; streams are bounded by stream_silence_timeout instead (decision 86)",
    )
    read_stuck_after: Duration = Field(
        timedelta(minutes=15), ge=timedelta(seconds=1),
        description="a mailbox read still running after this long is wedged: health turns red and the producer exits to be restarted",
    )
    snapshot_time: str = Field("02:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    snapshot_parallelism: int = Field(4, ge=1, le=32)
    snapshot_part_size: int = Field(500, ge=10, le=5000)
    default_backend: Literal["ews", "graph"] = Field(
        "ews", description="reader of a mailbox enrolled without --backend: ews (on-premises Exchange) or graph (Exchange Online, PLANNERSYNC_GRAPH__*)"
    )
    replica_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:@-]{1,100}$",
        description="this change producer's name among its replicas (decision 91); unset: <hostname>:<pid> of the running process",
    )
    lease_ttl: Duration | None = Field(
        None, ge=timedelta(seconds=1),
        description="how long a replica's lease on a mailbox lasts unrenewed (renewed every third of it); unset: a quarter of safety_sync_interval, at most 60s",
    )

    @model_validator(mode="after")
    def _lease_ttl(self) -> ExchangeSettings:
        # a dead replica's mailboxes are taken over within one lease TTL (and one renewal pass): that must be well
        # inside the safety interval, so no mailbox goes unread longer than the safety interval (decision 91)
        if self.lease_ttl is None:
            self.lease_ttl = max(timedelta(seconds=1), min(timedelta(seconds=60), self.safety_sync_interval / 4))
        if self.lease_ttl * 4 / 3 >= self.safety_sync_interval:
            raise ValueError(
                f"lease_ttl: {self.lease_ttl.total_seconds():g}s plus a renewal pass (a third of it) must be shorter than "
                f"safety_sync_interval ({self.safety_sync_interval.total_seconds():g}s)"
            )
        return self

    def replica(self) -> str:
        """This process's replica id: ``replica_id``, else ``<hostname>:<pid>`` (unique among live processes)."""
        import socket

        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    def lease(self) -> timedelta:
        """The lease TTL, derived from the safety interval when not set (``_lease_ttl``)."""
        assert self.lease_ttl is not None  # set by _lease_ttl
        return self.lease_ttl


class ReconcileSettings(BaseModel):
    time: str = Field("05:30", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="local time of the nightly reconciliation with Planner")
    max_delete_share: float = Field(0.5, gt=0, le=1, description="stop a mailbox whose reconciliation would delete more than this share")
    mailboxes_per_call: int = Field(2, ge=1, le=50, description="mailboxes per GetEvents call")


class ResourceSyncSettings(BaseModel):
    """Enrolment from Planner (``plannersync run resource-sync``; decision 62 in docs/decisions.md)."""

    times: CsvList = Field(
        ["06:00", "09:00", "12:00", "15:00", "18:00"],
        description="local times (HH:MM, comma-separated) of each day's GetResources; default five times a day",
    )

    @field_validator("times")
    @classmethod
    def _times_valid(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if not re.match(r"^([01]\d|2[0-3]):[0-5]\d$", t)]
        if bad or not value:
            raise ValueError(f"times must be one or more HH:MM, comma-separated (bad: {', '.join(bad) or 'none given'})")
        return sorted(set(value))


class StatusSettings(BaseModel):
    health_dir: Path = Field(Path("var/health"), description="each worker writes <stage>.json here every few seconds; default <state_dir>/health")
    stale_after: Duration = Field(timedelta(seconds=30), description="a health file older than this means the worker is not running")
    page_host: str = Field("127.0.0.1", min_length=1, description="address the status page (plannersync run status-page) listens on; localhost unless behind a reverse proxy")
    page_port: int = Field(8470, ge=1, le=65535, description="port of the status page")
    page_refresh: Duration = Field(timedelta(seconds=15), description="how often the status page reads the store, the management API and the health files")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="address a worker's Prometheus /metrics listens on (0.0.0.0 in compose)")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="port of this worker's Prometheus /metrics; unset: off (runbooks/monitoring.md)")


class LogSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"


SYSTEM_STATE_DIR = Path("/var/lib/plannersync")
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("plannersync_environ", default=None)


def _environ() -> Mapping[str, str]:
    """The environment being loaded: the mapping given to ``load_settings``, else the process's own."""
    given = _ENVIRON.get()
    return os.environ if given is None else given


def default_state_dir(environ: Mapping[str, str] | None = None, system: Path = SYSTEM_STATE_DIR) -> Path:
    """Where state lives when ``PLANNERSYNC_STATE_DIR`` is not set (decision 45 in docs/decisions.md).

    ``/var/lib/plannersync`` when it exists and this user may write there (the image, a packaged install);
    otherwise the user's own ``$XDG_STATE_HOME/plannersync`` (``~/.local/state/plannersync``). Never the
    working directory, so every command finds the same store and health files wherever it is run.
    """
    environ = _environ() if environ is None else environ
    if system.is_dir() and os.access(system, os.W_OK | os.X_OK):
        return system
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "plannersync"


class _GivenEnvironment(EnvSettingsSource):
    """Environment variables from the mapping ``load_settings`` was given (else ``os.environ``)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        given = _ENVIRON.get()
        if given is None:
            return super()._load_env_vars()
        return {name if self.case_sensitive else name.lower(): value for name, value in given.items()}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Field(
        default_factory=lambda: default_state_dir(),
        description="where the default SQLite store (state.db) and the health files (health/) live; absolute",
    )

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    busy: BusySettings = Field(default_factory=BusySettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    exchange: ExchangeSettings = Field(default_factory=ExchangeSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)
    resource_sync: ResourceSyncSettings = Field(default_factory=ResourceSyncSettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    graph: GraphSettings = Field(default_factory=lambda: GraphSettings())  # defined at the end of this module

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _GivenEnvironment(settings_cls), dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        """Defaults under ``state_dir``; every path absolute, so no setting depends on the working directory."""
        if not self.state_dir.is_absolute():
            raise ValueError(f"state_dir: must be an absolute path (got {str(self.state_dir)!r})")
        if "url" not in self.database.model_fields_set:
            self.database.url = f"sqlite:///{self.state_dir / 'state.db'}"
        if "health_dir" not in self.status.model_fields_set:
            self.status.health_dir = self.state_dir / "health"
        if not self.status.health_dir.is_absolute():
            raise ValueError(f"status.health_dir: must be an absolute path (got {str(self.status.health_dir)!r})")
        path = sqlite_path(self.database.url)
        if path is not None and not path.is_absolute():
            raise ValueError(f"database.url: a SQLite file must be an absolute path, sqlite:////dir/file.db (got {self.database.url!r})")
        return self

    def database_url(self) -> str:
        """The database URL with the password from its secret inserted, if one is given."""
        return with_password(self.database.url, self.database.password.get_secret_value() if self.database.password else None)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other databases and for ``:memory:``)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].partition("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def mask_url(url: str) -> str:
    """``scheme://user:***@host/…``: the password inside a URL hidden (database and management URLs)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}"))


def with_password(url: str, password: str | None) -> str:
    """``dialect://user@host/db`` with ``password`` put in (percent-encoded) after the user; the URL itself when none."""
    if password is None:
        return url
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    if not host:
        return url  # no host (sqlite): nothing to authenticate
    user = user.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


class ConfigError(Exception):
    """Invalid configuration, phrased for the operator (variable name and what is wrong)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def env_name(loc: tuple[int | str, ...]) -> str:
    parts = [str(part) for part in loc if not isinstance(part, int)]
    return ENV_PREFIX + "__".join(parts).upper()


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """PLANNERSYNC_* variables that name no setting (a typo would otherwise be silently ignored)."""
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        field = Settings.model_fields.get(parts[0])
        if field is None:
            problems.append(f"{name}: no such setting")
            continue
        model = field.annotation
        if len(parts) == 2 and isinstance(model, type) and issubclass(model, BaseModel):
            key = parts[1]
            known = set(model.model_fields) | {f"{n}_file" for n in model.model_fields}
            if key not in known:
                problems.append(f"{name}: no such setting in {parts[0]} (known: {', '.join(sorted(model.model_fields))})")
        elif len(parts) > 2:
            problems.append(f"{name}: no such setting")
    return problems


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration once; raise ConfigError naming each bad variable."""
    unknown = unknown_variables(os.environ if environ is None else environ)
    if unknown:
        raise ConfigError(unknown)
    token = _ENVIRON.set(environ)  # given a mapping, read it and not os.environ (compose test, demo, tests)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error.get("loc", ()))
            message = str(error["msg"])
            named = _NAMED_FIELD.match(message)
            if named:  # a model-level check that names its field: point at that field's variable
                loc, message = loc + tuple(named.group(1).split(".")), named.group(2)
            name = env_name(loc) if loc else ENV_PREFIX + "*"
            value = error.get("input")
            shown = "" if named or isinstance(value, dict) or any(word in name.lower() for word in ("password", "passphrase", "secret")) else f" (got {value!r})"
            problems.append(f"{name}: {message}{shown}")
        raise ConfigError(problems) from None
    except SettingsError as exc:
        cause = exc.__cause__
        raise ConfigError([f"{exc}: {cause}" if cause else str(exc)]) from None
    finally:
        _ENVIRON.reset(token)


_NAMED_FIELD = re.compile(r"^Value error, ([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*): (.*)$", re.DOTALL)


def masked(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data: secrets shown as '**********', passwords inside URLs as '***'."""
    data = settings.model_dump(mode="json")
    data["database"]["url"] = mask_url(settings.database.url)
    data["broker"]["management_url"] = mask_url(settings.broker.management_url)
    return data


CERTIFICATE_WARNING_DAYS = 30


def check_files(settings: Settings, now: datetime | None = None) -> tuple[list[str], list[str]]:
    """What ``config check`` can find out about the configured certificates without connecting: (errors, warnings).

    The client certificate opens with its passphrase, its key matches it, it is valid now (a warning
    within 30 days of expiry), and every CA bundle parses. Each message starts with the exact variable
    (decision 44 in docs/decisions.md).
    """
    now = now or datetime.now(timezone.utc)
    errors: list[str] = []
    warnings: list[str] = []
    planner = f"{ENV_PREFIX}PLANNER__"
    broker = f"{ENV_PREFIX}BROKER__"
    p = settings.planner
    if p.client_cert_p12 is not None:
        passphrase = p.client_cert_passphrase.get_secret_value() if p.client_cert_passphrase else None
        _check_p12(f"{planner}CLIENT_CERT_P12", p.client_cert_p12, passphrase, f"{planner}CLIENT_CERT_PASSPHRASE(_FILE)", now, errors, warnings)
    elif p.client_cert_pem is not None and p.client_key_pem is not None:
        _check_pem_pair(f"{planner}CLIENT_CERT_PEM", p.client_cert_pem, f"{planner}CLIENT_KEY_PEM", p.client_key_pem, now, errors, warnings)
    b = settings.broker
    if b.client_cert is not None and b.client_key is not None:
        _check_pem_pair(f"{broker}CLIENT_CERT", b.client_cert, f"{broker}CLIENT_KEY", b.client_key, now, errors, warnings)
    for variable, bundle in ((f"{planner}CA_BUNDLE", p.ca_bundle), (f"{broker}CA_BUNDLE", b.ca_bundle), (f"{ENV_PREFIX}EXCHANGE__CA_BUNDLE", settings.exchange.ca_bundle)):
        if bundle is not None:
            _check_ca_bundle(variable, bundle, now, errors, warnings)
    return errors, warnings


def _check_validity(variable: str, certificate: Any, now: datetime, errors: list[str], warnings: list[str]) -> None:
    subject = certificate.subject.rfc4514_string()
    if certificate.not_valid_after_utc <= now:
        errors.append(f"{variable}: the certificate ({subject}) expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    elif certificate.not_valid_before_utc > now:
        errors.append(f"{variable}: the certificate ({subject}) is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    else:
        days = (certificate.not_valid_after_utc - now).days
        if days < CERTIFICATE_WARNING_DAYS:
            warnings.append(f"{variable}: the certificate ({subject}) expires in {days} days, on {certificate.not_valid_after_utc:%Y-%m-%d} (renew it)")


def _same_key(key: Any, certificate: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(*spki) == certificate.public_key().public_bytes(*spki))


def _check_p12(variable: str, path: Path, passphrase: str | None, passphrase_variable: str, now: datetime, errors: list[str], warnings: list[str]) -> None:
    from cryptography.hazmat.primitives.serialization import pkcs12

    try:
        key, certificate, _chain = pkcs12.load_key_and_certificates(path.read_bytes(), passphrase.encode("utf-8") if passphrase is not None else None)
    except OSError as exc:
        errors.append(f"{variable}: cannot read {path}: {exc.strerror}")
        return
    except (ValueError, TypeError):
        errors.append(f"{variable}: {path} does not open with the passphrase in {passphrase_variable} (wrong passphrase, or not a PKCS#12 file)")
        return
    if certificate is None or key is None:
        errors.append(f"{variable}: {path} holds no {'certificate' if certificate is None else 'private key'}")
        return
    if not _same_key(key, certificate):
        errors.append(f"{variable}: the private key in {path} does not belong to its certificate")
    _check_validity(variable, certificate, now, errors, warnings)


def _check_pem_pair(cert_variable: str, cert_path: Path, key_variable: str, key_path: Path, now: datetime, errors: list[str], warnings: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        errors.append(f"{cert_variable}: cannot read {cert_path}: {exc.strerror}")
        return
    except ValueError:
        errors.append(f"{cert_variable}: {cert_path} is not a PEM certificate")
        return
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        errors.append(f"{key_variable}: cannot read {key_path}: {exc.strerror}")
    except TypeError:
        errors.append(f"{key_variable}: {key_path} is encrypted; give the key unencrypted (readable only by the service) or use a PKCS#12 file")
    except ValueError:
        errors.append(f"{key_variable}: {key_path} is not a PEM private key")
    else:
        if not _same_key(key, certificate):
            errors.append(f"{key_variable}: {key_path} is not the private key of the certificate in {cert_variable}")
    _check_validity(cert_variable, certificate, now, errors, warnings)


def _check_ca_bundle(variable: str, path: Path, now: datetime, errors: list[str], warnings: list[str]) -> None:
    import ssl

    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        errors.append(f"{variable}: OpenSSL cannot load {path}: {exc.reason or exc}")
        return
    except OSError as exc:
        errors.append(f"{variable}: cannot read {path}: {exc.strerror or exc}")
        return
    except ValueError:
        errors.append(f"{variable}: {path} is not a bundle of PEM certificates")
        return
    if all(c.not_valid_after_utc <= now for c in certificates):
        errors.append(f"{variable}: every certificate in {path} has expired")
    elif any(c.not_valid_after_utc <= now for c in certificates):
        warnings.append(f"{variable}: {path} holds expired certificates besides valid ones")


class GraphSettings(_SecretFiles):
    """Microsoft Graph (Exchange Online): app-only access with a certificate (a client secret as fallback)."""

    tenant_id: str = Field("", description="Entra ID tenant (GUID or domain)")
    client_id: str = Field("", description="the app registration's application (client) id")
    client_certificate: Path | None = Field(None, description="PEM file with the app's certificate and its (RSA) private key")
    client_certificate_passphrase: SecretStr | None = Field(None, description="passphrase of the private key in client_certificate")
    client_secret: SecretStr | None = Field(None, description="fallback when no certificate is configured")
    authority_url: str = Field("https://login.microsoftonline.com", pattern=r"^https://", description="token authority; the tenant is appended")
    graph_url: str = Field("https://graph.microsoft.com/v1.0", pattern=r"^https?://", description="Graph base URL including the version")
    ca_bundle: Path | None = Field(None, description="CA bundle for Graph and the authority; system store when unset")
    timeout: Duration = Field(timedelta(seconds=30), description="hard total deadline of one request (connect, headers and body)")
    max_response_bytes: int = Field(20 * 1024 * 1024, ge=64 * 1024, description="a bigger response is refused")
    max_page_size: int = Field(100, ge=1, le=1000, description="Prefer: odata.maxpagesize for calendarView and its delta")
    delta_interval: Duration = Field(timedelta(seconds=30), description="how often each Graph mailbox's delta is polled")
    max_concurrent_per_mailbox: int = Field(4, ge=1, le=4, description="Graph allows 4 concurrent requests per mailbox")
    batch_size: int = Field(20, ge=1, le=20, description="requests per $batch (Graph's limit is 20)")

    @model_validator(mode="after")
    def _files(self) -> GraphSettings:
        for path in (self.client_certificate, self.ca_bundle):
            if path is not None and not path.is_file():
                raise ValueError(f"file not found: {path}")
        return self


Settings.model_rebuild()  # Settings.graph names GraphSettings, defined after it

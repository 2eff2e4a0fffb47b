"""The state store: SQLAlchemy Core tables and queries, one code path for SQLite, PostgreSQL and SQL Server.

Times are stored as naive UTC (``UtcDateTime``) so every dialect stores the same thing; strings have
explicit lengths, primary keys stay under SQL Server's 900-byte limit and other indexes under its 1,700 bytes.
No table holds appointment content: ids, times, versions and receipt codes only.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Iterator, Mapping, Sequence

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    and_,
    any_,
    bindparam,
    create_engine,
    delete,
    event,
    exc,
    exists,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError

from shared.domain.contracts import Interval
from shared.domain.delivery_plan import DeliveredChange, DeliveredRecord
from shared.domain.mailbox_leases import HeldLease, Lease, ReplicaBeat
from shared.domain.mailbox_reads import Backend, SyncPosition
from shared.domain.transform_core import DesiredRecord, Reads

SCHEMA_VERSION = 7  # 2: mailboxes.backend and exchange_sync.backend (which reader serves a mailbox); 3: mailbox_rules;
# 4: delivered_events.maybe_held, maybe_start_at, maybe_end_at (a create or update whose answer was lost); 5: key_claims;
# 6: producer_replicas and mailbox_leases (change-producer replicas split the mailboxes, decision 91); 7: desired_states
# indexed by mailbox and UID, and by mailbox and item id (decision 114)
metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out; stored as naive UTC on every dialect."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "mssql":  # DATETIME rounds to 3.33 ms; DATETIME2 keeps microseconds
            from sqlalchemy.dialects.mssql import DATETIME2

            return dialect.type_descriptor(DATETIME2(precision=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use aware datetimes")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


MAILBOX = 254
ORIGIN = 512

schema_info = Table(
    "schema_info",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("upgraded_at", UtcDateTime, nullable=False),
)

mailboxes = Table(
    "mailboxes",
    metadata,
    Column("address", String(MAILBOX), primary_key=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("planner_resource_id", String(36)),
    Column("backend", String(16)),  # "ews" or "graph"; NULL: the configured default (decision 49 in docs/decisions.md)
    Column("status", String(32), nullable=False, default="new"),
    Column("status_detail", String(500)),
    Column("status_changed_at", UtcDateTime),
    Column("next_attempt_at", UtcDateTime),
    Column("last_delivery_at", UtcDateTime),
    Column("last_error", String(500)),
    Column("last_error_at", UtcDateTime),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

exchange_sync = Table(
    "exchange_sync",
    metadata,
    Column("mailbox", String(MAILBOX), primary_key=True),
    Column("backend", String(16)),  # the reader that wrote sync_state; NULL in rows from schema 1: "ews"
    Column("sync_state", String(4000)),
    Column("subscription_id", String(512)),
    Column("watermark", String(512)),
    Column("last_sync_at", UtcDateTime),
    Column("last_full_sync_at", UtcDateTime),
    Column("updated_at", UtcDateTime, nullable=False),
)

# What the transformer last decided per event key (desired state, not what Planner holds).
desired_states = Table(
    "desired_states",
    metadata,
    Column("mailbox", String(MAILBOX), primary_key=True),
    Column("origin_id", String(ORIGIN), primary_key=True),
    Column("uid", String(480)),
    Column("source_item_id", String(1024)),
    Column("version", BigInteger, nullable=False),
    Column("start_at", UtcDateTime),
    Column("end_at", UtcDateTime),
    Column("seen_in_snapshot", String(64)),
    Column("correlation_id", String(64)),
    Column("updated_at", UtcDateTime, nullable=False),
    # a change's rows are found by its item id and its UIDs without reading the mailbox's other rows (decision 114)
    Index("ix_desired_states_uid", "mailbox", "uid"),
    Index("ix_desired_states_item", "mailbox", "source_item_id"),
)

# The operator's allow and deny lists for enrolment from Planner (decision 62 in docs/decisions.md); schema 3.
mailbox_rules = Table(
    "mailbox_rules",
    metadata,
    Column("address", String(MAILBOX), primary_key=True),
    Column("rule", String(8), primary_key=True),  # "allow" or "deny"
    Column("created_at", UtcDateTime, nullable=False),
)

snapshot_parts = Table(
    "snapshot_parts",
    metadata,
    Column("snapshot_id", String(64), primary_key=True),
    Column("part", Integer, primary_key=True),
    Column("mailbox", String(MAILBOX), nullable=False),
    Column("total_parts", Integer),
    Column("received_at", UtcDateTime, nullable=False),
)

# What Planner is known to hold per event key, with the last receipt.
delivered_events = Table(
    "delivered_events",
    metadata,
    Column("mailbox", String(MAILBOX), primary_key=True),
    Column("origin_id", String(ORIGIN), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("present", Boolean, nullable=False),
    Column("start_at", UtcDateTime),
    Column("end_at", UtcDateTime),
    Column("planner_event_id", String(36)),
    Column("planner_resource_id", String(36)),
    Column("planner_originated", Boolean, nullable=False, default=False),
    Column("last_code", Integer),
    Column("last_message", String(1000)),
    Column("conflict_notification_sent", Boolean),
    Column("receipt_at", UtcDateTime),
    Column("service_request_ref", String(36)),
    Column("correlation_id", String(64)),
    Column("updated_at", UtcDateTime, nullable=False),
    # Schema 4: Planner may hold the event at these times (a call sent whose answer was lost); NULL: false.
    Column("maybe_held", Boolean),
    Column("maybe_start_at", UtcDateTime),
    Column("maybe_end_at", UtcDateTime),
)


# Schema 5: which replica works on a key right now (decision 89 in docs/decisions.md). A row is a live claim: inserted to
# take it (the primary key makes the insert a compare-and-set in one statement), deleted to release it. A replica that
# died leaves its rows until ``expires_at``. Only live claims are kept, so the table stays small.
key_claims = Table(
    "key_claims",
    metadata,
    Column("stage", String(16), primary_key=True),  # "transformer" (a whole mailbox) or "publisher" (one event key)
    Column("mailbox", String(MAILBOX), primary_key=True),
    Column("origin_id", String(ORIGIN), primary_key=True),  # WHOLE_MAILBOX ("") for a claim on a whole mailbox
    Column("owner", String(64), nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    # an owner's claims are found without reading (and, on SQL Server, without waiting for) another owner's rows
    Index("ix_key_claims_owner", "stage", "owner"),
)
WHOLE_MAILBOX = ""
# names (keys, item ids, UIDs) in one query of ``desired_for``: SQL Server takes at most 2,100 parameters a statement
_NAMES_PER_QUERY = 1000
# mailboxes in one statement of per-mailbox terms (decision 114): SQLite keeps a prepared statement's program, which grows
# with its terms, and at 512 mailboxes a statement the publisher's peak memory grew by 80 MB
_MAILBOXES_PER_QUERY = 64
ClaimKey = tuple[str, str]  # (mailbox in lower case, origin id or WHOLE_MAILBOX)

REPLICA = 100

# Change-producer replicas (schema 6, decision 91 in docs/decisions.md): each beats here while it runs ...
producer_replicas = Table(
    "producer_replicas",
    metadata,
    Column("replica", String(REPLICA), primary_key=True),
    Column("incarnation", String(32), nullable=False),  # one process under this id; its successor has another
    Column("host", String(255)),
    Column("process_key", String(100)),  # boot id and pid namespace: on the same key, a gone pid is a gone process
    Column("pid", Integer),
    Column("started_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
)

# ... and reads only the mailboxes it holds a lease on here; a released lease has no owner.
mailbox_leases = Table(
    "mailbox_leases",
    metadata,
    Column("mailbox", String(MAILBOX), primary_key=True),
    Column("owner", String(REPLICA)),
    Column("epoch", Integer, nullable=False),  # acquisitions so far
    Column("expires_at", UtcDateTime, nullable=False),
    Column("acquired_at", UtcDateTime),
)


def _position(row: Any) -> SyncPosition:
    return SyncPosition(row.sync_state, row.last_sync_at, row.last_full_sync_at, row.backend or "ews")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


class _ErrorOnItsWay(logging.Filter):
    """Drops psycopg's WARNING "error ignored terminating <Pipeline ...>: ..."; psycopg logs it only while the error
    that ended the pipeline is already on its way to us (decision 119)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "error ignored terminating %r: %s"


_ERROR_ON_ITS_WAY = _ErrorOnItsWay()


def make_engine(url: str) -> Engine:
    """An engine for any supported URL; SQLite gets WAL and a busy timeout so workers can share a file."""
    if url.startswith("sqlite"):
        # 16 prepared statements kept per connection, not 128: the per-mailbox statements differ by their lists' lengths,
        # and 128 of their programs per connection made the publisher half as big again (decision 114)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30, "cached_statements": 16})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "postgresql":
        logging.getLogger("psycopg").addFilter(_ERROR_ON_ITS_WAY)   # once, whatever the count of engines

        @event.listens_for(engine, "connect")
        def _postgresql_session(dbapi_connection: Any, _: Any) -> None:
            # a statement psycopg has prepared (the fifth run of one text on a connection) is planned once for any
            # values: every statement we repeat finds rows by key (decision 118)
            dbapi_connection.execute("SET plan_cache_mode = force_generic_plan")
            dbapi_connection.execute("SET max_parallel_workers_per_gather = 0")
            dbapi_connection.commit()

    return engine


def schema_version(engine: Engine) -> int | None:
    """The schema version in the database, or None when it has no schema yet."""
    from sqlalchemy import inspect

    if not inspect(engine).has_table("schema_info"):
        return None
    with engine.connect() as conn:
        return conn.execute(select(schema_info.c.version).where(schema_info.c.id == 1)).scalar()


def open_store(url: str, auto_upgrade: bool) -> Store:
    """The store a worker uses: schema created/migrated when allowed, else checked."""
    store = Store(make_engine(url))
    if auto_upgrade:
        upgrade(store.engine)
    elif schema_version(store.engine) != SCHEMA_VERSION:
        raise RuntimeError(f"database schema is {schema_version(store.engine)}, this build needs {SCHEMA_VERSION}: run `plannersync db upgrade`")
    return store


class _PerMailbox:
    """``(mailbox = ? AND column IN (...)) OR ...``, one term per mailbox and column: each term is one range of an index
    that starts with the mailbox, where ``mailbox IN (...) AND column IN (...)`` reads every pairing of the two lists, or
    every row of the mailboxes (decision 114).

    Every mailbox has a term for each of ``columns`` (an empty list is a term that finds nothing), each term has two
    bound parameters (the mailbox and its list, expanding), and the number of mailboxes is rounded up to a power of two
    with mailboxes that find nothing: so a statement is made, and compiled by SQLAlchemy, once per size (a handful), not
    once per batch, and a term costs no SQLAlchemy object per name. Built per name, the terms cost more to build than
    the query took to run; kept per exact shape, they made the publisher's memory grow by a third."""

    def __init__(self, table: Table, columns: tuple[str, ...]) -> None:
        self.table = table
        self.columns = columns
        self.mailboxes: list[tuple[str, tuple[list[str], ...]]] = []

    def add(self, mailbox: str, *names: Iterable[str]) -> None:
        """The mailbox's names, one collection per column; a mailbox with none is left out."""
        lists = tuple(sorted(each) for each in names)
        if any(lists):
            self.mailboxes.append((mailbox, lists))

    def pairs(self, pairs: Iterable[tuple[str, str]]) -> _PerMailbox:
        """(mailbox, name) pairs of a one-column search."""
        by_mailbox: dict[str, list[str]] = {}
        for mailbox, name in pairs:
            by_mailbox.setdefault(mailbox, []).append(name)
        for mailbox, names in sorted(by_mailbox.items()):
            self.add(mailbox, names)
        return self

    def run(self, conn: Connection, *columns: str) -> Iterator[Any]:
        """The rows of ``SELECT columns FROM table WHERE`` the terms, in statements of at most
        ``_MAILBOXES_PER_QUERY`` mailboxes: a statement's size in SQLite's memory grows with its terms. On PostgreSQL
        each list is one array parameter, so a statement's text depends only on its size (decision 118)."""
        nothing: tuple[list[str], ...] = tuple([] for _ in self.columns)
        arrays = conn.dialect.name == "postgresql"
        for start in range(0, len(self.mailboxes), _MAILBOXES_PER_QUERY):
            part = self.mailboxes[start : start + _MAILBOXES_PER_QUERY]
            size = 1 << max(0, len(part) - 1).bit_length()
            values: dict[str, Any] = {}
            for n in range(size):
                mailbox, lists = part[n] if n < len(part) else ("", nothing)
                values[f"pm_{n}"] = mailbox
                for k, names in enumerate(lists):
                    values[f"pn_{n}_{k}"] = names
            yield from conn.execute(_per_mailbox_select(self.table, columns, self.columns, size, arrays), values)


@functools.lru_cache(maxsize=64)
def _per_mailbox_select(table: Table, columns: tuple[str, ...], searched: tuple[str, ...], size: int, arrays: bool) -> Any:
    """The statement of ``_PerMailbox.run``. With ``arrays`` (PostgreSQL) a term is ``column = ANY(:list)`` with the
    list as one array parameter, else ``column IN (:list)`` expanded to one placeholder per name (decision 118)."""
    c = table.c

    def names_in(column: Any, name: str) -> Any:
        if arrays:
            return column == any_(bindparam(name, type_=ARRAY(String)))
        return column.in_(bindparam(name, expanding=True))

    condition = or_(
        *(
            and_(c.mailbox == bindparam(f"pm_{n}"), names_in(c[name], f"pn_{n}_{k}"))
            for n in range(size)
            for k, name in enumerate(searched)
        )
    )
    return select(*(c[name] for name in columns)).where(condition)


def _groups(mailboxes: Sequence[str], sizes: Mapping[str, int]) -> list[list[str]]:
    """The mailboxes in order, cut into groups of at most ``_NAMES_PER_QUERY`` parameters (a mailbox that is bigger
    alone is a group alone)."""
    groups: list[list[str]] = []
    names = 0
    for mailbox in mailboxes:
        if not groups or names + sizes[mailbox] > _NAMES_PER_QUERY:
            groups.append([])
            names = 0
        groups[-1].append(mailbox)
        names += sizes[mailbox]
    return groups


UPGRADE_ATTEMPTS = 5
_JITTER = random.Random()  # a generator of its own: the process-wide random state is left alone


def upgrade(engine: Engine) -> int:
    """Create or migrate the schema; safe to run any number of times, and by several processes at once. Returns the
    schema version.

    Replicas started together on a new database each create the schema (``database.auto_upgrade``): the one that comes
    second finds a table the first made after it looked ("table ... already exists", a duplicate key in PostgreSQL's
    catalogue, SQLite's "database is locked"). Such a failure makes it look again, a moment later, up to
    ``UPGRADE_ATTEMPTS`` times; by then the other's work is there and is not done twice (decision 117)."""
    for attempt in range(1, UPGRADE_ATTEMPTS):
        try:
            return _upgrade_once(engine)
        except exc.DBAPIError:
            time.sleep(0.1 * attempt * (1 + _JITTER.random()))
    return _upgrade_once(engine)   # the last attempt's error is raised as it is


def _upgrade_once(engine: Engine) -> int:
    current = schema_version(engine)
    if current is not None and current < SCHEMA_VERSION:
        _migrate(engine, current)
    metadata.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        current = conn.execute(select(schema_info.c.version).where(schema_info.c.id == 1)).scalar()
        if current is None:
            conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION, upgraded_at=now_utc()))
        elif current > SCHEMA_VERSION:
            raise RuntimeError(f"database schema {current} is newer than this build ({SCHEMA_VERSION}); upgrade plannersync")
        elif current < SCHEMA_VERSION:
            conn.execute(update(schema_info).where(schema_info.c.id == 1).values(version=SCHEMA_VERSION, upgraded_at=now_utc()))
    return SCHEMA_VERSION


def _migrate(engine: Engine, current: int) -> None:
    """Bring an older schema up to this build's, one step at a time, with Alembic's dialect-aware operations."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        if current < 2:
            op.add_column("mailboxes", Column("backend", String(16)))
            op.add_column("exchange_sync", Column("backend", String(16)))
        if current < 3:
            op.create_table(
                "mailbox_rules",
                Column("address", String(MAILBOX), primary_key=True),
                Column("rule", String(8), primary_key=True),
                Column("created_at", UtcDateTime, nullable=False),
            )
        if current < 4:
            op.add_column("delivered_events", Column("maybe_held", Boolean))
            op.add_column("delivered_events", Column("maybe_start_at", UtcDateTime))
            op.add_column("delivered_events", Column("maybe_end_at", UtcDateTime))
        if current < 5:
            op.create_table(
                "key_claims",
                Column("stage", String(16), primary_key=True),
                Column("mailbox", String(MAILBOX), primary_key=True),
                Column("origin_id", String(ORIGIN), primary_key=True),
                Column("owner", String(64), nullable=False),
                Column("expires_at", UtcDateTime, nullable=False),
            )
            op.create_index("ix_key_claims_owner", "key_claims", ["stage", "owner"])
        if current < 6:
            op.create_table(
                "producer_replicas",
                Column("replica", String(REPLICA), primary_key=True),
                Column("incarnation", String(32), nullable=False),
                Column("host", String(255)),
                Column("process_key", String(100)),
                Column("pid", Integer),
                Column("started_at", UtcDateTime, nullable=False),
                Column("expires_at", UtcDateTime, nullable=False),
            )
            op.create_table(
                "mailbox_leases",
                Column("mailbox", String(MAILBOX), primary_key=True),
                Column("owner", String(REPLICA)),
                Column("epoch", Integer, nullable=False),
                Column("expires_at", UtcDateTime, nullable=False),
                Column("acquired_at", UtcDateTime),
            )
        if current < 7:
            op.create_index("ix_desired_states_uid", "desired_states", ["mailbox", "uid"])
            op.create_index("ix_desired_states_item", "desired_states", ["mailbox", "source_item_id"])


@dataclass(frozen=True)
class MailboxRow:
    address: str
    enabled: bool
    status: str
    status_detail: str | None
    planner_resource_id: str | None
    last_delivery_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    backend: Backend | None = None  # None: the configured default


def _interval(start: datetime | None, end: datetime | None) -> Interval | None:
    return Interval(start=start, end=end) if start is not None and end is not None else None


def _stored_interval(start: datetime | None, end: datetime | None) -> Interval | None:
    """An interval the store wrote from a valid ``Interval`` (UTC, end after start): built without validating again."""
    return Interval.model_construct(start=start, end=end) if start is not None and end is not None else None


@dataclass(frozen=True)
class DesiredWrite:
    """One message's decisions for ``Store.save_desired_many``: its mailbox's rows and the snapshot part it completes."""

    mailbox: str
    rows: Sequence[DesiredRecord]
    correlation_id: str | None = None
    snapshot_part: tuple[str, int, int | None] | None = None
    release: tuple[str, str] | None = None  # (stage, owner): the mailbox's claim to release once written (decision 89)


class Store:
    """Queries over the tables above. One instance per process; safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def connect(cls, url: str) -> Store:
        return cls(make_engine(url))

    def _reading(self) -> AbstractContextManager[Connection]:
        """A connection for reads, whose transaction ends with COMMIT: psycopg forgets every statement it has prepared
        on a connection at a ROLLBACK, so reads that rolled back were never prepared (decision 118)."""
        return self.engine.begin()

    # --- mailboxes -----------------------------------------------------------------------
    def add_mailbox(self, address: str, backend: Backend | None = None) -> bool:
        """Enrol a mailbox (or enable it again); ``backend`` names its reader, None leaves it to the default."""
        address = address.lower()
        now = now_utc()
        with self.engine.begin() as conn:
            row = conn.execute(select(mailboxes.c.enabled, mailboxes.c.backend).where(mailboxes.c.address == address)).first()
            if row is None:
                conn.execute(insert(mailboxes).values(address=address, backend=backend, enabled=True, status="new", created_at=now, updated_at=now))
                return True
            values: dict[str, Any] = {"updated_at": now}
            if backend is not None and backend != row.backend:
                values["backend"] = backend
            if not row.enabled:
                values.update(enabled=True, status="new")
            if len(values) > 1:
                conn.execute(update(mailboxes).where(mailboxes.c.address == address).values(**values))
            return not row.enabled

    def set_backend(self, address: str, backend: Backend | None) -> bool:
        """Serve a mailbox from another reader (None: the configured default). Its busy times in Planner stay as
        they are: the new reader's first read is a full one, and unchanged events make no Planner call."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(mailboxes).where(mailboxes.c.address == address.lower()).values(backend=backend, updated_at=now_utc())
            )
            return bool(result.rowcount)

    def remove_mailbox(self, address: str, status: str = "removed") -> bool:
        """Disable (not delete): history stays for the status command and reconciliation.

        ``status`` says who removed it: "removed" (an operator, by hand) or "denied" (enrolment from Planner,
        after a deny); only a "denied" mailbox is enrolled again by resource sync once the deny is lifted.
        """
        with self.engine.begin() as conn:
            result = conn.execute(
                update(mailboxes)
                .where(and_(mailboxes.c.address == address.lower(), mailboxes.c.enabled.is_(True)))
                .values(enabled=False, status=status, updated_at=now_utc())
            )
            return bool(result.rowcount)

    # --- allow and deny lists (schema 3) -------------------------------------------------------
    def add_rule(self, rule: str, address: str) -> bool:
        """Put an address on the "allow" or "deny" list; False when it was there already."""
        if rule not in ("allow", "deny"):
            raise ValueError(f"unknown rule {rule!r}")
        address = address.strip().lower()
        with self.engine.begin() as conn:
            key = and_(mailbox_rules.c.address == address, mailbox_rules.c.rule == rule)
            if conn.execute(select(mailbox_rules.c.address).where(key)).first() is not None:
                return False
            conn.execute(insert(mailbox_rules).values(address=address, rule=rule, created_at=now_utc()))
            return True

    def remove_rule(self, rule: str, address: str) -> bool:
        """Take an address off the "allow" or "deny" list; False when it was not on it."""
        with self.engine.begin() as conn:
            key = and_(mailbox_rules.c.address == address.strip().lower(), mailbox_rules.c.rule == rule)
            return bool(conn.execute(delete(mailbox_rules).where(key)).rowcount)

    def rules(self, rule: str) -> list[tuple[str, datetime]]:
        """The addresses on the "allow" or "deny" list, with when each was added, by address."""
        query = select(mailbox_rules.c.address, mailbox_rules.c.created_at).where(mailbox_rules.c.rule == rule).order_by(mailbox_rules.c.address)
        with self._reading() as conn:
            return [(r.address, r.created_at) for r in conn.execute(query)]

    def list_mailboxes(self, enabled_only: bool = False) -> list[MailboxRow]:
        query = select(mailboxes).order_by(mailboxes.c.address)
        if enabled_only:
            query = query.where(mailboxes.c.enabled.is_(True))
        with self._reading() as conn:
            return [
                MailboxRow(
                    r.address, r.enabled, r.status, r.status_detail, r.planner_resource_id, r.last_delivery_at, r.last_error, r.last_error_at, r.backend
                )
                for r in conn.execute(query)
            ]

    def set_mailbox_status(self, address: str, status: str, detail: str | None = None, next_attempt_at: datetime | None = None) -> None:
        now = now_utc()
        with self.engine.begin() as conn:
            conn.execute(
                update(mailboxes)
                .where(mailboxes.c.address == address.lower())
                .values(status=status, status_detail=detail, status_changed_at=now, next_attempt_at=next_attempt_at, updated_at=now)
            )

    def record_delivery_outcome(self, address: str, error: str | None) -> None:
        """Per mailbox: the last successful delivery time, or the last error."""
        now = now_utc()
        values: dict[str, Any] = {"updated_at": now}
        if error is None:
            values["last_delivery_at"] = now
        else:
            values.update(last_error=error[:500], last_error_at=now)
        with self.engine.begin() as conn:
            conn.execute(update(mailboxes).where(mailboxes.c.address == address.lower()).values(**values))

    # --- exchange sync state -----------------------------------------------------------------
    def sync_position(self, mailbox: str) -> SyncPosition | None:
        with self._reading() as conn:
            row = conn.execute(select(exchange_sync).where(exchange_sync.c.mailbox == mailbox.lower(), exchange_sync.c.sync_state.is_not(None))).first()
        return _position(row) if row else None

    def sync_positions(self) -> dict[str, SyncPosition]:
        """Every mailbox's sync position, by address (one query, for the status page)."""
        with self._reading() as conn:
            rows = conn.execute(select(exchange_sync).where(exchange_sync.c.sync_state.is_not(None))).all()
        return {r.mailbox: _position(r) for r in rows}

    def save_sync_position(
        self, mailbox: str, sync_state: str, read_at: datetime, full: bool, backend: Backend = "ews", lease: tuple[str, int] | None = None,
    ) -> bool:
        """After a read whose messages are all published: the state to continue from, which reader made it, and when.

        ``lease`` (owner, epoch): saved only while that replica still holds the mailbox's lease it held when the read
        began, in the same statement; False when it does not (decision 102 in docs/decisions.md: a replica that
        stalled past its lease must not save an older state over its successor's)."""
        values: dict[str, Any] = {"sync_state": sync_state, "backend": backend, "last_sync_at": read_at}
        if full:
            values["last_full_sync_at"] = read_at
        return self._upsert_sync(mailbox, values, lease)

    def mark_first_read(self, mailbox: str, backend: Backend, started_at: datetime) -> bool:
        """Before a read from nothing of a mailbox with no sync position: a row with no sync state says one began.

        True when this call wrote the mark: the first read of this mailbox. False when a mark (or a row) was there
        already: an earlier first read began and never saved a state, so it may have published changes and then
        failed, and this read must say what was deleted since (decision 85 in docs/decisions.md). ``sync_position``
        does not see a mark."""
        mailbox = mailbox.lower()
        try:
            with self.engine.begin() as conn:
                if conn.execute(select(exchange_sync.c.mailbox).where(exchange_sync.c.mailbox == mailbox)).first() is not None:
                    return False
                conn.execute(insert(exchange_sync).values(mailbox=mailbox, backend=backend, sync_state=None, updated_at=started_at))
        except IntegrityError:
            return False   # another reader marked it in between
        return True

    def record_full_read(self, mailbox: str, read_at: datetime) -> None:
        """A whole window was read and published (a snapshot); the incremental state is left as it is."""
        self._upsert_sync(mailbox, {"last_full_sync_at": read_at})

    def _upsert_sync(self, mailbox: str, values: dict[str, Any], lease: tuple[str, int] | None = None) -> bool:
        mailbox = mailbox.lower()
        values = {**values, "updated_at": now_utc()}
        row = exchange_sync.c.mailbox == mailbox
        if lease is None:
            with self.engine.begin() as conn:
                if not conn.execute(update(exchange_sync).where(row).values(**values)).rowcount:
                    conn.execute(insert(exchange_sync).values(mailbox=mailbox, **values))
            return True
        c = mailbox_leases.c
        held = exists().where(c.mailbox == mailbox, c.owner == lease[0], c.epoch == lease[1])
        with self.engine.begin() as conn:
            if conn.execute(update(exchange_sync).where(row, held).values(**values)).rowcount:
                return True
            if conn.execute(select(exchange_sync.c.mailbox).where(row)).first() is not None:
                return False   # the row is there: the lease is what refused the update
            # no row yet (a first read whose mark went): inserted under the same condition
            columns = ["mailbox", *values]
            fenced = select(literal(mailbox, exchange_sync.c.mailbox.type),
                            *(literal(value, exchange_sync.c[name].type) for name, value in values.items())).where(held)
            conn.execute(insert(exchange_sync).from_select(columns, fenced))
            # (an INSERT ... SELECT's rowcount is not reported alike by every driver: the row says whether it went in)
            return conn.execute(select(exchange_sync.c.mailbox).where(row)).first() is not None

    # --- change-producer replicas and mailbox leases (schema 6, decision 91) ----------------------
    # Each step is one conditional statement, so replicas deciding at the same moment cannot both hold a mailbox:
    # the database serialises the UPDATEs of one row (SQLite one writer; PostgreSQL and SQL Server row locks, the
    # WHERE evaluated again on the row as committed), and an INSERT of a row that exists fails on the primary key.
    def replica_beats(self) -> list[ReplicaBeat]:
        with self._reading() as conn:
            rows = conn.execute(select(producer_replicas)).all()
        return [ReplicaBeat(r.replica, r.incarnation, r.expires_at, r.host, r.process_key, r.pid) for r in rows]

    def beat_replica(self, beat: ReplicaBeat, started_at: datetime, replacing: str | None = None) -> bool:
        """Write this process's heartbeat: its own row (or a new one), or, with ``replacing``, the row another
        incarnation left; False when the row turned out to be someone else's (the id is in use)."""
        values = {"incarnation": beat.incarnation, "host": beat.host, "process_key": beat.process_key, "pid": beat.pid, "expires_at": beat.expires_at}
        key = and_(producer_replicas.c.replica == beat.replica, producer_replicas.c.incarnation == (replacing or beat.incarnation))
        with self.engine.begin() as conn:
            if conn.execute(update(producer_replicas).where(key).values(**values, **({"started_at": started_at} if replacing else {}))).rowcount:
                return True
        if replacing is not None:
            return False
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(producer_replicas).values(replica=beat.replica, started_at=started_at, **values))
        except exc.IntegrityError:
            return False
        return True

    def forget_replica(self, replica: str, incarnation: str) -> None:
        """A replica stopping: its heartbeat goes, so the others count it out at once."""
        with self.engine.begin() as conn:
            conn.execute(delete(producer_replicas).where(and_(producer_replicas.c.replica == replica, producer_replicas.c.incarnation == incarnation)))

    def leases(self) -> list[Lease]:
        with self._reading() as conn:
            rows = conn.execute(select(mailbox_leases)).all()
        return [Lease(r.mailbox, r.owner, r.expires_at, r.epoch) for r in rows]

    def acquire_leases(self, mailboxes: Sequence[str], owner: str, expires_at: datetime, now: datetime) -> dict[str, int]:
        """Take each mailbox that is free (released, or its lease expired: its holder stopped renewing) or has no lease
        row yet; return the ones taken with their new epoch. One conditional UPDATE per mailbox, all in one
        transaction; the rows that do not exist yet are inserted together, or one by one when another replica inserted
        one of them first (its primary key refuses the second)."""
        names = sorted({m.lower() for m in mailboxes})
        c = mailbox_leases.c
        taken: dict[str, int] = {}
        with self.engine.begin() as conn:
            for name in names:
                free = and_(c.mailbox == name, or_(c.owner.is_(None), c.expires_at <= now))
                if conn.execute(update(mailbox_leases).where(free).values(owner=owner, epoch=c.epoch + 1, expires_at=expires_at, acquired_at=now)).rowcount:
                    taken[name] = 0
            rest = [name for name in names if name not in taken]
            existing: set[str] = set()
            for start in range(0, len(names), 500):
                chunk = names[start : start + 500]
                for r in conn.execute(select(c.mailbox, c.epoch).where(c.mailbox.in_(chunk))):
                    existing.add(r.mailbox)
                    if r.mailbox in taken:
                        taken[r.mailbox] = r.epoch
        new = [name for name in rest if name not in existing]
        if not new:
            return taken
        values = {"owner": owner, "epoch": 1, "expires_at": expires_at, "acquired_at": now}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(mailbox_leases), [{"mailbox": name, **values} for name in new])
            return {**taken, **{name: 1 for name in new}}
        except exc.IntegrityError:
            pass
        for name in new:  # another replica inserted one of them meanwhile: each alone, the first insert wins
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(mailbox_leases).values(mailbox=name, **values))
                taken[name] = 1
            except exc.IntegrityError:
                continue
        return taken

    def renew_leases(self, owner: str, expires_at: datetime) -> int:
        """Every lease ``owner`` still holds now lasts until ``expires_at``; one taken over meanwhile is not its own."""
        with self.engine.begin() as conn:
            return int(conn.execute(update(mailbox_leases).where(mailbox_leases.c.owner == owner).values(expires_at=expires_at)).rowcount)

    def hold_leases(self, owner: str, mailboxes: Sequence[str], expires_at: datetime) -> dict[str, HeldLease]:
        """The fence before a read: of ``mailboxes``, the ones ``owner`` still holds, each extended to ``expires_at``,
        with the epoch of the lease it holds (its sync state is saved only under that epoch, decision 102) and its sync
        position, read in the same transaction (decision 109: a read costs the store two transactions, not three)."""
        names = sorted({m.lower() for m in mailboxes})
        c, s = mailbox_leases.c, exchange_sync.c
        held: dict[str, HeldLease] = {}
        with self.engine.begin() as conn:
            for start in range(0, len(names), 500):
                chunk = names[start : start + 500]
                mine = and_(c.owner == owner, c.mailbox.in_(chunk))
                if conn.execute(update(mailbox_leases).where(mine).values(expires_at=expires_at)).rowcount:
                    rows = conn.execute(select(c.mailbox, c.epoch, s.sync_state, s.last_sync_at, s.last_full_sync_at, s.backend)
                                        .select_from(mailbox_leases.outerjoin(exchange_sync, s.mailbox == c.mailbox)).where(mine))
                    held.update({r.mailbox: HeldLease(r.epoch, _position(r) if r.sync_state is not None else None) for r in rows})
        return held

    def release_leases(self, owner: str, mailboxes: Sequence[str] | None, now: datetime) -> int:
        """Give back ``mailboxes`` (None: every one ``owner`` holds); another replica may take them at once."""
        c = mailbox_leases.c
        names = None if mailboxes is None else sorted({m.lower() for m in mailboxes})
        chunks: list[list[str] | None] = [None] if names is None else [names[i : i + 500] for i in range(0, len(names), 500)]
        released = 0
        with self.engine.begin() as conn:
            for chunk in chunks:
                mine = c.owner == owner if chunk is None else and_(c.owner == owner, c.mailbox.in_(chunk))
                released += conn.execute(update(mailbox_leases).where(mine).values(owner=None, expires_at=now)).rowcount
        return released

    # --- transformer: desired states -----------------------------------------------------------
    def desired(self, mailbox: str) -> dict[str, DesiredRecord]:
        return self.desired_many([mailbox])[mailbox.lower()]

    def desired_many(self, mailboxes: Iterable[str]) -> dict[str, dict[str, DesiredRecord]]:
        """What was last decided, per mailbox (lower case) and key: one query per 500 mailboxes (decision 78)."""
        names = sorted({mailbox.lower() for mailbox in mailboxes})
        result: dict[str, dict[str, DesiredRecord]] = {name: {} for name in names}
        c = desired_states.c
        columns = (c.mailbox, c.origin_id, c.uid, c.source_item_id, c.version, c.start_at, c.end_at, c.seen_in_snapshot)
        with self._reading() as conn:
            for start in range(0, len(names), 500):
                for r in conn.execute(select(*columns).where(c.mailbox.in_(names[start : start + 500]))):
                    interval = _stored_interval(r.start_at, r.end_at)
                    result[r.mailbox][r.origin_id] = DesiredRecord(r.origin_id, r.uid, r.source_item_id, r.version, interval, r.seen_in_snapshot)
        return result

    def desired_for(self, reads: Mapping[str, Reads]) -> dict[str, dict[str, DesiredRecord]]:
        """What was last decided, per mailbox (lower case), as far as each mailbox's ``Reads`` needs it (decision 97):
        every row for a whole read, else exactly ``Reads.select`` of the mailbox's rows, read by two queries (the rows
        named, then the other rows of the UIDs those carry) per group of mailboxes of at most 1,000 names.

        Each mailbox's names are terms of their own (``mailbox = ? AND origin_id IN (...)``, the same for its item ids
        and its UIDs), so every term is one range of an index and no mailbox's other rows are read (decision 114)."""
        wanted = {mailbox.lower(): r for mailbox, r in reads.items()}
        sizes = {mailbox: len(r.origin_ids) + len(r.item_ids) + len(r.uids) + 3 for mailbox, r in wanted.items()}
        whole = sorted(mailbox for mailbox, r in wanted.items() if r.whole or sizes[mailbox] > _NAMES_PER_QUERY)
        result = self.desired_many(whole)
        columns = ("mailbox", "origin_id", "uid", "source_item_id", "version", "start_at", "end_at", "seen_in_snapshot")
        with self._reading() as conn:
            for group in _groups(sorted(set(wanted) - set(whole)), sizes):
                fetched: dict[str, dict[str, DesiredRecord]] = {mailbox: {} for mailbox in group}

                def fetch(terms: _PerMailbox, fetched: dict[str, dict[str, DesiredRecord]] = fetched) -> None:
                    if not terms.mailboxes:
                        return
                    for r in terms.run(conn, *columns):
                        record = DesiredRecord(r.origin_id, r.uid, r.source_item_id, r.version, _stored_interval(r.start_at, r.end_at), r.seen_in_snapshot)
                        fetched[r.mailbox][r.origin_id] = record

                terms = _PerMailbox(desired_states, ("origin_id", "source_item_id", "uid"))
                for mailbox in group:
                    terms.add(mailbox, wanted[mailbox].origin_ids, wanted[mailbox].item_ids, wanted[mailbox].uids)
                fetch(terms)
                more = {mailbox: {k.uid for k in fetched[mailbox].values() if k.uid} - wanted[mailbox].uids for mailbox in group}
                for chunk in _groups(sorted(m for m in group if more[m]), {m: len(more[m]) + 1 for m in group}):
                    terms = _PerMailbox(desired_states, ("uid",))
                    for mailbox in chunk:
                        terms.add(mailbox, more[mailbox])
                    fetch(terms)
                for mailbox in group:
                    result[mailbox] = wanted[mailbox].select(fetched[mailbox])
        return result

    def save_desired(
        self,
        mailbox: str,
        rows: Iterable[DesiredRecord],
        correlation_id: str | None = None,
        snapshot_part: tuple[str, int, int | None] | None = None,
    ) -> None:
        """Upsert rows, never lowering a key's version, and record a snapshot part, in one transaction."""
        self.save_desired_many([DesiredWrite(mailbox, list(rows), correlation_id, snapshot_part)])

    def save_desired_many(self, writes: Sequence[DesiredWrite]) -> None:
        """Several messages' ``save_desired`` in one transaction and a few statements (decision 78).

        One SELECT per 500 keys finds the rows that exist; new keys are inserted with one executemany, existing
        ones updated with one executemany whose WHERE carries the version check (compare-and-set: a row newer
        than the update is left as it is, even if written since the SELECT). The newest row per key wins, and of
        equal versions the later write. Snapshot parts not yet recorded are inserted. A key inserted by someone
        else since the SELECT makes the insert fail: the whole write is done again, and that key is then an update
        under the version check (decision 89). The claims the writes name are released in the same transaction.
        """
        for attempt in range(3):
            try:
                self._save_desired_once(writes)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _save_desired_once(self, writes: Sequence[DesiredWrite]) -> None:
        now = now_utc()
        latest: dict[tuple[str, str], tuple[DesiredRecord, str | None]] = {}
        parts: dict[tuple[str, int], tuple[str, int | None]] = {}
        releases: list[dict[str, Any]] = []
        for write in writes:
            mailbox = write.mailbox.lower()
            for row in write.rows:
                key = (mailbox, row.origin_id)
                if key not in latest or latest[key][0].version <= row.version:
                    latest[key] = (row, write.correlation_id)
            if write.snapshot_part is not None:
                snapshot_id, part, total = write.snapshot_part
                parts.setdefault((snapshot_id, part), (mailbox, total))
            if write.release is not None:
                releases.append({"k_stage": write.release[0], "k_mailbox": mailbox, "k_origin_id": WHOLE_MAILBOX, "k_owner": write.release[1]})
        c = desired_states.c
        with self.engine.begin() as conn:
            existing: dict[tuple[str, str], int] = {}
            keys = sorted(latest)  # rows written in one order by every replica: no lock cycle between two transactions
            for start in range(0, len(keys), 500):  # one query per 500 keys, not one per key
                chunk = keys[start : start + 500]
                terms = _PerMailbox(desired_states, ("origin_id",)).pairs(chunk)
                existing.update({(r.mailbox, r.origin_id): r.version for r in terms.run(conn, "mailbox", "origin_id", "version")})
            inserts, updates = [], []
            for mailbox, origin_id in keys:
                row, correlation_id = latest[(mailbox, origin_id)]
                values = {
                    "uid": row.uid,
                    "source_item_id": row.source_item_id,
                    "version": row.version,
                    "start_at": row.interval.start if row.interval else None,
                    "end_at": row.interval.end if row.interval else None,
                    "seen_in_snapshot": row.seen_in_snapshot,
                    "correlation_id": correlation_id,
                    "updated_at": now,
                }
                if (mailbox, origin_id) not in existing:
                    inserts.append({"mailbox": mailbox, "origin_id": origin_id, **values})
                elif existing[(mailbox, origin_id)] <= row.version:
                    updates.append({"k_mailbox": mailbox, "k_origin_id": origin_id, "k_version": row.version, **values})
            if updates:
                statement = (
                    update(desired_states)
                    .where(and_(c.mailbox == bindparam("k_mailbox"), c.origin_id == bindparam("k_origin_id"), c.version <= bindparam("k_version")))
                    .values({name: bindparam(name) for name in updates[0] if not name.startswith("k_")})
                )
                conn.execute(statement, updates)
            if inserts:
                conn.execute(insert(desired_states), inserts)
            if parts:
                ids = sorted({snapshot_id for snapshot_id, _ in parts})
                recorded = {
                    (r.snapshot_id, r.part)
                    for r in conn.execute(select(snapshot_parts.c.snapshot_id, snapshot_parts.c.part).where(snapshot_parts.c.snapshot_id.in_(ids)))
                }
                new_parts = [
                    {"snapshot_id": snapshot_id, "part": part, "mailbox": mailbox, "total_parts": total, "received_at": now}
                    for (snapshot_id, part), (mailbox, total) in sorted(parts.items())
                    if (snapshot_id, part) not in recorded
                ]
                if new_parts:
                    conn.execute(insert(snapshot_parts), new_parts)
            if releases:
                conn.execute(_release_one(), releases)

    # --- claims: one replica at a time per key (decision 89) ---------------------------------------
    def claim(self, stage: str, owner: str, keys: Iterable[ClaimKey], ttl: timedelta) -> set[ClaimKey]:
        """Claim ``keys`` for ``owner`` for ``ttl`` from now; the keys claimed (those no live claim of another holds).

        The owner's own claims left from earlier (a message whose record never ran) are released first, so an owner
        must not run two of these at once. Normally this is one DELETE and one INSERT in one transaction; a key held
        by another owner makes the insert fail, and then the claims held are read, the expired ones taken back
        (a conditional DELETE), and the free keys inserted again. The insert is the compare-and-set: of two replicas
        inserting one key, one gets a primary-key violation.
        """
        wanted = sorted({(mailbox.lower(), origin_id) for mailbox, origin_id in keys})
        expires_at = now_utc() + ttl
        rows = [{"stage": stage, "mailbox": m, "origin_id": o, "owner": owner, "expires_at": expires_at} for m, o in wanted]
        c = key_claims.c
        mine = and_(c.stage == stage, c.owner == owner)
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(key_claims).where(mine))
                if rows:
                    conn.execute(insert(key_claims), rows)
            return set(wanted)
        except IntegrityError:
            pass
        for _ in range(3):
            now = now_utc()
            try:
                with self.engine.begin() as conn:
                    conn.execute(delete(key_claims).where(mine))
                    held: dict[ClaimKey, datetime] = {}
                    for start in range(0, len(wanted), 500):
                        chunk = wanted[start : start + 500]
                        query = select(c.mailbox, c.origin_id, c.expires_at).where(
                            and_(c.stage == stage, c.mailbox.in_(sorted({m for m, _ in chunk})), c.origin_id.in_(sorted({o for _, o in chunk})))
                        )
                        held.update({(r.mailbox, r.origin_id): r.expires_at for r in conn.execute(query)})
                    expired = [{"k_stage": stage, "k_mailbox": m, "k_origin_id": o, "k_now": now} for (m, o), until in sorted(held.items()) if until <= now]
                    if expired:
                        conn.execute(
                            delete(key_claims).where(
                                and_(c.stage == bindparam("k_stage"), c.mailbox == bindparam("k_mailbox"), c.origin_id == bindparam("k_origin_id"),
                                     c.expires_at <= bindparam("k_now"))
                            ),
                            expired,
                        )
                    free = {(m, o) for m, o in wanted if (m, o) not in held or held[(m, o)] <= now}
                    taken = [row for row in rows if (row["mailbox"], row["origin_id"]) in free]
                    if taken:
                        conn.execute(insert(key_claims), taken)
                return free
            except IntegrityError:
                continue  # one of them was taken meanwhile: look again
        return set()

    def renew_claims(self, stage: str, owner: str, ttl: timedelta) -> int:
        """Make every claim ``owner`` holds last ``ttl`` from now, in one statement; how many it holds."""
        statement = update(key_claims).where(and_(key_claims.c.stage == stage, key_claims.c.owner == owner)).values(expires_at=now_utc() + ttl)
        with self.engine.begin() as conn:
            return int(conn.execute(statement).rowcount)

    def release_claims(self, stage: str, owner: str, keys: Iterable[ClaimKey] | None = None) -> None:
        """Release the claims ``owner`` holds on ``keys`` (None: every one it holds)."""
        with self.engine.begin() as conn:
            if keys is None:
                conn.execute(delete(key_claims).where(and_(key_claims.c.stage == stage, key_claims.c.owner == owner)))
                return
            rows = [{"k_stage": stage, "k_mailbox": m.lower(), "k_origin_id": o, "k_owner": owner} for m, o in sorted(keys)]
            if rows:
                conn.execute(_release_one(), rows)

    def claims(self, stage: str) -> dict[ClaimKey, tuple[str, datetime]]:
        """The live claims of a stage: key -> (owner, expiry); for tests and support."""
        with self._reading() as conn:
            rows = conn.execute(select(key_claims).where(key_claims.c.stage == stage)).all()
        return {(r.mailbox, r.origin_id): (r.owner, r.expires_at) for r in rows}

    def snapshot_progress(self, snapshot_id: str) -> tuple[set[int], int | None]:
        """The parts of a snapshot recorded so far, and its total once the final part is recorded."""
        with self._reading() as conn:
            rows = conn.execute(select(snapshot_parts.c.part, snapshot_parts.c.total_parts).where(snapshot_parts.c.snapshot_id == snapshot_id)).all()
        totals = [r.total_parts for r in rows if r.total_parts is not None]
        return {r.part for r in rows}, (max(totals) if totals else None)

    def prune(self, before: datetime) -> dict[str, int]:
        """Forget what can no longer matter, by age only (``before`` = now minus the retention).

        Snapshot parts received before it; desired and delivered rows that are absent, or whose busy time
        ended, and were last touched before it. Never a Planner-originated row (it must never be re-sent).
        The retention must exceed the retry budget plus how long an operator may wait to replay a dead
        letter: a message older than a pruned tombstone could otherwise bring an event back.
        """
        with self.engine.begin() as conn:
            parts = conn.execute(delete(snapshot_parts).where(snapshot_parts.c.received_at < before)).rowcount
            desired = conn.execute(
                delete(desired_states).where(
                    and_(desired_states.c.updated_at < before, or_(desired_states.c.end_at.is_(None), desired_states.c.end_at < before))
                )
            ).rowcount
            delivered = conn.execute(
                delete(delivered_events).where(
                    and_(
                        delivered_events.c.updated_at < before,
                        delivered_events.c.planner_originated.is_(False),
                        or_(delivered_events.c.present.is_(False), delivered_events.c.end_at < before),
                        # a row Planner may still hold a future busy time for stays until that time is past
                        or_(delivered_events.c.maybe_held.is_(None), delivered_events.c.maybe_held.is_(False), delivered_events.c.maybe_end_at < before),
                    )
                )
            ).rowcount
            # claims left by a replica that died, on keys no one has claimed since (decision 89)
            claims = conn.execute(delete(key_claims).where(key_claims.c.expires_at < before)).rowcount
        return {"snapshot_parts": parts, "desired_states": desired, "delivered_events": delivered, "key_claims": claims}

    # --- publisher: what Planner holds ----------------------------------------------------------
    def delivered_many(self, keys: Mapping[str, Sequence[str]]) -> dict[str, dict[str, DeliveredRecord]]:
        """What Planner is known to hold for these keys, by mailbox (lower case): one query per 500 keys (decision 78)."""
        wanted = {(mailbox.lower(), origin_id) for mailbox, origin_ids in keys.items() for origin_id in origin_ids}
        result: dict[str, dict[str, DeliveredRecord]] = {mailbox.lower(): {} for mailbox in keys}
        pairs = sorted(wanted)
        with self._reading() as conn:
            for start in range(0, len(pairs), 500):
                chunk = pairs[start : start + 500]
                terms = _PerMailbox(delivered_events, ("origin_id",)).pairs(chunk)  # the keys' rows only (decision 114)
                for r in terms.run(conn, *(column.name for column in delivered_events.c)):
                    if (r.mailbox, r.origin_id) in wanted:
                        result[r.mailbox][r.origin_id] = _delivered_record(r)
        return result

    def delivered(self, mailbox: str, origin_ids: Sequence[str] | None = None) -> dict[str, DeliveredRecord]:
        mailbox = mailbox.lower()
        query = select(delivered_events).where(delivered_events.c.mailbox == mailbox)
        result: dict[str, DeliveredRecord] = {}
        if origin_ids is not None and not origin_ids:
            return result
        chunks: list[Sequence[str] | None] = [None] if origin_ids is None else [origin_ids[i : i + 500] for i in range(0, len(origin_ids), 500)]
        with self._reading() as conn:
            for chunk in chunks:
                q = query if chunk is None else query.where(delivered_events.c.origin_id.in_(list(chunk)))
                for r in conn.execute(q):
                    result[r.origin_id] = _delivered_record(r)
        return result

    def explain_rows(self, mailbox: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every desired and delivered row of a mailbox with all its columns (``plannersync explain``, ``export``)."""
        mailbox = mailbox.lower()
        with self._reading() as conn:
            desired = [dict(r._mapping) for r in conn.execute(select(desired_states).where(desired_states.c.mailbox == mailbox))]
            delivered = [dict(r._mapping) for r in conn.execute(select(delivered_events).where(delivered_events.c.mailbox == mailbox))]
        return desired, delivered

    def record_delivered(
        self, mailbox: str, changes: Sequence[DeliveredChange], correlation_id: str | None = None, unchanged_since: datetime | None = None,
    ) -> None:
        """Apply typed changes to delivered records in one transaction; a key never seen starts absent at version 0.

        ``unchanged_since``: a change applies only to a row nobody wrote since then, in the same statement (the
        reconciler's corrections, true of Planner as GetEvents showed it then: a receipt the publisher wrote since
        is newer, and stays; decision 104 in docs/decisions.md)."""
        self.record_delivered_batch([(mailbox, change, correlation_id) for change in changes], unchanged_since=unchanged_since)

    def record_delivered_many(self, mailbox: str, changes: Sequence[tuple[DeliveredChange, str | None]]) -> None:
        """Changes with their correlation ids, applied in order, in one transaction (see ``record_delivered_batch``)."""
        self.record_delivered_batch([(mailbox, change, correlation_id) for change, correlation_id in changes])

    def record_delivered_batch(
        self,
        changes: Sequence[tuple[str, DeliveredChange, str | None]],
        outcomes: Mapping[str, str | None] | None = None,
        release: tuple[str, str] | None = None,
        unchanged_since: datetime | None = None,
    ) -> None:
        """(mailbox, change, correlation id) applied in order, and each mailbox's delivery outcome (``None``: delivered,
        else the error), in one transaction and a few statements (decision 78).

        Each change writes only its own columns; several changes of one key merge in order (a later one's column
        wins), which is what applying them one after the other did. One SELECT per 500 keys finds the rows that
        exist; updates and inserts go out as one executemany per set of columns written, in key order (two replicas'
        transactions then never wait on each other in a cycle). ``release`` (stage, owner): every claim that owner
        holds is released in the same transaction, once the receipts are written (decision 89). A key inserted by
        someone else since the SELECT makes the insert fail; the whole write is then done again, as updates.
        """
        for attempt in range(3):
            try:
                self._record_delivered_once(changes, outcomes, release, unchanged_since)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _record_delivered_once(
        self, changes: Sequence[tuple[str, DeliveredChange, str | None]], outcomes: Mapping[str, str | None] | None, release: tuple[str, str] | None,
        unchanged_since: datetime | None = None,
    ) -> None:
        now = now_utc()
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for mailbox, change, correlation_id in changes:
            values = _delivered_values(change)
            if correlation_id is not None:
                values["correlation_id"] = correlation_id
            merged.setdefault((mailbox.lower(), change.origin_id), {}).update(values)
        c = delivered_events.c
        with self.engine.begin() as conn:
            keys = sorted(merged)
            existing: set[tuple[str, str]] = set()
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                terms = _PerMailbox(delivered_events, ("origin_id",)).pairs(chunk)  # the keys' rows only (decision 114)
                existing.update((r.mailbox, r.origin_id) for r in terms.run(conn, "mailbox", "origin_id"))
            updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            inserts: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for mailbox, origin_id in keys:
                values = merged[(mailbox, origin_id)]
                values["updated_at"] = now
                if (mailbox, origin_id) in existing:
                    keyed = {"k_mailbox": mailbox, "k_origin_id": origin_id, **values}
                    if unchanged_since is not None:
                        keyed["k_since"] = unchanged_since
                    updates.setdefault(tuple(sorted(values)), []).append(keyed)
                else:
                    row = {"mailbox": mailbox, "origin_id": origin_id, "present": False, "version": 0, **values}
                    inserts.setdefault(tuple(sorted(row)), []).append(row)
            for columns, rows in updates.items():
                key = and_(c.mailbox == bindparam("k_mailbox"), c.origin_id == bindparam("k_origin_id"))
                if unchanged_since is not None:
                    key = and_(key, c.updated_at < bindparam("k_since", type_=c.updated_at.type))
                statement = update(delivered_events).where(key).values({name: bindparam(name) for name in columns})
                conn.execute(statement, rows)
            for rows in inserts.values():
                conn.execute(insert(delivered_events), rows)
            ordered = sorted((outcomes or {}).items())
            delivered = [{"k_address": m.lower(), "last_delivery_at": now, "updated_at": now} for m, e in ordered if e is None]
            failed = [{"k_address": m.lower(), "last_error": e[:500], "last_error_at": now, "updated_at": now} for m, e in ordered if e is not None]
            for rows in (delivered, failed):
                if rows:
                    names = [name for name in rows[0] if not name.startswith("k_")]
                    statement = update(mailboxes).where(mailboxes.c.address == bindparam("k_address")).values({n: bindparam(n) for n in names})
                    conn.execute(statement, rows)
            if release is not None:
                conn.execute(delete(key_claims).where(and_(key_claims.c.stage == release[0], key_claims.c.owner == release[1])))


def _release_one() -> Any:
    """DELETE of one claim by key and owner, for an executemany of ``k_stage``, ``k_mailbox``, ``k_origin_id``, ``k_owner``."""
    c = key_claims.c
    return delete(key_claims).where(
        and_(c.stage == bindparam("k_stage"), c.mailbox == bindparam("k_mailbox"), c.origin_id == bindparam("k_origin_id"), c.owner == bindparam("k_owner"))
    )


def _delivered_record(r: Any) -> DeliveredRecord:
    return DeliveredRecord(
        r.mailbox, r.origin_id, r.version, r.present, _stored_interval(r.start_at, r.end_at),
        r.planner_event_id, r.planner_resource_id, r.planner_originated, r.last_code, r.last_message,
        bool(r.maybe_held), _stored_interval(r.maybe_start_at, r.maybe_end_at),
    )


def _delivered_values(change: DeliveredChange) -> dict[str, Any]:
    """The columns a change writes; the others keep their values."""
    values: dict[str, Any] = {}
    if change.version is not None:
        values["version"] = change.version
    if change.holding is not None:
        interval = change.holding.interval
        values.update(present=change.holding.present, start_at=interval.start if interval else None, end_at=interval.end if interval else None)
        values.update(maybe_held=False, maybe_start_at=None, maybe_end_at=None)  # what Planner holds is known now
    if change.maybe_cleared:
        values.update(maybe_held=False, maybe_start_at=None, maybe_end_at=None)
    if change.maybe_sent is not None:
        values.update(maybe_held=True, maybe_start_at=change.maybe_sent.start, maybe_end_at=change.maybe_sent.end)
    if change.planner_originated is not None:
        values["planner_originated"] = change.planner_originated
    if change.planner_event_id is not None:
        values["planner_event_id"] = change.planner_event_id
    if change.planner_resource_id is not None:
        values["planner_resource_id"] = change.planner_resource_id
    if change.receipt is not None:
        receipt = change.receipt
        values.update(
            last_code=receipt.code,
            last_message=(receipt.message or "")[:1000] or None,
            conflict_notification_sent=receipt.conflict_notification_sent,
            receipt_at=receipt.received_at,
            service_request_ref=receipt.reference,
        )
    return values


def ddl(dialect_name: str) -> list[str]:
    """The CREATE statements for a dialect (``sqlite``, ``postgresql``, ``mssql``), for review and tests: each table,
    then its indexes."""
    from sqlalchemy.schema import CreateIndex, CreateTable

    dialect = _dialect(dialect_name)
    statements = []
    for table in metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)).strip())
        statements.extend(str(CreateIndex(index).compile(dialect=dialect)).strip() for index in sorted(table.indexes, key=lambda i: str(i.name)))
    return statements


def _dialect(name: str) -> Any:
    if name == "mssql":
        from sqlalchemy.dialects.mssql import pymssql

        return pymssql.dialect()
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import psycopg

        return psycopg.dialect()
    from sqlalchemy.dialects.sqlite import pysqlite

    return pysqlite.dialect()


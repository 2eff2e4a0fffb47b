"""Prometheus metrics (``prometheus-client``): every metric plannersync exposes, defined once, and the hooks that move them.

Only this module imports ``prometheus_client``. Metrics live in the process's default registry; ``plannersync run``
serves them at ``/metrics`` when ``PLANNERSYNC_STATUS__METRICS_PORT`` is set (``serve``), next to the health file.
Every label has a bounded set of values: stage, operation, failure kind, backend, call, receipt code (0-99, else
"other"), mailbox status, queue tier, worker name. No mailbox address, id or content is ever a label (decisions 1 and
65 in docs/decisions.md). A metric call never raises into the code it measures.

What moves them:

- the consume loop (``stage(name)``): messages in, out and handled, failures by kind, retries, dead letters;
- the publisher: Planner call latency and errors (``planner_call``), receipt codes, the end-to-end lag from the
  Exchange read that saw a change (the state's version, decision 30) to Planner's receipt (``delivered``), and the
  certificate's days left (``certificate_expiry``);
- any Exchange or Graph reader (``exchange_call`` / ``timed_exchange_call``);
- gauges computed at scrape time from a snapshot (``register_gauges``): the status page's mailboxes by status,
  queue depths and health files, and each worker's own ``health()``.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, ParamSpec, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import ValidationError

from shared.domain.contracts import MalformedMessage, UnknownSchemaVersion
from shared.domain.retry import ContentError, Permanent, Transient
from shared.workers import Health

_P = ParamSpec("_P")
_R = TypeVar("_R")

MESSAGES_IN = Counter("plannersync_messages_in", "Messages delivered to a stage's consume loop", ["stage"])
MESSAGES_OUT = Counter("plannersync_messages_out", "Messages a stage published and the broker confirmed", ["stage"])
MESSAGES_HANDLED = Counter("plannersync_messages_handled", "Messages a stage finished and acked", ["stage"])
FAILURES = Counter("plannersync_message_failures", "Messages that failed, by kind (malformed, content, permanent, transient, error)", ["stage", "reason"])
RETRIES = Counter("plannersync_retries", "Messages sent up a retry tier", ["stage"])
DEAD_LETTERS = Counter("plannersync_dead_letters", "Messages sent to the dead-letter queue", ["stage"])

PLANNER_CALL_SECONDS = Histogram(
    "plannersync_planner_call_seconds", "Duration of Planner calls", ["operation"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
)
PLANNER_CALL_ERRORS = Counter("plannersync_planner_call_errors", "Planner calls that failed, by kind (transient, permanent, content, error)", ["operation", "kind"])
PLANNER_RECEIPTS = Counter("plannersync_planner_receipts", "Receipts from Planner, by code", ["operation", "code"])
EXCHANGE_CALL_SECONDS = Histogram(
    "plannersync_exchange_call_seconds", "Duration of Exchange (EWS) and Graph calls", ["backend", "call"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
)
EXCHANGE_CALL_ERRORS = Counter("plannersync_exchange_call_errors", "Exchange (EWS) and Graph calls that failed, by kind", ["backend", "call", "kind"])
LAG_SECONDS = Histogram(
    "plannersync_end_to_end_lag_seconds",
    "From the Exchange read that saw a change (the state's version) to Planner's receipt; cause reconcile re-sends old versions",
    ["operation", "cause"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600),
)
CERTIFICATE_DAYS_LEFT = Gauge("plannersync_planner_certificate_days_left", "Days until the Planner client (OCES) certificate expires")
CERTIFICATE_EXPIRY = Gauge("plannersync_planner_certificate_expiry_timestamp_seconds", "When the Planner client (OCES) certificate expires")

FAILURE_KINDS = ("malformed", "content", "permanent", "transient", "error")


def failure_kind(error: BaseException) -> str:
    """The bounded label for a failed message: malformed, content, permanent, transient, or error (anything else)."""
    if isinstance(error, (ValidationError, UnknownSchemaVersion, MalformedMessage)):
        return "malformed"
    if isinstance(error, ContentError):
        return "content"
    if isinstance(error, Permanent):
        return "permanent"
    if isinstance(error, Transient):
        return "transient"
    return "error"


@dataclass(frozen=True)
class StageMetrics:
    """The consume loop's counters of one stage, labels bound once."""

    name: str
    _in: Any = field(init=False, repr=False)
    _out: Any = field(init=False, repr=False)
    _handled: Any = field(init=False, repr=False)
    _retried: Any = field(init=False, repr=False)
    _dead: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for attr, metric in (("_in", MESSAGES_IN), ("_out", MESSAGES_OUT), ("_handled", MESSAGES_HANDLED), ("_retried", RETRIES), ("_dead", DEAD_LETTERS)):
            object.__setattr__(self, attr, metric.labels(self.name))
        for kind in FAILURE_KINDS:  # every kind shows from the start (0), so rate() and alerts see the first failure
            FAILURES.labels(self.name, kind)

    def received(self, count: int = 1) -> None:
        self._in.inc(count)

    def published(self, count: int) -> None:
        if count:
            self._out.inc(count)

    def handled(self) -> None:
        self._handled.inc()

    def failed(self, error: BaseException) -> None:
        FAILURES.labels(self.name, failure_kind(error)).inc()

    def retried(self) -> None:
        self._retried.inc()

    def dead_lettered(self) -> None:
        self._dead.inc()


def stage(name: str) -> StageMetrics:
    return StageMetrics(name)


# --- Planner --------------------------------------------------------------------------------------
@contextmanager
def planner_call(operation: str) -> Iterator[None]:
    """Time one Planner call; an exception is counted by kind and passed on."""
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        PLANNER_CALL_ERRORS.labels(operation, failure_kind(exc)).inc()
        raise
    finally:
        PLANNER_CALL_SECONDS.labels(operation).observe(time.perf_counter() - started)


def planner_receipt(operation: str, code: int | None) -> None:
    label = "none" if code is None else (str(code) if 0 <= code < 100 else "other")
    PLANNER_RECEIPTS.labels(operation, label).inc()


def delivered(operation: str, cause: str, version: int, now: float | None = None) -> None:
    """Planner confirmed a state whose version is its Exchange read's start in microseconds (decision 30).

    ``cause`` (change, snapshot, reconcile, replay) is a label because a reconciliation re-sends the current state
    with its old version, and a replay is as late as the operator made it: alert on ``cause="change"``.
    """
    lag = (time.time() if now is None else now) - version / 1_000_000
    LAG_SECONDS.labels(operation, cause).observe(max(0.0, lag))


def certificate_expiry(expiry: datetime | None) -> None:
    """The Planner client certificate's expiry; days left are computed at every scrape. None: no certificate."""
    if expiry is None:
        return
    moment = expiry.timestamp()
    CERTIFICATE_EXPIRY.set(moment)
    CERTIFICATE_DAYS_LEFT.set_function(lambda: (moment - time.time()) / 86400)


# --- Exchange and Graph -----------------------------------------------------------------------------
@contextmanager
def exchange_call(backend: str, call: str, classify: Callable[[BaseException], str] | None = None) -> Iterator[None]:
    """Time one Exchange/Graph call (``backend`` "ews" or "graph", ``call`` a fixed name such as "sync" or "view").

    ``classify`` turns an exception into a bounded kind (the adapter's fault kinds); without it the kind is "error".
    """
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        try:
            kind = classify(exc) if classify is not None else "error"
        except Exception:  # noqa: BLE001 - a metric never changes what the caller sees
            kind = "error"
        EXCHANGE_CALL_ERRORS.labels(backend, call, kind).inc()
        raise
    finally:
        EXCHANGE_CALL_SECONDS.labels(backend, call).observe(time.perf_counter() - started)


def exchange_call_failed(backend: str, call: str, kind: str) -> None:
    """Count one failed part of a call that does not raise (a mailbox's answer inside a Graph ``$batch``)."""
    EXCHANGE_CALL_ERRORS.labels(backend, call, kind).inc()


def timed_exchange_call(backend: str, call: str, classify: Callable[[BaseException], str] | None = None) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """``exchange_call`` as a decorator for an adapter method."""

    def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def timed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with exchange_call(backend, call, classify):
                return fn(*args, **kwargs)

        return timed

    return wrap


# --- gauges computed at scrape time -------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One gauge value; samples of one name must carry the same label names."""

    name: str
    help: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


class _SampleCollector(Collector):
    def __init__(self, read: Callable[[], Iterable[Sample]]) -> None:
        self.read = read

    def describe(self) -> Iterable[Any]:
        return []  # names are not known before the first snapshot; they never clash with the metrics above

    def collect(self) -> Iterable[Any]:
        families: dict[str, GaugeMetricFamily] = {}
        try:
            samples = list(self.read())
        except Exception:  # noqa: BLE001 - a scrape shows what it can
            samples = []
        for sample in samples:
            family = families.get(sample.name)
            if family is None:
                family = families[sample.name] = GaugeMetricFamily(sample.name, sample.help, labels=sorted(sample.labels))
            family.add_metric([sample.labels[key] for key in sorted(sample.labels)], sample.value)
        return list(families.values())


def register_gauges(read: Callable[[], Iterable[Sample]]) -> Callable[[], None]:
    """Serve the samples ``read()`` returns at every scrape; returns a function that unregisters them."""
    collector = _SampleCollector(read)
    REGISTRY.register(collector)
    return lambda: REGISTRY.unregister(collector)


def timestamp_of(value: Any) -> float | None:
    """Seconds since the epoch of a number or an ISO 8601 time (a health fact); None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return None


def health_samples(worker: str, facts: Mapping[str, Any], ok: bool, beat_at: float | None, prefix: str = "plannersync_worker") -> list[Sample]:
    """A worker's health as gauges: ok, last beat, and the nightly runs (``last_run_at``/``next_run_at`` facts).

    ``prefix`` keeps a worker's own account (``plannersync_worker_*``, from its process) apart from what the
    status page reads in the health files (``plannersync_health_file_*``).
    """
    labels = {"worker": worker}
    samples = [Sample(f"{prefix}_ok", "1 when the worker can do its job (its health)", 1.0 if ok else 0.0, labels)]
    if beat_at is not None:
        samples.append(Sample(f"{prefix}_beat_timestamp_seconds", "When the worker's own loop last went round", beat_at, labels))
    for fact, name, text in (
        ("last_run_at", f"{prefix}_last_run_timestamp_seconds", "When the nightly run (snapshot, reconciliation) last started"),
        ("next_run_at", f"{prefix}_next_run_timestamp_seconds", "When the nightly run (snapshot, reconciliation) is due next"),
    ):
        moment = timestamp_of(facts.get(fact))
        if moment is not None:
            samples.append(Sample(name, text, moment, labels))
    return samples


def worker_health_gauges(worker: str, health: Callable[[], Health]) -> Callable[[], None]:
    """Serve a running worker's own ``health()`` as gauges (registered by ``plannersync run``)."""

    def read() -> list[Sample]:
        answer = health()
        return health_samples(worker, answer.facts, answer.ok, answer.beat_at)

    return register_gauges(read)


# --- the endpoint ----------------------------------------------------------------------------------------
class MetricsServer:
    """``/metrics`` on its own daemon thread (prometheus-client's WSGI server)."""

    def __init__(self, host: str, port: int) -> None:
        self.server, self.thread = start_http_server(port, addr=host)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(host: str, port: int) -> MetricsServer:
    """Start serving this process's metrics; an address in use raises OSError."""
    return MetricsServer(host, port)

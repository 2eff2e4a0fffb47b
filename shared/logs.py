"""Structured JSON logs with a correlation id; never appointment content.

``configure`` is called once in ``main``. Code logs facts as snake_case events with ids and
times (``log.info("busy_time_delivered", mailbox=..., origin_id=..., code=0)``). The correlation
id of the message being handled is bound with ``correlation(...)`` and appears on every line
logged while it is handled, from the Exchange item to Planner's receipt.

A worker that dies says why (decision 57 in docs/decisions.md): ``install_crash_reporting()`` makes an exception
that ends the process or a thread one ``worker_crashed``/``thread_crashed`` line (exception type, message and
traceback as fields) and enables ``faulthandler`` for SIGSEGV/SIGBUS/SIGFPE/SIGABRT/SIGILL; ``log_fatal_errors()``
logs an exception leaving its block the same way (once) and lets it go on.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import traceback
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Iterator

import structlog


def configure(level: str = "INFO", fmt: str = "json", service: str = "plannersync") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # a module's logger is built once, at its first line, not again at every call (decision 113)
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    # Libraries (pika, zeep, exchangelib) log through stdlib logging: keep them quiet and on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format='{"event": "%(message)s", "logger": "%(name)s", "level": "%(levelname)s"}')


@contextmanager
def correlation(correlation_id: str | None, **ids: str) -> Iterator[None]:
    """Bind a correlation id (and other ids) to every log line inside the block."""
    tokens = structlog.contextvars.bind_contextvars(correlation_id=correlation_id, **ids)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


_LOGGED = "_plannersync_fatal_logged"


def log_fatal(error: BaseException, event: str = "worker_crashed", **ids: Any) -> None:
    """Log ``error`` as one critical line with its type, message and traceback as fields (once per exception)."""
    if getattr(error, _LOGGED, False):
        return
    try:
        setattr(error, _LOGGED, True)
    except (AttributeError, TypeError):  # an exception type without a __dict__: log it anyway
        pass
    kind = type(error)
    get_logger("plannersync.crash").critical(
        event,
        error=f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__,
        detail=str(error)[:2000],
        traceback="".join(traceback.format_exception(kind, error, error.__traceback__)),
        **ids,
    )


@contextmanager
def log_fatal_errors(**ids: Any) -> Iterator[None]:
    """Log an exception that leaves the block (not SystemExit or Ctrl-C) as ``worker_crashed``, then let it go on."""
    try:
        yield
    except Exception as exc:
        log_fatal(exc, **ids)
        raise


def install_crash_reporting() -> None:
    """Make a dying process (or thread) leave its cause on stderr; call once, after ``configure``.

    - an uncaught exception in the main thread: one ``worker_crashed`` JSON line, then Python's exit status 1;
    - an uncaught exception in another thread: one ``thread_crashed`` line (the thread ends, the process goes on);
    - SIGSEGV, SIGBUS (a vanished SQLite WAL index), SIGFPE, SIGABRT, SIGILL: ``faulthandler`` prints every
      thread's stack on stderr before the process dies.
    """
    stream = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    try:
        faulthandler.enable(file=stream, all_threads=True)
    except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor: nothing to write a crash to
        pass
    previous_hook = sys.excepthook

    def excepthook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            previous_hook(kind, error, trace)
            return
        if error.__traceback__ is None and trace is not None:
            error = error.with_traceback(trace)
        log_fatal(error)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or issubclass(args.exc_type, SystemExit):
            return
        log_fatal(args.exc_value, event="thread_crashed", thread=args.thread.name if args.thread is not None else None)

    sys.excepthook = excepthook
    threading.excepthook = thread_hook

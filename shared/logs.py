"""Structured JSON logs with a correlation id; never appointment content.

``configure`` is called once in ``main``. Code logs facts as snake_case events with ids and
times (``log.info("busy_time_delivered", mailbox=..., origin_id=..., code=0)``). The correlation
id of the message being handled is bound with ``correlation(...)`` and appears on every line
logged while it is handled, from the Exchange item to Planner's receipt.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator

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
        cache_logger_on_first_use=False,
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

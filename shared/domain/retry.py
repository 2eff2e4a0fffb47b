"""What a failure means: retry later, or dead-letter with a reason. Pure; no I/O, no clock.

Handlers raise ``Permanent`` or ``Transient`` (or let a validation error through) and never
sleep, loop or settle a message themselves. ``shared/broker/consume_loop.py`` carries out the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Sequence

from pydantic import ValidationError

from shared.domain.contracts import (
    MalformedMessage,
    UnknownSchemaVersion,
    describe_validation,
)


class Permanent(Exception):
    """Retrying cannot help (bad data, a permanent Planner receipt code, a rejected request)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ContentError(Permanent):
    """What a request carries cannot be sent at all (a control character in an id, a value outside the contract).

    Permanent for the events it names in ``problems`` (origin id -> reason) and for no other; when ``problems`` is
    empty, the request as a whole could not be built and the caller splits it to find the events at fault. It says
    nothing about Planner being up or down (decision 52 in docs/decisions.md).
    """

    def __init__(self, reason: str, code: int | None = None, problems: Mapping[str, str] | None = None) -> None:
        super().__init__(reason, code)
        self.problems: dict[str, str] = dict(problems or {})


class Transient(Exception):
    """Retrying later may help (timeouts, connection errors, HTTP 5xx, throttling, codes 15/16)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class RetryLater:
    delay: timedelta
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    reason: str


Outcome = RetryLater | DeadLetter


def describe(error: BaseException) -> str:
    """A short, content-free description of an error for headers and logs."""
    if isinstance(error, ValidationError):
        return f"invalid message: {describe_validation(error)}"
    if isinstance(error, UnknownSchemaVersion):
        return f"unknown schema: {error}"
    if isinstance(error, MalformedMessage):
        return f"malformed message: {error}"
    if isinstance(error, (Permanent, Transient)):
        prefix = f"code {error.code}: " if error.code is not None else ""
        return f"{prefix}{error.reason}"
    return f"{type(error).__name__}: {error}"[:500]


def decide(error: BaseException, attempt: int, ladder: Sequence[timedelta]) -> Outcome:
    """``attempt`` is how many retries this message has had already (its x-retry-count)."""
    if isinstance(error, (ValidationError, UnknownSchemaVersion, MalformedMessage, Permanent)):
        return DeadLetter(reason=describe(error))
    if attempt < len(ladder):
        return RetryLater(delay=ladder[attempt], reason=describe(error))
    return DeadLetter(reason=f"gave up after {attempt + 1} attempts: {describe(error)}")

"""One way to fail: what an error means for a message."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ValidationError

from shared.domain.contracts import MalformedMessage, UnknownSchemaVersion, decode
from shared.domain.retry import ContentError, DeadLetter, Permanent, RetryLater, Transient, decide

LADDER = [timedelta(seconds=10), timedelta(minutes=1)]


class _M(BaseModel):
    x: int


def _validation_error() -> ValidationError:
    try:
        _M(x="nope")  # type: ignore[arg-type]
    except ValidationError as exc:
        return exc
    raise AssertionError


def test_a_transient_error_climbs_the_ladder_then_dead_letters() -> None:
    error = Transient("timeout")
    assert decide(error, 0, LADDER) == RetryLater(timedelta(seconds=10), "timeout")
    assert decide(error, 1, LADDER) == RetryLater(timedelta(minutes=1), "timeout")
    outcome = decide(error, 2, LADDER)
    assert isinstance(outcome, DeadLetter) and "gave up after 3 attempts" in outcome.reason


def test_an_unforeseen_error_is_retried_like_a_transient_one() -> None:
    assert isinstance(decide(RuntimeError("boom"), 0, LADDER), RetryLater)


def test_bad_messages_and_permanent_errors_dead_letter_at_once() -> None:
    assert decide(_validation_error(), 0, LADDER) == DeadLetter("invalid message: x: Input should be a valid integer, unable to parse string as an integer")
    assert isinstance(decide(UnknownSchemaVersion("v9"), 0, LADDER), DeadLetter)
    assert decide(Permanent("bad resource", code=3), 0, LADDER) == DeadLetter("code 3: bad resource")


def test_a_content_error_is_permanent_at_once_and_names_the_events_it_concerns() -> None:
    error = ContentError("CreateEvents: OriginSystemIdentifier has a control character", problems={"uid-1": "control character"})
    assert isinstance(error, Permanent) and error.problems == {"uid-1": "control character"}
    assert decide(error, 0, LADDER) == DeadLetter("CreateEvents: OriginSystemIdentifier has a control character")


def test_bodies_past_the_decoding_limits_are_dead_lettered_at_once_never_retried() -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"version": ' + b"9" * 5000 + b"}", b'{"type": "busy_time_state", "schema_version": true}'):
        try:
            decode(body)
        except (MalformedMessage, UnknownSchemaVersion) as exc:
            outcome = decide(exc, 0, LADDER)
        else:
            raise AssertionError(f"decoded {body[:40]!r}")
        assert isinstance(outcome, DeadLetter), outcome

"""``publish_confirmed``'s retry after a nack goes out on the channel ``reopen`` gives (decision 82 in docs/decisions.md)."""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions

from shared.broker.publishing import publish_confirmed


class FakeChannel:
    def __init__(self, nacks: int) -> None:
        self.nacks = nacks
        self.published = 0

    def basic_publish(self, **_: Any) -> None:
        if self.nacks:
            self.nacks -= 1
            raise pika.exceptions.NackError([])
        self.published += 1


def test_a_nacked_publish_is_retried_on_the_fresh_channel_reopen_gives() -> None:
    stuck, fresh = FakeChannel(nacks=1_000), FakeChannel(nacks=0)   # given a channel that keeps nacking
    publish_confirmed(stuck, "ex", "key", b"{}", pika.BasicProperties(), wait=lambda _seconds: True, reopen=lambda: fresh)  # type: ignore[arg-type]
    assert (stuck.nacks, stuck.published, fresh.published) == (999, 0, 1)   # then the retry went out on the new one


def test_without_reopen_the_retry_stays_on_the_same_channel() -> None:
    channel = FakeChannel(nacks=2)
    publish_confirmed(channel, "ex", "key", b"{}", pika.BasicProperties(), wait=lambda _seconds: True)  # type: ignore[arg-type]
    assert (channel.nacks, channel.published) == (0, 1)

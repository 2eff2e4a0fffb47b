"""Progress lines of long commands: every N items, at least every few seconds, always the last (plannersync/progress.py)."""

from __future__ import annotations

import io

from plannersync.progress import ProgressLine


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_n_items_and_always_the_last() -> None:
    out = io.StringIO()
    line = ProgressLine("resync", "mailboxes", 7, every=3, seconds=60, stream=out, clock=FakeClock())
    for done in range(1, 8):
        line.update(done, f"{done // 4} failed")
    assert out.getvalue().splitlines() == ["resync: 3/7 mailboxes, 0 failed", "resync: 6/7 mailboxes, 1 failed", "resync: 7/7 mailboxes, 1 failed"]


def test_a_slow_run_still_prints_a_line_every_few_seconds() -> None:
    out, clock = io.StringIO(), FakeClock()
    line = ProgressLine("replay", "dead letters looked at", 1000, every=500, seconds=5, stream=out, clock=clock)
    line.update(1)
    clock.now = 4.9
    line.update(2)
    clock.now = 5.0
    line.update(3, "3 replayed, 0 parked")
    assert out.getvalue().splitlines() == ["replay: 3/1000 dead letters looked at, 3 replayed, 0 parked"]

"""The publisher's pool for parallel Planner calls (decisions 51 and 120 in docs/decisions.md)."""

from __future__ import annotations

import threading
import time

import pytest

from services.publisher.worker import DaemonPool


def test_many_calls_run_on_the_pools_own_few_daemon_threads_never_more_at_once_than_its_size() -> None:
    """A batch at 2,000 mailboxes makes about 500 calls; starting a thread for each took 40 % of the publisher's
    handler into an instant Planner (decision 120)."""
    pool = DaemonPool(4, "planner-call")
    lock = threading.Lock()
    running, most, threads = [0], [0], set()

    def call(n: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads.add((threading.current_thread().name, threading.current_thread().daemon))
        time.sleep(0.0005)
        with lock:
            running[0] -= 1
        return n * n

    for batch in range(5):
        assert list(pool.map(call, range(40 * batch, 40 * batch + 40))) == [n * n for n in range(40 * batch, 40 * batch + 40)]
    assert most[0] <= 4
    assert len(threads) <= 4 and all(daemon for _, daemon in threads), threads


def test_a_failed_call_raises_for_its_own_item_and_the_others_are_still_made() -> None:
    pool = DaemonPool(3, "planner-call")
    made: list[int] = []

    def call(n: int) -> int:
        made.append(n)
        if n == 2:
            raise ValueError("fault 2")
        return n

    results = pool.map(call, range(6))
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="fault 2"):
        next(results)
    deadline = time.monotonic() + 5
    while len(made) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(made) == list(range(6))
    assert list(pool.map(call, [7, 8, 9])) == [7, 8, 9]   # the thread whose call raised still serves


def test_a_call_that_never_returns_holds_one_thread_and_the_rest_go_on() -> None:
    """Decision 51: a wedged call cannot hold the others, nor the process at exit (its thread is a daemon)."""
    pool = DaemonPool(2, "planner-call")
    never = threading.Event()

    def call(n: int) -> int:
        if n == 0:
            never.wait()
        return n

    results = pool.map(call, range(12))
    stuck = [t for t in threading.enumerate() if t.name.startswith("planner-call")]
    assert list(pool.map(call, range(1, 12))) == list(range(1, 12))
    assert stuck and all(t.daemon for t in stuck)
    never.set()
    assert list(results) == list(range(12))

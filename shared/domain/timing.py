"""Time arithmetic every schedule shares: the next daily run and the one backoff rule. Pure: the caller gives ``now``."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo


def next_run(now: datetime, at: str, zone: str) -> datetime:
    """The next moment after ``now`` the wall clock in ``zone`` shows ``at`` (HH:MM), as aware UTC.

    A wall time the spring change skips does not exist: zoneinfo gives the hour after, which is what a
    nightly job wants. In the autumn the first of the two moments is taken.
    """
    tz = ZoneInfo(zone)
    hour, minute = (int(part) for part in at.split(":"))
    local = now.astimezone(tz)
    for days in range(3):
        candidate = datetime.combine(local.date() + timedelta(days=days), time(hour, minute), tzinfo=tz)
        if candidate.astimezone(timezone.utc) > now.astimezone(timezone.utc):
            return candidate.astimezone(timezone.utc)
    raise AssertionError("unreachable: a wall time recurs within two days")


def exponential_backoff(failures: int, base: timedelta, cap: timedelta) -> timedelta:
    """How long to wait after the ``failures``-th failure in a row: ``base``, then doubling, never above ``cap``."""
    if failures < 1:
        return timedelta(0)
    return min(base * (1 << min(failures - 1, 30)), cap)

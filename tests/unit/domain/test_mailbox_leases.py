"""How change-producer replicas share the mailboxes (decision 91): the pure pass over the leases, replayed as the store
would answer it, pass after pass, by several replicas."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.domain.mailbox_leases import Lease, ReplicaBeat, claim, fair_share, live_replicas, plan

T0 = datetime(2026, 5, 4, 8, 0, tzinfo=timezone.utc)
TTL = timedelta(seconds=60)
MAILBOXES = [f"cw{n:02d}@jobcenter.dk" for n in range(10)]


class Store:
    """The lease table as the conditional statements keep it (one row per mailbox), for replaying passes."""

    def __init__(self) -> None:
        self.rows: dict[str, Lease] = {}
        self.beats: dict[str, ReplicaBeat] = {}

    def take_part(self, me: str, now: datetime, enrolled: list[str], reading: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
        self.beats[me] = ReplicaBeat(me, me, now + TTL)
        for mailbox, lease in self.rows.items():   # renew_leases
            if lease.owner == me:
                self.rows[mailbox] = Lease(mailbox, me, now + TTL, lease.epoch)
        leases = list(self.rows.values())
        decided = plan(me, now, TTL, enrolled, leases, live_replicas(me, now, leases, self.beats.values()), reading)
        for mailbox in decided.release:   # release_leases: only its own
            if self.rows[mailbox].owner == me:
                self.rows[mailbox] = Lease(mailbox, None, now, self.rows[mailbox].epoch)
        for mailbox in decided.acquire:   # acquire_leases: only a free or expired row, or a new one
            row = self.rows.get(mailbox)
            if row is None or row.owner is None or row.expires_at <= now:
                self.rows[mailbox] = Lease(mailbox, me, now + TTL, (row.epoch if row else 0) + 1)
        return {m for m, lease in self.rows.items() if lease.owner == me and lease.held_at(now)}

    def stop(self, me: str, now: datetime) -> None:   # a clean stop: leases released, heartbeat gone
        for mailbox, lease in self.rows.items():
            if lease.owner == me:
                self.rows[mailbox] = Lease(mailbox, None, now, lease.epoch)
        self.beats.pop(me, None)

    def holders(self, now: datetime) -> dict[str, str]:
        return {m: lease.owner for m, lease in self.rows.items() if lease.owner is not None and lease.held_at(now)}


def passes(store: Store, replicas: list[str], start: datetime, rounds: int, every: timedelta = TTL / 3) -> datetime:
    now = start
    for _ in range(rounds):
        for replica in replicas:
            store.take_part(replica, now, MAILBOXES)
        now += every
    return now


def test_one_replica_takes_every_mailbox_at_its_first_pass() -> None:
    store = Store()
    assert store.take_part("a", T0, MAILBOXES) == set(MAILBOXES)


def test_the_share_fits_every_mailbox_and_crowds_none() -> None:
    assert [fair_share(10, n) for n in (1, 2, 3, 4, 11)] == [10, 5, 4, 3, 1]
    assert fair_share(0, 3) == 0 and fair_share(5, 0) == 5


def test_a_second_replica_gets_half_and_the_first_gives_back_only_its_surplus() -> None:
    store = Store()
    store.take_part("a", T0, MAILBOXES)
    assert store.take_part("b", T0, MAILBOXES) == set()          # everything held: nothing to take yet
    a = store.take_part("a", T0 + TTL / 3, MAILBOXES)            # a sees b: gives back what is above 10 / 2
    b = store.take_part("b", T0 + TTL / 3, MAILBOXES)
    assert len(a) == len(b) == 5 and not a & b and a | b == set(MAILBOXES)


def test_a_dead_replicas_mailboxes_are_taken_over_once_its_leases_expire_and_not_before() -> None:
    store = Store()
    now = passes(store, ["a", "b"], T0, 3)
    a_held = {m for m, owner in store.holders(now).items() if owner == "a"}
    assert len(a_held) == 5
    store.take_part("b", now, MAILBOXES)     # a died at its last pass: b waits for its leases to run out
    assert store.holders(now).keys() >= a_held and all(store.holders(now)[m] == "a" for m in a_held)
    later = now + TTL
    assert store.take_part("b", later, MAILBOXES) == set(MAILBOXES)
    assert all(store.rows[m].epoch == 2 for m in a_held)         # each taken once more: a new epoch


def test_a_clean_stop_hands_over_at_the_next_pass() -> None:
    store = Store()
    now = passes(store, ["a", "b"], T0, 3)
    store.stop("a", now)
    assert store.take_part("b", now + timedelta(seconds=1), MAILBOXES) == set(MAILBOXES)


def test_a_mailbox_being_read_is_never_given_back() -> None:
    leases = [Lease(m, "a", T0 + TTL) for m in MAILBOXES]
    live = frozenset({"a", "b"})
    decided = plan("a", T0, TTL, MAILBOXES, leases, live, reading=set(MAILBOXES[:8]))
    assert set(decided.release) <= set(MAILBOXES[8:]) and len(decided.release) == 2
    assert decided.keep == frozenset(MAILBOXES[:8])


def test_nothing_is_given_back_when_no_other_replica_is_short() -> None:
    # 10 mailboxes over 3 replicas: shares of 4; holdings 6, 4, 0 give back 2; holdings 4, 4, 2 give back none
    leases = [Lease(m, "a", T0 + TTL) for m in MAILBOXES[:4]] + [Lease(m, "b", T0 + TTL) for m in MAILBOXES[4:8]] + [
        Lease(m, "c", T0 + TTL) for m in MAILBOXES[8:]]
    assert plan("a", T0, TTL, MAILBOXES, leases, frozenset("abc")).release == ()
    six = [Lease(m, "a", T0 + TTL) for m in MAILBOXES[:6]] + [Lease(m, "b", T0 + TTL) for m in MAILBOXES[6:]]
    assert len(plan("a", T0, TTL, MAILBOXES, six, frozenset("abc")).release) == 2


def test_a_removed_mailbox_is_given_back_and_a_new_one_taken() -> None:
    leases = [Lease(m, "a", T0 + TTL) for m in MAILBOXES]
    enrolled = MAILBOXES[1:] + ["new@jobcenter.dk"]
    decided = plan("a", T0, TTL, enrolled, leases, frozenset({"a"}))
    assert decided.release == (MAILBOXES[0],) and decided.acquire == ("new@jobcenter.dk",)


def test_a_mailbox_left_free_for_a_whole_ttl_is_taken_beyond_the_share() -> None:
    # "b" counts as live (a heartbeat) but takes nothing: "a", at its share, still takes what nobody took for a TTL
    leases = [Lease(m, "a", T0 + TTL) for m in MAILBOXES[:5]] + [Lease(m, None, T0 - TTL - timedelta(seconds=1)) for m in MAILBOXES[5:7]] + [
        Lease(m, None, T0 - timedelta(seconds=5)) for m in MAILBOXES[7:]]
    decided = plan("a", T0, TTL, MAILBOXES, leases, frozenset({"a", "b"}))
    assert set(decided.acquire) == set(MAILBOXES[5:7])


def test_live_replicas_are_heartbeats_and_holders_of_unexpired_leases() -> None:
    leases = [Lease("x", "c", T0 + TTL), Lease("y", "d", T0 - timedelta(seconds=1)), Lease("z", None, T0 + TTL)]
    beats = [ReplicaBeat("b", "i", T0 + TTL), ReplicaBeat("e", "i", T0)]
    assert live_replicas("a", T0, leases, beats) == frozenset({"a", "b", "c"})


def test_a_process_may_beat_as_its_id_only_when_no_other_live_process_does() -> None:
    mine = ReplicaBeat("host:7", "me", T0 + TTL)
    other = ReplicaBeat("host:7", "other", T0 + TTL)
    assert claim(None, "me", T0, gone=False) == "mine"
    assert claim(mine, "me", T0, gone=False) == "mine"
    assert claim(other, "me", T0, gone=False) == "in_use"
    assert claim(other, "me", T0, gone=True) == "take"
    assert claim(other, "me", T0 + TTL, gone=False) == "take"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["join", "leave", "crash", "pass", "enrol", "remove", "read"]), st.integers(0, 4)), min_size=5, max_size=60))
def test_whatever_replicas_come_and_go_none_takes_a_held_mailbox_or_gives_back_one_it_reads_and_quiet_passes_share_them_all(
    steps: list[tuple[str, int]],
) -> None:
    store = Store()
    enrolled = list(MAILBOXES)
    running = ["r0"]
    reading: dict[str, set[str]] = {}
    now = T0
    for action, n in steps:
        name = f"r{n}"
        if action == "join" and name not in running:
            running.append(name)
        elif action in ("leave", "crash") and name in running and len(running) > 1:
            running.remove(name)
            if action == "leave":
                store.stop(name, now)   # a crash leaves its heartbeat and its leases to expire
        elif action == "enrol":
            enrolled.append(f"extra{len(steps)}-{len(store.rows)}-{now.timestamp()}@jobcenter.dk")
        elif action == "remove" and len(enrolled) > 1:
            enrolled.pop(n % len(enrolled))
        elif action == "read" and name in running:
            reading[name] = {m for m, owner in store.holders(now).items() if owner == name and m.startswith(f"cw0{n}")}
        for replica in running:
            leases = [Lease(m, lease.owner, now + TTL, lease.epoch) if lease.owner == replica else lease for m, lease in store.rows.items()]
            decided = plan(replica, now, TTL, enrolled, leases, live_replicas(replica, now, leases, store.beats.values()), reading.get(replica, set()))
            held_by_others = {m for m, lease in store.rows.items() if lease.owner not in (None, replica) and lease.held_at(now)}
            assert not set(decided.acquire) & held_by_others
            assert not set(decided.release) & reading.get(replica, set())
            store.take_part(replica, now, enrolled, reading.get(replica, set()))
        now += TTL / 3
    reading.clear()
    now += TTL   # the crashed replicas' leases run out
    for _ in range(4):
        last = now
        for replica in running:
            store.take_part(replica, now, enrolled)
        now += TTL / 3
    holders = store.holders(last)
    assert set(enrolled) <= set(holders)
    counts = {replica: sum(1 for m in enrolled if holders.get(m) == replica) for replica in running}
    assert max(counts.values()) <= fair_share(len(enrolled), len(running)), counts

"""Pure decisions of enrolment from Planner: no I/O, no clock (decision 62 in docs/decisions.md).

Given what GetResources answered (or that it failed), the mailboxes the store knows and the operator's allow and
deny lists, ``plan_enrolment`` says which mailboxes to enrol, which to remove, and what to report:

- Every caseworker resource (``IsCaseWorker``) with a valid e-mail address is enrolled, compared lower-cased.
- A non-empty allow list limits enrolment to the addresses on it; the deny list wins over the allow list.
- An enrolled mailbox on the deny list is removed (status "denied"), whether Planner lists it or not, and its
  busy times are removed from Planner (``removal_states``).
- A mailbox an operator removed by hand (any disabled status but "denied") is not enrolled again; only one that
  enrolment removed after a deny comes back once the deny is lifted. ``plannersync mailboxes add`` enables by hand.
- An e-mail Planner lists more than once is enrolled once and reported (``duplicates``).
- A failed call or an empty answer changes nothing: no enrolment, no removal, only the report.

``address_problem`` is the one check of an address, used by the command line as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Literal, Mapping, Protocol, Sequence

from shared.domain.contracts import BusyTimeState
from shared.domain.delivery_plan import DeliveredRecord

Outcome = Literal["applied", "empty", "failed"]
_FORBIDDEN = set("<>(),;:\"[]\\")
MAX_ADDRESS = 254  # the store's and the contracts' limit


def address_problem(address: str) -> str | None:
    """Why ``address`` is not a mailbox address we can enrol, or None when it is one (local@domain.tld)."""
    text = address.strip()
    if not text:
        return "empty address"
    if len(text) > MAX_ADDRESS:
        return f"longer than {MAX_ADDRESS} characters"
    if text.count("@") != 1:
        return "needs exactly one @"
    if any(ch.isspace() for ch in text):
        return "contains white space"
    local, domain = text.split("@")
    if not local or any(ch in _FORBIDDEN for ch in text) or not text.isprintable():
        return "not an address of the form name@domain.tld (no <>(),;:\"[]\\ characters)"
    labels = domain.split(".")
    if len(labels) < 2 or not all(labels):
        return f"the domain {domain!r} is not a domain name (name@domain.tld)"
    return None


class OfferedResource(Protocol):
    """What enrolment needs of a Planner resource (``planner_client.Resource`` fits)."""

    @property
    def email(self) -> str: ...

    @property
    def is_case_worker(self) -> bool: ...


@dataclass(frozen=True)
class KnownMailbox:
    """A mailbox row of the store, as far as enrolment cares."""

    address: str
    enabled: bool
    status: str


@dataclass(frozen=True)
class EnrolmentPlan:
    """What one enrolment pass does and reports. Addresses are lower-cased; every tuple is sorted."""

    outcome: Outcome
    reason: str | None = None
    enrol: tuple[str, ...] = ()  # new, or removed after a deny that is lifted now
    remove: tuple[str, ...] = ()  # enrolled and denied: removed, busy times removed from Planner
    duplicates: tuple[str, ...] = ()  # listed more than once by Planner (enrolled once)
    invalid: tuple[str, ...] = ()  # caseworker e-mails that are not addresses (not enrolled)
    not_allowed: tuple[str, ...] = ()  # caseworkers left out by a non-empty allow list
    denied: tuple[str, ...] = ()  # caseworkers on the deny list (not enrolled)
    removed_by_hand: tuple[str, ...] = ()  # caseworkers an operator removed: left out until `mailboxes add`
    already_enrolled: int = 0
    not_case_workers: int = 0
    without_email: int = 0
    resources: int = 0
    details: dict[str, str] = field(default_factory=dict)  # invalid address -> why

    def as_dict(self) -> dict[str, Any]:
        """Counts and addresses (no appointment content exists here), for logs, health and ``--json``."""
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "resources": self.resources,
            "enrolled": list(self.enrol),
            "removed": list(self.remove),
            "duplicates": list(self.duplicates),
            "invalid": list(self.invalid),
            "not_allowed": list(self.not_allowed),
            "denied": list(self.denied),
            "removed_by_hand": list(self.removed_by_hand),
            "already_enrolled": self.already_enrolled,
            "not_case_workers": self.not_case_workers,
            "without_email": self.without_email,
        }


def plan_enrolment(
    resources: Sequence[OfferedResource] | None,
    known: Sequence[KnownMailbox],
    allow: Collection[str],
    deny: Collection[str],
    failure: str | None = None,
) -> EnrolmentPlan:
    """Decide one pass. ``resources`` None (with ``failure``, the reason) means GetResources failed."""
    if resources is None or failure is not None:
        return EnrolmentPlan("failed", reason=f"GetResources failed: {failure or 'no answer'}")
    if not resources:
        return EnrolmentPlan("empty", reason="GetResources returned no resources: nothing enrolled or removed")
    allowed = {a.strip().lower() for a in allow}
    denied_set = {a.strip().lower() for a in deny}
    by_address = {m.address.lower(): m for m in known}
    seen: dict[str, int] = {}
    not_case_workers = without_email = 0
    invalid: dict[str, str] = {}
    for resource in resources:
        if not resource.is_case_worker:
            not_case_workers += 1
            continue
        email = (resource.email or "").strip().lower()
        if not email:
            without_email += 1
            continue
        problem = address_problem(email)
        if problem is not None:
            invalid[email] = problem
            continue
        seen[email] = seen.get(email, 0) + 1
    enrol, denied, not_allowed, by_hand = [], [], [], []
    already = 0
    for email in seen:
        if email in denied_set:
            denied.append(email)
        elif allowed and email not in allowed:
            not_allowed.append(email)
        elif email not in by_address or (not by_address[email].enabled and by_address[email].status == "denied"):
            enrol.append(email)
        elif by_address[email].enabled:
            already += 1
        else:
            by_hand.append(email)
    remove = [address for address, m in by_address.items() if m.enabled and address in denied_set]
    return EnrolmentPlan(
        "applied",
        enrol=tuple(sorted(enrol)),
        remove=tuple(sorted(remove)),
        duplicates=tuple(sorted(email for email, n in seen.items() if n > 1)),
        invalid=tuple(sorted(invalid)),
        not_allowed=tuple(sorted(not_allowed)),
        denied=tuple(sorted(denied)),
        removed_by_hand=tuple(sorted(by_hand)),
        already_enrolled=already,
        not_case_workers=not_case_workers,
        without_email=without_email,
        resources=len(resources),
        details=invalid,
    )


def removal_states(mailbox: str, delivered: Mapping[str, DeliveredRecord], now_version: int, correlation_id: str) -> list[BusyTimeState]:
    """Absent states for every busy time Planner is known to hold for a denied mailbox (through the publisher).

    Cause "reconcile" and a version of at least ``now_version``: newer than anything observed before the deny, so
    a late state from before cannot bring an event back. Planner-originated events are never touched.
    """
    return [
        BusyTimeState(
            correlation_id=correlation_id,
            mailbox=mailbox.lower(),
            origin_id=record.origin_id,
            version=max(now_version, record.version),
            interval=None,
            cause="reconcile",
        )
        for record in sorted(delivered.values(), key=lambda r: r.origin_id)
        if record.present and not record.planner_originated
    ]

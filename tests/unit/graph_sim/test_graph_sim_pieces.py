"""Graph simulator pieces without HTTP: ids, event JSON, instances, delta bookkeeping, faults, the token endpoint."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from shared.domain.graph_events import series_uid_from_ical_uid
from simulators.exchange.store import Store
from simulators.graph import ids
from simulators.graph.auth import Auth, OAuthError
from simulators.graph.delta import DeltaBook, Pending, UnknownToken, changes
from simulators.graph.events import event_json, output_zone, removed_json, selected
from simulators.graph.faults import FaultBook, FaultSpecError, parse_fault
from simulators.graph.instances import instances, resolve
from tests.support.graph import write_app_certificate

MB = "anne@k.dk"
UTC_ZONE = ("UTC", None)


@pytest.fixture
def store() -> Store:
    store = Store(clock=lambda: datetime(2026, 10, 1, 8, tzinfo=UTC))
    store.add(MB, {"uid": "single-1", "subject": "Tandlæge", "body": "hemmeligt", "location": "Klinik", "start": "2026-10-19T09:00",
                   "end": "2026-10-19T10:00"})
    series = store.add(MB, {"uid": "series-1@ext", "subject": "Standup", "start": "2026-10-19T09:30", "end": "2026-10-19T09:45",
                            "recurrence": {"pattern": "daily", "count": 5}})
    store.modify_occurrence(MB, series.key, {"index": 2, "start": "2026-10-20T13:00", "end": "2026-10-20T13:30", "status": "Tentative"})
    store.delete_occurrence(MB, series.key, {"index": 3})
    store.add(MB, {"uid": "gone", "start": "2026-10-19T11:00", "folder": "deleteditems"})
    return store


def test_ids_round_trip_and_carry_their_mailbox() -> None:
    original = datetime(2026, 10, 20, 7, 30, tzinfo=UTC)
    assert ids.parse(ids.event_id(MB, 7)) == ids.EventRef(MB, 7)
    assert ids.parse(ids.instance_id(MB, 7, original)) == ids.EventRef(MB, 7, original)
    assert ids.event_id(MB, 7) != ids.event_id("bo@k.dk", 7)
    for bad in ("", "AAMkGSIM!!", "AAMkXYZ", "AAMkGSIM" + base64.urlsafe_b64encode(b"X\x1f1").decode()):
        with pytest.raises(ids.BadId):
            ids.parse(bad)


def test_instances_are_singles_and_occurrences_never_masters(store: Store) -> None:
    box = store.require(MB)
    found = instances(box, datetime(2026, 10, 19, tzinfo=UTC), datetime(2026, 10, 26, tzinfo=UTC))
    kinds = [("occ" if i.occ else "single", i.item.uid) for i in found]
    assert kinds.count(("single", "single-1")) == 1
    assert kinds.count(("occ", "series-1@ext")) == 4   # five, one deleted
    assert all(i.item.uid != "gone" for i in found)   # Deleted Items is not the calendar
    assert [i.start for i in found] == sorted(i.start for i in found)


def test_event_json_carries_content_like_graph_and_the_series_fields(store: Store) -> None:
    box = store.require(MB)
    found = instances(box, datetime(2026, 10, 19, tzinfo=UTC), datetime(2026, 10, 26, tzinfo=UTC))
    single = next(i for i in found if i.occ is None)
    exception = next(i for i in found if i.occ is not None and i.occ.is_exception)
    event = event_json(MB, single.item, None, UTC_ZONE)
    assert event["subject"] == "Tandlæge" and event["body"]["content"] == "hemmeligt" and event["location"]["displayName"] == "Klinik"
    assert event["type"] == "singleInstance" and event["seriesMasterId"] is None and "originalStart" not in event
    assert event["start"] == {"dateTime": "2026-10-19T07:00:00.0000000", "timeZone": "UTC"}
    assert series_uid_from_ical_uid(event["iCalUId"]) == "single-1"
    ex = event_json(MB, exception.item, exception.occ, UTC_ZONE)
    assert ex["type"] == "exception" and ex["showAs"] == "tentative"
    assert ex["seriesMasterId"] == ids.event_id(MB, exception.item.key)
    assert ex["originalStart"] == "2026-10-20T07:30:00Z"
    assert ex["iCalUId"][32:40] == "07EA0A14"   # instance date 2026-10-20
    assert series_uid_from_ical_uid(ex["iCalUId"]) == "series-1@ext"
    assert ex["id"] == ids.instance_id(MB, exception.item.key, exception.occ.original_start)   # type: ignore[union-attr]
    local = event_json(MB, single.item, None, output_zone("Europe/Copenhagen"))
    assert local["start"] == {"dateTime": "2026-10-19T09:00:00.0000000", "timeZone": "Europe/Copenhagen"}
    assert output_zone("Nowhere/Special") == ("UTC", None)
    assert "iCalUId" not in event_json(MB, single.item, None, UTC_ZONE, with_ical_uid=False)
    assert selected(event, ["iCalUId"]) == {"@odata.etag": event["@odata.etag"], "id": event["id"], "iCalUId": event["iCalUId"]}


def test_the_master_has_its_recurrence_and_a_zero_instance_date(store: Store) -> None:
    box = store.require(MB)
    master = next(item for item in box.items.values() if item.recurrence)
    event = event_json(MB, master, None, UTC_ZONE, master=True)
    assert event["type"] == "seriesMaster"
    assert event["recurrence"]["pattern"]["type"] == "daily" and event["recurrence"]["range"]["numberOfOccurrences"] == 5
    assert event["iCalUId"][32:40] == "00000000"


def test_resolve_refuses_deleted_occurrences_and_other_folders(store: Store) -> None:
    box = store.require(MB)
    master = next(item for item in box.items.values() if item.recurrence)
    deleted = next(iter(master.deleted))
    from simulators.exchange.store import NotFound

    with pytest.raises(NotFound):
        resolve(box, ids.EventRef(MB, master.key, deleted))
    gone = next(item for item in box.items.values() if item.uid == "gone")
    with pytest.raises(NotFound):
        resolve(box, ids.EventRef(MB, gone.key))
    assert resolve(box, ids.EventRef(MB, master.key))[1] is None


def test_delta_changes_send_new_and_changed_in_full_and_gone_as_removed() -> None:
    current = {"a": ("1", {"id": "a"}), "b": ("2", {"id": "b"}), "c": ("3", {"id": "c"})}
    entries, known = changes({}, current, removed_json)
    assert [e["id"] for e in entries] == ["a", "b", "c"] and known == {"a": "1", "b": "2", "c": "3"}
    later = {"a": ("1", {"id": "a"}), "b": ("9", {"id": "b"}), "d": ("4", {"id": "d"})}
    entries, known = changes(known, later, removed_json)
    assert entries == [{"id": "b"}, {"id": "d"}, removed_json("c")]
    assert removed_json("c")["@removed"] == {"reason": "deleted"}


def test_delta_pages_then_a_delta_token_and_unknown_tokens_are_refused() -> None:
    book = DeltaBook(limit=3)
    start, end = datetime(2026, 10, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    pending = Pending(MB, start, end, [{"id": str(n)} for n in range(5)], {"0": "x"})
    page, token, last = book.page(pending, 2)
    assert [e["id"] for e in page] == ["0", "1"] and not last
    again = book.pending(token, MB)   # a page may be asked for again (a retried nextLink)
    assert book.pending(token, MB) == again
    page, token, last = book.page(again, 2)
    page, token, last = book.page(book.pending(token, MB), 2)
    assert [e["id"] for e in page] == ["4"] and last
    assert book.round(token, MB).known == {"0": "x"}
    with pytest.raises(UnknownToken):
        book.round(token, "bo@k.dk")
    with pytest.raises(UnknownToken):
        book.round("nope", MB)
    for _ in range(4):
        book.page(Pending(MB, start, end, [], {}), 2)
    with pytest.raises(UnknownToken):   # evicted: the newest `limit` rounds are kept
        book.round(token, MB)


def test_faults_match_by_mailbox_and_endpoint_and_are_consumed() -> None:
    book = FaultBook()
    book.add(parse_fault({"kind": "throttle", "mailbox": "Anne@K.dk", "count": 1, "retry_after": 7}))
    book.add(parse_fault({"kind": "latency", "latency_ms": 5, "endpoint": "delta"}))
    assert book.take("calendarView", "bo@k.dk", ("throttle", "latency")) == []
    taken = book.take("delta", MB, ("throttle", "latency"))
    assert {f.kind for f in taken} == {"throttle", "latency"}
    assert taken[0].answer() == (429, "ApplicationThrottled") or taken[1].answer() == (429, "ApplicationThrottled")
    assert [f.kind for f in book.take("delta", MB, ("throttle", "latency"))] == ["latency"]
    assert parse_fault({"kind": "sync_state_not_found"}).endpoints == frozenset({"delta"})
    assert parse_fault({"kind": "server_error", "status": 502}).answer() == (502, "ErrorInternalServerError")
    for bad in ({"kind": "nope"}, {"kind": "throttle", "endpoint": "mail"}, {"kind": "throttle", "status": 500}):
        with pytest.raises(FaultSpecError):
            parse_fault(bad)
    book.add(parse_fault({"kind": "forbidden", "seconds": 0.01}))
    time.sleep(0.02)
    assert all(f["kind"] != "forbidden" for f in book.describe())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _assertion(key_pem: Path, cert_pem: bytes, claims: dict[str, object], alg: str = "PS256") -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    thumb = _b64(cert.fingerprint(hashes.SHA256()))
    header = _b64(json.dumps({"alg": alg, "typ": "JWT", "x5t#S256": thumb}).encode())
    payload = _b64(json.dumps(claims).encode())
    key = serialization.load_pem_private_key(key_pem.read_bytes(), None)
    pad = padding.PSS(padding.MGF1(hashes.SHA256()), 32) if alg == "PS256" else padding.PKCS1v15()
    signature = key.sign(f"{header}.{payload}".encode(), pad, hashes.SHA256())   # type: ignore[union-attr,call-arg]
    return f"{header}.{payload}.{_b64(signature)}"


def test_the_token_endpoint_checks_secrets_and_certificate_assertions(tmp_path: Path) -> None:
    auth = Auth("tenant", token_lifetime=60)
    app = write_app_certificate(tmp_path / "a")
    stranger = write_app_certificate(tmp_path / "b")
    auth.register("app", secret="s3cret", certificate_pem=app.certificate_pem)
    endpoint = "https://login.example/tenant/oauth2/v2.0/token"
    base = {"grant_type": "client_credentials", "client_id": "app", "scope": "https://graph.microsoft.com/.default"}
    token = auth.issue({**base, "client_secret": "s3cret"}, endpoint)["access_token"]
    assert auth.check(f"Bearer {token}") == "app" and auth.check("Bearer nope") is None and auth.check(None) is None
    now = int(time.time())
    good = {"aud": endpoint, "iss": "app", "sub": "app", "exp": now + 600, "nbf": now, "jti": "1"}
    for alg in ("PS256", "RS256"):
        assert auth.issue({**base, "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                           "client_assertion": _assertion(app.pem, app.certificate_pem, good, alg)}, endpoint)["token_type"] == "Bearer"
    refused = [
        ({**base, "client_secret": "wrong"}, "AADSTS7000215"),
        ({**base, "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
          "client_assertion": _assertion(stranger.pem, stranger.certificate_pem, good)}, "not registered"),
        ({**base, "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
          "client_assertion": _assertion(app.pem, app.certificate_pem, {**good, "aud": "https://elsewhere/token"})}, "AADSTS700212"),
        ({**base, "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
          "client_assertion": _assertion(app.pem, app.certificate_pem, {**good, "exp": now - 3600})}, "AADSTS700024"),
        ({**base, "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
          "client_assertion": _assertion(app.pem, app.certificate_pem, good)[:-8] + "AAAAAAAA"}, "signature"),
        ({**base, "scope": "Calendars.Read", "client_secret": "s3cret"}, "AADSTS1002012"),
        ({**base, "client_id": "other", "client_secret": "s3cret"}, "AADSTS700016"),
        ({**base, "grant_type": "password"}, "AADSTS70003"),
    ]
    for form, why in refused:
        with pytest.raises(OAuthError, match=why):
            auth.issue(form, endpoint)
    assert auth.issued == 3
    assert auth.revoke_all() == 3 and auth.check(f"Bearer {token}") is None


def test_a_store_shared_with_the_ews_simulator_is_read_the_same(store: Store) -> None:
    box = store.require(MB)
    window = (datetime(2026, 10, 19, tzinfo=UTC), datetime(2026, 10, 26, tzinfo=UTC))
    first = [event_json(MB, i.item, i.occ, UTC_ZONE)["id"] for i in instances(box, *window)]
    store.add(MB, {"uid": "new", "start": "2026-10-21T12:00"})
    second = [event_json(MB, i.item, i.occ, UTC_ZONE)["id"] for i in instances(box, *window)]
    assert set(first) < set(second) and len(second) == len(first) + 1
    assert date(2026, 10, 19) <= min(i.start for i in instances(box, *window)).date()
    assert timedelta(0) < window[1] - window[0]

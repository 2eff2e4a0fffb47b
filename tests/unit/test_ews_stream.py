"""A GetStreamingEvents answer split into SOAP envelopes a chunk at a time (decision 98 in docs/decisions.md), and its
notifications read only for what the stream needs (decision 111)."""

from __future__ import annotations

from exchangelib.properties import Notification, StatusEvent
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from shared.adapters.ews import _StreamingEvents, envelopes

DECLARATION = b"<?xml version='1.0' encoding='utf-8'?>\n"


def envelope(prefix: str, n: int) -> bytes:
    tag = f"{prefix}:Envelope" if prefix else "Envelope"
    ns = f"xmlns:{prefix}" if prefix else "xmlns"
    return (f'<{tag} {ns}="http://schemas.xmlsoap.org/soap/envelope/"><Body><m:Notification n="{n}">'
            f"<t:Id>a&gt;b</t:Id></m:Notification></Body></{tag}>").encode()


documents = st.lists(st.tuples(st.sampled_from(["s", "soap", "", "SOAP-ENV"]), st.sampled_from([b"", b"\r\n", DECLARATION, b"  \n"])),
                     min_size=1, max_size=6)


@given(documents, st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_every_envelope_comes_out_whole_however_the_chunks_split_the_stream(docs: list[tuple[str, bytes]], cuts: list[int]) -> None:
    whole = [envelope(prefix, n) for n, (prefix, _) in enumerate(docs)]
    stream = b"".join(gap + doc for (_, gap), doc in zip(docs, whole))
    at = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(at, at[1:])]
    assert list(envelopes(chunks)) == [DECLARATION + doc for doc in whole]


def test_an_envelope_is_handed_on_as_soon_as_its_end_tag_arrives_and_not_before() -> None:
    first, second = envelope("s", 1), envelope("s", 2)
    handed: list[bytes] = []

    def chunks():  # records what was handed on before each next chunk is read
        yield first[:-3]
        assert handed == []
        yield first[-3:] + second[:10]
        assert handed == [DECLARATION + first]
        yield second[10:]

    for document in envelopes(chunks()):
        handed.append(document)
    assert handed == [DECLARATION + first, DECLARATION + second]


def test_a_stream_cut_inside_an_envelope_hands_on_only_the_whole_ones() -> None:
    first, second = envelope("", 1), envelope("", 2)
    assert list(envelopes([first + second[: len(second) // 2]])) == [DECLARATION + first]


_EVENTS = ["StatusEvent", "CreatedEvent", "ModifiedEvent", "DeletedEvent", "MovedEvent", "CopiedEvent", "NewMailEvent",
           "FreeBusyChangedEvent", "SomeFutureEvent"]
_M, _T = "http://schemas.microsoft.com/exchange/services/2006/messages", "http://schemas.microsoft.com/exchange/services/2006/types"


@given(st.lists(st.sampled_from(_EVENTS), max_size=5), st.sampled_from(["sub-1", None]), st.booleans())
def test_a_notification_is_read_for_its_subscription_and_whether_it_carries_a_change_as_exchangelib_reads_it(
        events: list[str], subscription: str | None, more: bool) -> None:
    """The oracle is exchangelib's own Notification: a change is any event of it that is not a status event."""
    parts = [f"<t:SubscriptionId>{subscription}</t:SubscriptionId>" if subscription else "", "<t:PreviousWatermark>w0</t:PreviousWatermark>",
             f"<t:MoreEvents>{'true' if more else 'false'}</t:MoreEvents>"]
    parts += [f"<t:{name}><t:Watermark>w1</t:Watermark><t:TimeStamp>2026-12-03T10:00:00Z</t:TimeStamp>"
              f"<t:ItemId Id=\"i1\" ChangeKey=\"c1\"/><t:ParentFolderId Id=\"f1\" ChangeKey=\"c2\"/></t:{name}>" for name in events]
    xml = f'<m:Notification xmlns:m="{_M}" xmlns:t="{_T}">{"".join(parts)}</m:Notification>'
    theirs = Notification.from_xml(elem=etree.fromstring(xml), account=None)
    ours = _StreamingEvents._elem_to_obj(etree.fromstring(xml))
    assert ours.subscription_id == theirs.subscription_id == subscription
    assert ours.changed == any(not isinstance(event, StatusEvent) for event in theirs.events or [])   # (None when there is none)
    assert ours.changed == any(name not in ("StatusEvent", "SomeFutureEvent") for name in events)

"""A GetStreamingEvents answer split into SOAP envelopes a chunk at a time (decision 98 in docs/decisions.md)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.adapters.ews import envelopes

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

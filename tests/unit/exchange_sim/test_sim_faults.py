"""Fault scripting: matching by mailbox and operation, counts, periods, and latency combining with a fault."""

import pytest

from simulators.exchange.faults import FaultBook, FaultSpecError, parse_fault


def test_a_counted_fault_hits_only_its_mailbox_and_operation_and_then_is_gone():
    book = FaultBook()
    book.add(parse_fault({"kind": "server_busy", "mailbox": "Alice@X", "operations": ["FindItem"], "count": 2}))
    assert book.take("FindItem", "bob@x") == []
    assert book.take("GetItem", "alice@x") == []
    assert [f.kind for f in book.take("FindItem", "alice@x")] == ["server_busy"]
    assert [f.kind for f in book.take("FindItem", "alice@x")] == ["server_busy"]
    assert book.take("FindItem", "alice@x") == [] and book.describe() == []


def test_latency_comes_with_one_other_fault_and_stream_faults_only_apply_to_streams():
    book = FaultBook()
    book.add(parse_fault({"kind": "latency", "latency_ms": 10}))
    book.add(parse_fault({"kind": "mailbox_move"}))
    book.add(parse_fault({"kind": "impersonation_denied"}))
    book.add(parse_fault({"kind": "stream_cut", "count": 1}))
    assert [f.kind for f in book.take("SyncFolderItems", None, ("latency", "mailbox_move", "impersonation_denied"))] \
        == ["latency", "mailbox_move"]
    assert [f.kind for f in book.take("GetStreamingEvents", None, ("stream_cut",))] == ["stream_cut"]
    assert book.take("GetStreamingEvents", None, ("stream_cut",)) == []


def test_a_fault_with_a_period_ends_by_itself():
    book = FaultBook()
    book.add(parse_fault({"kind": "http_503", "seconds": 0}))
    assert book.take("FindItem", "a@x") == [] and book.describe() == []


@pytest.mark.parametrize("spec", [{"kind": "volcano"}, {"kind": "soap_fault"}, {"kind": "response_error"}])
def test_unknown_or_incomplete_faults_are_refused(spec):
    with pytest.raises(FaultSpecError):
        parse_fault(spec)

"""The reconciler's report table (``services.reconciler.worker.render_table``) over reports the pure planning gives.

It lives outside tests/unit/domain because ``render_table`` belongs to the reconciler's shell; the
cases and ``run`` come from the pure-core tests.
"""

from __future__ import annotations

from services.reconciler.worker import render_table
from tests.unit.domain.test_reconcile_plan import CASES, MAILBOX, run


def test_the_report_table_has_one_line_per_mailbox_with_status_counts_and_reason() -> None:
    stopped = run(CASES[11]).report
    lines = render_table([run(CASES[1]).report, stopped]).splitlines()
    assert lines[0].split()[:3] == ["mailbox", "status", "held"]
    assert lines[1].split()[:8] == [MAILBOX, "reconciled", "2", "1", "1", "0", "0", "1"]
    assert lines[2].startswith(MAILBOX) and "stopped" in lines[2] and lines[2].endswith("run with force to apply")

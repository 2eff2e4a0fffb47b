"""A Microsoft Graph simulator (Exchange Online calendars) over the EWS simulator's calendar store.

Token endpoint (certificate assertion and client secret), calendarView and its delta, events and instances,
$batch, per-mailbox faults and a /_sim/ control API; see docs/simulators/graph.md. Run: ``python -m simulators.graph``.
"""

"""The Planner simulator's /_sim control API for tests, called over the same mutual TLS as the SOAP endpoint."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import requests

from simulators.planner.server import RunningPlannerSim
from tests.support.tls import ThrowawayPKI


class SimControl:
    """Reset, inject faults, read events and calls. The session trusts only the throwaway CA (not the environment)."""

    def __init__(self, sim: RunningPlannerSim, pki: ThrowawayPKI) -> None:
        self.base = sim.control_url
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = str(pki.ca_cert)
        self.session.cert = (str(pki.client_cert), str(pki.client_key))

    def close(self) -> None:
        self.session.close()

    def post(self, path: str, body: Any = None) -> Any:
        response = self.session.post(self.base + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def get(self, path: str, **params: str) -> Any:
        response = self.session.get(self.base + path, params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        self.post("/reset")

    def fault(self, **spec: Any) -> list[dict[str, Any]]:
        return self.post("/faults", spec)["faults"]

    def clear_faults(self) -> None:
        response = self.session.delete(self.base + "/faults", timeout=10)
        response.raise_for_status()

    def faults(self) -> list[dict[str, Any]]:
        return self.get("/faults")["faults"]

    def events(self, email: str | None = None) -> list[dict[str, Any]]:
        return self.get("/events", **({"email": email} if email else {}))["events"]

    def held(self, email: str | None = None) -> dict[tuple[str, str], tuple[datetime, datetime]]:
        """What Planner holds: (e-mail lower-cased, origin id) -> (start, end) as aware datetimes."""
        return {
            (event["email"].lower(), event["origin_id"]): (datetime.fromisoformat(event["start"]), datetime.fromisoformat(event["end"]))
            for event in self.events(email)
        }

    def calls(self, operation: str | None = None) -> list[dict[str, Any]]:
        return [call for call in self.get("/calls")["calls"] if operation is None or call["operation"] == operation]

    def calls_for(self, origin_id: str) -> list[tuple[str, int | None, str]]:
        """(operation, receipt code or None, outcome) of every call that carried ``origin_id``, in order."""
        found = []
        for call in self.calls():
            if origin_id in call["origin_ids"]:
                codes = dict(zip(call["origin_ids"], call["codes"]))
                found.append((call["operation"], codes.get(origin_id), call["outcome"]))
        return found

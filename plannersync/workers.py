"""The worker registry: every name ``plannersync run`` and ``plannersync health`` accept, and how to build it.

Each entry names the service module whose ``build(settings)`` returns a ``shared.workers.Worker``. Modules are
imported only when that worker is built, so ``plannersync run transformer`` never loads exchangelib or zeep.
"""

from __future__ import annotations

import importlib
from typing import Callable, cast

from shared.config import Settings
from shared.workers import Worker

WORKERS: dict[str, str] = {
    "change-producer": "services.change_producer.worker",
    "snapshot-producer": "services.snapshot_producer.worker",
    "transformer": "services.transformer.worker",
    "publisher": "services.publisher.worker",
    "reconciler": "services.reconciler.worker",
    "status-page": "plannersync.status_page",  # the read-only status page (plannersync/status_page.py)
    "resource-sync": "services.resource_sync.worker",
}
CONSUMING_STAGES = ("transformer", "publisher")  # the workers with a work queue, retry tiers and a dead-letter queue


def build_worker(name: str, settings: Settings) -> Worker:
    """Build the named worker from the settings; nothing connects until its ``run()``."""
    if name not in WORKERS:
        raise KeyError(f"unknown worker {name!r}; choose from {', '.join(WORKERS)}")
    build = cast(Callable[[Settings], Worker], importlib.import_module(WORKERS[name]).build)
    return build(settings)

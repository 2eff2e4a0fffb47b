"""What the pipeline benchmarks share: the workers' environment and a prepared store and broker topology."""

from __future__ import annotations

import os
from pathlib import Path

from shared.adapters.store import Store, upgrade
from shared.broker.topology import Topology, ensure_policies, from_settings
from shared.config import Settings, load_settings


def worker_env(prefix: str, workdir: Path, planner_url: str, exchange_url: str, **extra: str) -> dict[str, str]:
    """The environment of ``plannersync run ...`` against the in-process simulators: this run's queues, a SQLite
    store and health directory in ``workdir``, warnings only; ``extra`` adds or overrides variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}
    env.update({
        "PLANNERSYNC_BROKER__PREFIX": prefix,
        "PLANNERSYNC_DATABASE__URL": f"sqlite:///{workdir / 'state.db'}",
        "PLANNERSYNC_PLANNER__ENDPOINT": planner_url,
        "PLANNERSYNC_EXCHANGE__ENDPOINT": exchange_url,
        "PLANNERSYNC_EXCHANGE__USERNAME": "svc",
        "PLANNERSYNC_EXCHANGE__PASSWORD": "pw",
        "PLANNERSYNC_STATUS__HEALTH_DIR": str(workdir / "health"),
        "PLANNERSYNC_LOG__LEVEL": "WARNING",
        **extra,
    })
    return env


def prepare(env: dict[str, str], mailboxes: list[str]) -> tuple[Settings, Topology]:
    """The settings the workers will load, a store at the current schema with ``mailboxes`` enrolled, and the
    broker's policies for the run's topology."""
    settings = load_settings(environ=env)
    store = Store.connect(settings.database_url())
    upgrade(store.engine)
    for mailbox in mailboxes:
        store.add_mailbox(mailbox)
    store.engine.dispose()
    topology = from_settings(settings.broker, settings.retry)
    ensure_policies(topology, settings.broker.management_url, settings.broker.user, settings.broker.password.get_secret_value())
    return settings, topology

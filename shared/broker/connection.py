"""The one way plannersync opens a connection to RabbitMQ: heartbeat and blocked-connection timeout always set.

A heartbeat of 0 would let a dead TCP connection look alive for hours, and without a blocked-connection
timeout a publisher stuck behind a memory alarm waits forever; both come from ``BrokerSettings``
(decision 15 in docs/decisions.md). The connection name shows in the management UI's Connections tab.
"""

from __future__ import annotations

import pika

from shared.config import BrokerSettings


def connection_parameters(broker: BrokerSettings, name: str) -> pika.URLParameters:
    params = pika.URLParameters(broker.amqp_url())
    params.heartbeat = broker.heartbeat
    params.blocked_connection_timeout = broker.blocked_connection_timeout.total_seconds()
    params.client_properties = {"connection_name": f"{broker.prefix}.{name}"}
    return params


def open_connection(broker: BrokerSettings, name: str) -> pika.BlockingConnection:
    """A blocking connection named ``<prefix>.<name>``."""
    return pika.BlockingConnection(connection_parameters(broker, name))

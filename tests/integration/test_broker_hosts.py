"""Several broker nodes in ``PLANNERSYNC_BROKER__HOSTS``: the first that accepts is used (decision 80 in docs/decisions.md)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from shared.broker.connection import BrokerRefused, BrokerUnreachable, open_connection
from tests.support.rabbitmq_node import free_port
from tests.support.settings import settings_from_env


def test_a_node_that_is_down_is_skipped_and_the_next_one_is_used(broker: str) -> None:
    down = free_port()  # nothing listens there
    settings = settings_from_env({"PLANNERSYNC_BROKER__HOSTS": f"127.0.0.1:{down},{broker}:5672"})
    with capture_logs() as logs:
        connection = open_connection(settings.broker, "hosts-test")
    try:
        assert connection.is_open
    finally:
        connection.close()
    assert [(e["event"], e["node"], e["nodes_down"]) for e in logs if e["event"] == "broker_connected"] == [("broker_connected", f"{broker}:5672", 1)]


def test_when_no_node_answers_each_is_named_with_the_setting_to_check() -> None:
    first, second = free_port(), free_port()
    settings = settings_from_env({"PLANNERSYNC_BROKER__HOSTS": f"127.0.0.1:{first},127.0.0.1:{second}"})
    with pytest.raises(BrokerUnreachable) as caught:
        open_connection(settings.broker, "hosts-test")
    message = str(caught.value)
    assert f"127.0.0.1:{first} connection refused" in message and f"127.0.0.1:{second} connection refused" in message
    assert message.endswith("(PLANNERSYNC_BROKER__HOSTS)")


def test_a_refused_password_is_reported_at_once_not_tried_on_the_next_node(broker: str) -> None:
    settings = settings_from_env({"PLANNERSYNC_BROKER__HOSTS": f"{broker}:5672,127.0.0.1:{free_port()}", "PLANNERSYNC_BROKER__PASSWORD": "wrong"})
    with pytest.raises(BrokerRefused, match="wrong user or password"):
        open_connection(settings.broker, "hosts-test")

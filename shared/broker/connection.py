"""The one way plannersync opens a connection to RabbitMQ: heartbeat and blocked-connection timeout always set.

A heartbeat of 0 would let a dead TCP connection look alive for hours, and without a blocked-connection
timeout a publisher stuck behind a memory alarm waits forever; both come from ``BrokerSettings``
(decision 15 in docs/decisions.md). The connection name shows in the management UI's Connections tab.

With ``tls`` the connection is AMQP over TLS (amqps): the broker's certificate is verified against the
configured CA bundle (else the system store) and its host name, and a client certificate is presented when
one is configured (decision 46 in docs/decisions.md).

A connection that cannot be opened raises ``BrokerUnreachable`` or ``BrokerRefused``: subclasses of pika's
``AMQPConnectionError`` (so every reconnect loop still catches them) whose text is one line for the operator,
naming where the broker was looked for and which setting to check (decision 44 in docs/decisions.md).

With ``hosts`` (the nodes of a cluster) the nodes are tried one after the other in the configured order, each
with its own parameters (its own TLS server name); the first that accepts is used and logged as
``broker_connected`` with the node, and only when none does is ``BrokerUnreachable`` raised, naming each node's
failure. A refused user or virtual host is raised at once: users and permissions are the same on every node
of a cluster (decision 80 in docs/decisions.md).
"""

from __future__ import annotations

import socket
import ssl

import pika
import pika.exceptions

from shared.config import BrokerSettings
from shared.logs import get_logger

log = get_logger(__name__)


class BrokerUnavailable(pika.exceptions.AMQPConnectionError):  # type: ignore[misc]  # pika is untyped
    """No connection to the broker; ``str()`` is one line for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BrokerUnreachable(BrokerUnavailable):
    """Nothing answered as a broker at host:port (refused, unknown host, timeout, TLS failure)."""


class BrokerRefused(BrokerUnavailable):
    """The broker answered but refused the user or the virtual host."""


def tls_context(broker: BrokerSettings) -> ssl.SSLContext:
    """Verify the broker against ``ca_bundle`` (else the system store); present the client certificate if configured."""
    context = ssl.create_default_context(cafile=str(broker.ca_bundle)) if broker.ca_bundle is not None else ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if broker.client_cert is not None and broker.client_key is not None:
        context.load_cert_chain(str(broker.client_cert), str(broker.client_key))
    return context


def connection_parameters(broker: BrokerSettings, name: str, address: tuple[str, int] | None = None) -> pika.URLParameters:
    """The parameters for one node (default: the first configured)."""
    address = address or broker.addresses()[0]
    params = pika.URLParameters(broker.amqp_url(address))
    params.heartbeat = broker.heartbeat
    params.blocked_connection_timeout = broker.blocked_connection_timeout.total_seconds()
    params.client_properties = {"connection_name": f"{broker.prefix}.{name}"}
    if broker.tls:
        params.ssl_options = pika.SSLOptions(tls_context(broker), server_hostname=address[0])
    return params


def open_connection(broker: BrokerSettings, name: str) -> pika.BlockingConnection:
    """A blocking connection named ``<prefix>.<name>`` to the first node that accepts; ``BrokerUnreachable``/``BrokerRefused`` when there is none.

    The nodes are tried here one by one rather than by handing pika the sequence: pika starts its whole cycle
    over when a host name does not resolve, so a node with an unknown name would hide the others.
    """
    addresses = broker.addresses()
    where = broker.where()
    failures: list[str] = []
    for address in addresses:
        try:
            connection = pika.BlockingConnection(connection_parameters(broker, name, address))
        except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError):
            raise BrokerRefused(
                f"the broker at {where} refused user {broker.user!r}: wrong user or password (PLANNERSYNC_BROKER__USER, PLANNERSYNC_BROKER__PASSWORD)"
            ) from None
        except pika.exceptions.ProbableAccessDeniedError:
            raise BrokerRefused(
                f"the broker at {where} refused user {broker.user!r} access to virtual host {broker.vhost!r} "
                "(PLANNERSYNC_BROKER__VHOST, or the user's permissions)"
            ) from None
        except (pika.exceptions.AMQPConnectionError, ssl.SSLError, OSError) as exc:  # OSError: an unknown host name (socket.gaierror), no route, ...
            if len(addresses) == 1:
                raise BrokerUnreachable(_unreachable(broker, where, exc)) from exc
            failures.append(f"{address[0]}:{address[1]} {_why(exc)}")
            continue
        if len(addresses) > 1:
            log.info("broker_connected", connection=f"{broker.prefix}.{name}", node=f"{address[0]}:{address[1]}", nodes_down=len(failures))
        return connection
    raise BrokerUnreachable(f"cannot reach any broker node of {where}: {'; '.join(failures)} ({broker.address_settings()})")


def _unreachable(broker: BrokerSettings, where: str, exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS with the broker at {where} failed: {_why(exc)} (PLANNERSYNC_BROKER__CA_BUNDLE, {broker.address_settings().split(',')[0]})"
    return f"cannot reach the broker at {where}: {_why(exc)} ({broker.address_settings()})"


def _why(exc: BaseException) -> str:
    """The innermost cause pika wrapped, in a few words."""
    for arg in (*getattr(exc, "args", ()), getattr(exc, "exception", None)):  # pika's connectors keep the cause in .exception
        if isinstance(arg, BaseException):
            return _why(arg)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    if isinstance(exc, socket.gaierror):
        return "unknown host name"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip()
    return text or type(exc).__name__


def explain_broker_error(exc: BaseException) -> str | None:
    """One line for a broker failure in the middle of a command (the command line's messages; decision 44), else None."""
    if isinstance(exc, BrokerUnavailable):
        return str(exc)
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        if exc.reply_code == 404:
            return f"the broker has no such object: {exc.reply_text} (run `plannersync topology apply`, or check PLANNERSYNC_BROKER__PREFIX)"
        if exc.reply_code == 403:
            return f"the broker refused: {exc.reply_text} (the user's permissions)"
        return f"the broker closed the channel: ({exc.reply_code}) {exc.reply_text}"
    if isinstance(exc, pika.exceptions.AMQPConnectionError):
        return f"lost the connection to the broker: {_why(exc)}"
    return None

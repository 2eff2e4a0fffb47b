"""A second, throwaway RabbitMQ node for tests that must not touch the shared one: its own name, ports and data.

It listens for AMQP over TLS only (mutual TLS with the test PKI), serves the management API on a port of its own,
and loads definitions at boot the way compose does (``definitions.import_backend = local_filesystem``). It is
started with the installed ``rabbitmq-server`` (Debian's 3.10 here) in a new session and stopped at the end by
the process id it was started with; the shared node (``rabbit@localhost``) is never touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class TlsNode:
    directory: Path
    tls_port: int
    management_port: int
    process: subprocess.Popen[bytes]

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def log(self) -> str:
        logs = sorted((self.directory / "log").glob("*.log"))
        return "\n".join(path.read_text(errors="replace")[-4000:] for path in logs)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM the node this test started (its own session), then wait; SIGKILL only if it does not stop."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def start_tls_node(directory: Path, ca: Path, cert: Path, key: Path, definitions: Path, user: str, password: str, boot_timeout: float = 60) -> TlsNode:
    """Start the node; return once ``user`` can use its management API (so the definitions were imported)."""
    if not RABBITMQ_SERVER.exists():  # pragma: no cover - environment problem, reported loudly
        raise RuntimeError(f"{RABBITMQ_SERVER} is not installed; the TLS broker tests need RabbitMQ (apt-get install rabbitmq-server)")
    directory.mkdir(parents=True, exist_ok=True)
    tls_port, management_port, dist_port = free_port(), free_port(), free_port()
    (directory / "rabbitmq.conf").write_text(
        "\n".join(
            [
                "listeners.tcp = none",
                f"listeners.ssl.default = 127.0.0.1:{tls_port}",
                f"ssl_options.cacertfile = {ca}",
                f"ssl_options.certfile = {cert}",
                f"ssl_options.keyfile = {key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
                f"management.tcp.port = {management_port}",
                "management.tcp.ip = 127.0.0.1",
                "definitions.import_backend = local_filesystem",
                f"definitions.local.path = {definitions}",
                "definitions.skip_if_unchanged = true",
                "",
            ]
        )
    )
    (directory / "enabled_plugins").write_text("[rabbitmq_management].\n")
    (directory / "rabbitmq-env.conf").write_text("")  # not the system's (which names the shared node)
    env = {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": os.environ.get("HOME", "/root"),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        "RABBITMQ_NODENAME": f"pstest{uuid.uuid4().hex[:8]}@localhost",
        "RABBITMQ_NODE_PORT": str(free_port()),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(directory / "rabbitmq.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    output = (directory / "server.out").open("wb")
    process = subprocess.Popen([str(RABBITMQ_SERVER)], env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    node = TlsNode(directory, tls_port, management_port, process)
    deadline = time.monotonic() + boot_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the test RabbitMQ node exited ({process.returncode}):\n{(directory / 'server.out').read_text(errors='replace')[-3000:]}\n{node.log()}")
        try:
            if requests.get(f"{node.management_url}/api/whoami", auth=(user, password), timeout=2).status_code == 200:
                return node
        except requests.RequestException:
            pass
        time.sleep(0.3)  # the poll interval of this boot deadline
    node.stop()
    raise RuntimeError(f"the test RabbitMQ node did not come up in {boot_timeout} s:\n{node.log()}")

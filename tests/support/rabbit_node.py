"""A RabbitMQ node of the fault suite's own (plain AMQP and the management API on free ports, data in a temp dir),
so the ``--soak`` variants can restart a broker without touching the shared one (``rabbit@localhost``).

Started with the installed ``rabbitmq-server`` in a new session (as ``tests/support/rabbitmq_node.py`` does for the
TLS node); ``restart()`` stops it by the process group it started and starts it again on the same ports and data,
so durable queues and their messages survive as they would on a production restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.support.rabbitmq_node import RABBITMQ_SERVER, free_port


@dataclass
class OwnNode:
    directory: Path
    amqp_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"psfault{uuid.uuid4().hex[:8]}@localhost")
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def start(self, boot_timeout: float = 90) -> OwnNode:
        if not RABBITMQ_SERVER.exists():  # pragma: no cover - environment problem, reported loudly
            raise RuntimeError(f"{RABBITMQ_SERVER} is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\nmanagement.tcp.port = {self.management_port}\n"
            "management.tcp.ip = 127.0.0.1\nloopback_users.guest = true\n"
        )
        (self.directory / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")
        env = {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": os.environ.get("HOME", "/root"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.directory / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        output = (self.directory / "server.out").open("ab")
        self.process = subprocess.Popen([str(RABBITMQ_SERVER)], env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + boot_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the suite's RabbitMQ node exited ({self.process.returncode}):\n{(self.directory / 'server.out').read_text(errors='replace')[-3000:]}")
            try:
                if requests.get(f"{self.management_url}/api/overview", auth=("guest", "guest"), timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)  # the poll interval of this boot deadline
        self.stop()
        raise RuntimeError(f"the suite's RabbitMQ node did not come up in {boot_timeout} s")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM the node's own process group (never any other node), SIGKILL only if it does not stop."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

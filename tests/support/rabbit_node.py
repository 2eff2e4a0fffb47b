"""A RabbitMQ node of the fault suite's own (plain AMQP and the management API on free ports, data in a temp dir),
so the ``--soak`` variants can restart a broker without touching the shared one (``rabbit@localhost``).

Started with the installed ``rabbitmq-server`` in a new session (as ``tests/support/rabbitmq_node.py`` does for the
TLS node); ``restart()`` stops it by the process group it started and starts it again on the same ports and data,
so durable queues and their messages survive as they would on a production restart.

:class:`Cluster` starts three such nodes (their own names, ports, data and Erlang cookie) and joins them into one
RabbitMQ cluster with ``rabbitmqctl join_cluster``, for ``tests/e2e/test_cluster.py``; ``kill(node)`` ends one
with SIGKILL (a crash, not a shutdown) and ``start()`` on that node brings it back into the cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.support.rabbitmq_node import RABBITMQ_SERVER, free_port

RABBITMQCTL = RABBITMQ_SERVER.with_name("rabbitmqctl")


@dataclass
class OwnNode:
    directory: Path
    amqp_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"psfault{uuid.uuid4().hex[:8]}@localhost")
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    home: Path | None = None  # HOME of the node and its rabbitmqctl: where the Erlang cookie is (default: the caller's)

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def amqp_address(self) -> str:
        return f"127.0.0.1:{self.amqp_port}"

    def start(self, boot_timeout: float = 90) -> OwnNode:
        self.launch()
        return self.wait_until_up(boot_timeout)

    def environment(self) -> dict[str, str]:
        """The node's environment (also what ``rabbitmqctl`` needs to reach it: the same HOME, so the same cookie)."""
        return {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.home) if self.home is not None else os.environ.get("HOME", "/root"),
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

    def launch(self) -> None:
        """Start the server and return at once (``wait_until_up`` waits for it)."""
        if not RABBITMQ_SERVER.exists():  # pragma: no cover - environment problem, reported loudly
            raise RuntimeError(f"{RABBITMQ_SERVER} is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\nmanagement.tcp.port = {self.management_port}\n"
            "management.tcp.ip = 127.0.0.1\nloopback_users.guest = true\n"
        )
        (self.directory / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")
        output = (self.directory / "server.out").open("ab")
        self.process = subprocess.Popen([str(RABBITMQ_SERVER)], env=self.environment(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_up(self, boot_timeout: float = 90) -> OwnNode:
        """Return once the management API answers; stop the node and raise if it does not in ``boot_timeout``."""
        assert self.process is not None
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

    def kill(self) -> None:
        """SIGKILL the node's own process group: a crash (no goodbye to its peers or clients)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n <this node> <args>``; raise with its output if it fails."""
        done = subprocess.run([str(RABBITMQCTL), "-n", self.name, *args], env=self.environment(), capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.name} failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return done.stdout


@dataclass
class Cluster:
    """Three nodes of our own joined into one cluster (the first is the seed the others join)."""

    directory: Path
    size: int = 3
    nodes: list[OwnNode] = field(default_factory=list)

    def start(self, boot_timeout: float = 120) -> Cluster:
        home = self.directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        tag = uuid.uuid4().hex[:6]
        self.nodes = [OwnNode(self.directory / f"node{n}", name=f"pscluster{tag}n{n}@localhost", home=home) for n in range(1, self.size + 1)]
        try:
            for node in self.nodes:  # boot side by side: each takes seconds
                node.launch()
            with ThreadPoolExecutor(self.size) as pool:
                list(pool.map(lambda node: node.wait_until_up(boot_timeout), self.nodes))
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", seed.name)
                node.ctl("start_app")
            running = seed.ctl("eval", "length(rabbit_nodes:all_running()).").strip()
            if running != str(self.size):
                raise RuntimeError(f"the cluster has {running} running nodes, not {self.size}: {seed.ctl('cluster_status')}")
        except BaseException:
            self.stop()
            raise
        return self

    def hosts(self) -> str:
        """Every node's AMQP address, as PLANNERSYNC_BROKER__HOSTS takes them."""
        return ",".join(node.amqp_address for node in self.nodes)

    def node_at(self, amqp_port: int) -> OwnNode:
        return next(node for node in self.nodes if node.amqp_port == amqp_port)

    def up(self) -> list[OwnNode]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM every node at once, then wait (a cluster stopped one by one waits on each in turn); SIGKILL a
        node that has not stopped by the deadline."""
        running = self.up()
        for node in running:
            assert node.process is not None
            os.killpg(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill()

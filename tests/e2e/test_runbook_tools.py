"""The runbooks' rabbitmqctl, rabbitmq-queues, curl, nc, openssl and secret-file lines, run for real here.

Which lines these are comes from ``tests/support/runbooks.py`` (their kind), so a line added to a runbook is run
here without a change to this file. Each line runs with ``bash`` as written, after these mechanical substitutions
(decision 73 in docs/decisions.md), and nothing else:

- ``BROKER_STAND_INS``: a command the runbook runs inside the broker's container (``docker compose exec rabbitmq``)
  runs on this host, where the broker is; the broker user ``plannersync`` (the word alone) and the operator
  ``ops-anne`` become users of this test's own, the vhost ``/`` (``-p /``) a vhost of this test's own, so nothing
  shared changes; both users and the vhost are deleted at the end.
- ``CLUSTER_STAND_INS``: ``rabbit@rmq1`` is the first of two throwaway nodes; the lines run with the second
  node's environment (``RABBITMQ_NODENAME``, its ``HOME`` with the shared Erlang cookie, RabbitMQ's own ``bin`` first
  on ``PATH``), as on the second host.
- ``NETWORK_STAND_INS``: each outside host is a local stand-in: STAR's gateway the Planner simulator (mutual TLS),
  the on-premises EWS the EWS simulator, Entra ID's and Graph's hosts the Graph simulator (all over TLS with a
  throwaway CA that curl trusts through ``CURL_CA_BUNDLE``), and the remote RabbitMQ's TLS port the local broker.
- ``HOST_PATHS``: the host's directories (``/etc/plannersync``) live under the test's temporary directory, which
  is also the working directory (its ``deploy/secrets/`` stands for the checkout's).
- A prompt for a secret (``read -rsp``) gets it on standard input; ``openssl req``'s passphrase prompt gets
  ``-passout file:…`` (a terminal prompt cannot be answered otherwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pika
import pytest
import requests

from shared.adapters.graph import client_credential
from shared.config import load_settings
from tests.support.broker import MANAGEMENT
from tests.support.processes import PLANNERSYNC
from tests.support.rabbit_node import OwnNode
from tests.support.rabbitmq_node import RABBITMQ_SERVER
from tests.support.runbooks import Line, lines_of
from tests.support.tls import ThrowawayPKI

RABBITMQCTL = shutil.which("rabbitmqctl") or "rabbitmqctl"  # the wrapper on PATH that reaches the local node, as an operator's does
SECRET = "S3cret-æøå with spaces"  # what an operator types at a prompt


def run_line(text: str, *, cwd: Path, env: dict[str, str] | None = None, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-o", "pipefail", "-c", text], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def substituted(text: str, table: dict[str, str], regexes: dict[str, str] | None = None) -> str:
    for pattern, replacement in (regexes or {}).items():
        text = re.sub(pattern, replacement, text)
    for written, here in table.items():
        text = text.replace(written, here)
    return text


def failure(line: Line, text: str, done: subprocess.CompletedProcess[str]) -> str:
    return f"{line.where}: {text}\nexit {done.returncode}\n{done.stdout[-1000:]}{done.stderr[-1500:]}"


# --- rabbitmqctl against the local broker, in a vhost and users of the test's own ---------------------------------


@pytest.fixture
def own_vhost(broker: str) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    names = {"vhost": f"ps-runbook-{tag}", "user": f"ps-runbook-{tag}", "operator": f"ps-runbook-{tag}-ops"}
    subprocess.run([RABBITMQCTL, "add_vhost", names["vhost"]], check=True, capture_output=True, timeout=60)
    yield names
    for user in (names["user"], names["operator"]):
        subprocess.run([RABBITMQCTL, "delete_user", user], capture_output=True, timeout=60)
    subprocess.run([RABBITMQCTL, "delete_vhost", names["vhost"]], capture_output=True, timeout=60)


def broker_stand_ins(names: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(plain substitutions, regex substitutions) of BROKER_STAND_INS for this test's names."""
    plain = {"docker compose exec rabbitmq ": "", "/etc/plannersync/": f"{tmp_path}/etc/plannersync/"}
    regexes = {r"(?<=\s)plannersync(?=\s|$)": names["user"], r"(?<=\s)ops-anne(?=\s|$)": names["operator"], r"(?<=\s)-p / ": f"-p {names['vhost']} "}
    return plain, regexes


def whoami(user: str, password: str) -> requests.Response:
    return requests.get(f"{MANAGEMENT}/api/whoami", auth=(user, password), timeout=10)


def test_the_broker_user_lines_give_plannersync_exactly_what_topology_apply_needs_and_the_operator_a_login(own_vhost: dict[str, str], tmp_path: Path) -> None:
    """install.md's user (add_user, policymaker, permissions on plannersync.*) runs `plannersync topology apply`
    (queues, exchanges and the policies through the management API) and can touch nothing else; broker.md's
    operator logs in as an administrator; broker.md's change_password takes the new password from the secret."""
    (tmp_path / "etc/plannersync/secrets").mkdir(parents=True)
    (tmp_path / "etc/plannersync/secrets/amqp_password").write_text("first-password-1\n")
    (tmp_path / "deploy/secrets").mkdir(parents=True)
    (tmp_path / "deploy/secrets/amqp_password.txt").write_text("second-password-2\n")
    lines = sorted(lines_of("broker"), key=lambda line: line.runbook != "install.md")  # the user exists before its password changes
    assert len(lines) >= 7, lines
    plain, regexes = broker_stand_ins(own_vhost, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANNERSYNC_")}
    user_env = {**env, "PLANNERSYNC_BROKER__USER": own_vhost["user"], "PLANNERSYNC_BROKER__VHOST": own_vhost["vhost"],
                "PLANNERSYNC_BROKER__PASSWORD_FILE": str(tmp_path / "etc/plannersync/secrets/amqp_password"),
                "PLANNERSYNC_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
    failed = []
    for line in lines:
        if line.runbook == "broker.md" and "change_password" in line.text:
            applied = subprocess.run([PLANNERSYNC, "topology", "apply"], env=user_env, capture_output=True, text=True, timeout=120)  # install.md's next step
            assert applied.returncode == 0, applied.stderr[-2000:]
        text = substituted(line.text, plain, regexes)
        done = run_line(text, cwd=tmp_path, stdin="operator-password-3\n")
        if done.returncode != 0:
            failed.append(failure(line, text, done))
    assert not failed, "\n\n".join(failed)

    queues = requests.get(f"{MANAGEMENT}/api/queues/{own_vhost['vhost']}", auth=("guest", "guest"), timeout=10).json()
    policies = requests.get(f"{MANAGEMENT}/api/policies/{own_vhost['vhost']}", auth=("guest", "guest"), timeout=10).json()
    assert "plannersync.publisher.in" in {q["name"] for q in queues} and policies, (queues, policies)  # topology apply did its work as that user
    assert whoami(own_vhost["user"], "second-password-2").status_code == 200  # the password of deploy/secrets now
    assert whoami(own_vhost["user"], "first-password-1").status_code == 401
    operator = whoami(own_vhost["operator"], "operator-password-3")
    assert operator.status_code == 200 and "administrator" in str(operator.json()["tags"])
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", virtual_host=own_vhost["vhost"], credentials=pika.PlainCredentials(own_vhost["user"], "second-password-2")))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
            connection.channel().queue_declare("someone-else.in")  # the permissions end at the plannersync prefix
    finally:
        if connection.is_open:
            connection.close()


# --- the cluster lines, on two throwaway nodes -----------------------------------------------------------------------


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[OwnNode, OwnNode]]:
    home = tmp_path / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(uuid.uuid4().hex.upper())
    cookie.chmod(0o400)
    tag = uuid.uuid4().hex[:6]
    nodes = (OwnNode(tmp_path / "rmq1", name=f"psrunbook{tag}a@localhost", home=home), OwnNode(tmp_path / "rmq2", name=f"psrunbook{tag}b@localhost", home=home))
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_until_up(120)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_the_cluster_lines_join_a_second_node_and_the_quorum_queues_get_a_member_on_each(two_nodes: tuple[OwnNode, OwnNode], tmp_path: Path) -> None:
    """broker.md's cluster section, from its first rabbitmqctl line to its last command, run on the second node
    (its environment names it) with `rabbit@rmq1` the first node; `plannersync topology apply` talks to the first."""
    first, second = two_nodes
    cluster = lines_of("cluster")
    assert [line.runbook for line in cluster] == ["broker.md"] * len(cluster) and len(cluster) >= 5, cluster
    start, end = int(cluster[0].where.split(":")[1]), int(cluster[-1].where.split(":")[1])
    from tests.support.runbooks import command_lines

    section = [line for line in command_lines() if line.runbook == "broker.md" and start <= int(line.where.split(":")[1]) <= end]
    # RabbitMQ's own bin directory first: Debian's wrapper in /usr/sbin would switch to the system node's user and cookie
    env = {**second.environment(), "PATH": f"{RABBITMQ_SERVER.parent}:{Path(PLANNERSYNC).parent}:{os.environ['PATH']}",
           "PLANNERSYNC_BROKER__HOST": "127.0.0.1", "PLANNERSYNC_BROKER__PORT": str(first.amqp_port), "PLANNERSYNC_BROKER__MANAGEMENT_URL": first.management_url,
           "PLANNERSYNC_STATE_DIR": str(tmp_path / "state")}
    outputs = {}
    for line in section:
        text = line.text.replace("rabbit@rmq1", first.name)
        done = run_line(text, cwd=tmp_path, env=env, timeout=180)
        assert done.returncode == 0, failure(line, text, done)
        outputs[line.text.split("#")[0].strip()] = done.stdout
    status = next(out for text, out in outputs.items() if "cluster_status" in text)
    members = next(out for text, out in outputs.items() if "quorum_status" in text)
    for node in (first, second):
        assert node.name in status.split("Running Nodes")[1].split("Versions")[0], status  # both run in one cluster
        assert node.name in members, members  # the work queue has a member on each


# --- curl, nc and openssl s_client against local stand-ins of the outside hosts --------------------------------------


@pytest.fixture
def stand_ins(pki: ThrowawayPKI) -> Iterator[dict[str, int]]:
    from simulators.exchange.server import start_server as exchange_sim
    from simulators.graph.server import start_server as graph_sim
    from simulators.planner.server import SimTLS
    from simulators.planner.server import start_server as planner_sim

    planner = planner_sim(tls=SimTLS(pki.server_cert, pki.server_key, pki.ca_cert))  # mutual TLS, as STAR's gateway
    ews = exchange_sim(tls=(str(pki.server_cert), str(pki.server_key)))
    graph = graph_sim(tls=(str(pki.server_cert), str(pki.server_key)))
    try:
        yield {"planner": int(planner.url.split(":")[2].split("/")[0]), "ews": ews.port, "graph": int(graph.url.split(":")[2].split("/")[0])}
    finally:
        for sim in (planner, ews, graph):
            sim.stop()


def network_stand_ins(ports: dict[str, int]) -> dict[str, str]:
    """NETWORK_STAND_INS: each outside host of runbooks/network.md and the local server that stands for it."""
    return {
        "service.bm.dk:443": f"localhost:{ports['planner']}",  # STAR's gateway: the Planner simulator, mutual TLS
        "-servername service.bm.dk": "-servername localhost",
        "https://mail.kommune.local/": f"https://localhost:{ports['ews']}/",  # the on-premises EWS: the EWS simulator
        "https://login.microsoftonline.com/": f"https://localhost:{ports['graph']}/",  # Entra ID's token endpoint and
        "https://graph.microsoft.com/": f"https://localhost:{ports['graph']}/",  # Graph: the Graph simulator
        "rabbitmq.kommune.local 5671": "127.0.0.1 5672",  # the broker's port: the local broker's
    }


OUTSIDE_HOST = re.compile(r"\b[a-z0-9-]+(\.[a-z0-9-]+)*\.(local|dk|com|net|org)\b")


def test_the_network_checks_answer_through_an_open_way_and_fail_through_a_closed_one(stand_ins: dict[str, int], pki: ThrowawayPKI, broker: str, tmp_path: Path) -> None:
    lines = lines_of("network")
    assert {line.text.split()[0] for line in lines} >= {"curl", "nc", "openssl"}, lines
    env = {**os.environ, "CURL_CA_BUNDLE": str(pki.ca_cert)}
    table = network_stand_ins(stand_ins)
    closed = {name: port for name, port in network_stand_ins({"planner": 9, "ews": 9, "graph": 9}).items()}  # port 9 (discard): nobody listens
    closed["rabbitmq.kommune.local 5671"] = "127.0.0.1 9"
    failed = []
    for line in lines:
        text = substituted(line.text, table)
        assert not OUTSIDE_HOST.search(text), f"{line.where}: {OUTSIDE_HOST.search(text)} has no stand-in in NETWORK_STAND_INS"
        done = run_line(text, cwd=tmp_path, env=env, timeout=60)
        answered = {"curl": lambda d: re.fullmatch(r"[1-5]\d\d", d.stdout.strip()) is not None, "nc": lambda d: "succeeded" in d.stderr + d.stdout,
                    "openssl": lambda d: "CONNECTION ESTABLISHED" in d.stderr + d.stdout}[text.split()[0]]
        # STAR's gateway asks for the OCES certificate and may end the handshake with an alert after it was established:
        # s_client's exit status then depends on timing, so its line is read by what it prints (as network.md says)
        if (done.returncode != 0 and not text.startswith("openssl")) or not answered(done):
            failed.append(failure(line, text, done))
        if "EWS" in line.text:
            assert done.stdout.strip() == "401", failure(line, text, done)  # "EWS answers 401 to an anonymous request"
        shut = run_line(substituted(line.text, closed), cwd=tmp_path, env=env, timeout=60)
        assert not answered(shut) and (shut.returncode != 0 or text.startswith("openssl")), failure(line, substituted(line.text, closed), shut)  # the check can fail
    assert not failed, "\n\n".join(failed)


# --- the Graph certificate recipe and the secret files -------------------------------------------------------------


def test_the_graph_certificate_recipe_makes_a_file_the_graph_reader_loads(tmp_path: Path) -> None:
    """graph.md's openssl req / cat / chmod / cp lines; the passphrase prompt answered by -passout file:."""
    lines = lines_of("graph-certificate")
    assert len(lines) >= 4, lines
    (tmp_path / "deploy/secrets").mkdir(parents=True)
    passphrase = tmp_path / "graph_passphrase.txt"
    passphrase.write_text(SECRET + "\n")
    for line in lines:
        text = line.text.replace("openssl req ", f"openssl req -passout file:{passphrase} ", 1)
        done = run_line(text, cwd=tmp_path)
        assert done.returncode == 0, failure(line, text, done)
    pem = tmp_path / "deploy/secrets/graph_app.pem"
    assert pem.stat().st_mode & 0o777 == 0o600
    settings = load_settings(environ={"PLANNERSYNC_GRAPH__TENANT_ID": "kommune.onmicrosoft.com", "PLANNERSYNC_GRAPH__CLIENT_ID": "6a2b7c1e-4d3f-4e5a-9b8c-0d1e2f3a4b5c",
                                      "PLANNERSYNC_GRAPH__CLIENT_CERTIFICATE": str(pem), "PLANNERSYNC_GRAPH__CLIENT_CERTIFICATE_PASSPHRASE_FILE": str(passphrase)})
    credential = client_credential(settings.graph)
    assert isinstance(credential, dict) and "ENCRYPTED PRIVATE KEY" in credential["private_key"] and credential["public_certificate"].startswith("-----BEGIN CERTIFICATE-----")


def test_the_secret_file_lines_write_what_was_typed_readable_by_the_owner_or_group_only(tmp_path: Path) -> None:
    lines = lines_of("secret-files")
    assert len(lines) >= 6, lines
    (tmp_path / "deploy/secrets").mkdir(parents=True)
    (tmp_path / "etc/plannersync/secrets").mkdir(parents=True)
    for line in lines:
        text = line.text.replace("/etc/plannersync/", f"{tmp_path}/etc/plannersync/")
        written = Path(re.findall(r">\s*(\S+?)\s*\)?\s*(?:#.*)?$", text)[0])
        written = written if written.is_absolute() else tmp_path / written
        written.parent.mkdir(parents=True, exist_ok=True)  # as the runbook's steps before it leave it
        done = run_line(text, cwd=tmp_path, stdin=SECRET + "\n")
        assert done.returncode == 0, failure(line, text, done)
        content = written.read_text()
        if "read -rsp" in text:
            assert content == SECRET + "\n", (line.where, content)
            umask = int(re.search(r"umask (\d+)", text).group(1), 8)  # type: ignore[union-attr]
            assert written.stat().st_mode & 0o777 == 0o666 & ~umask, (line.where, oct(written.stat().st_mode))
        else:
            assert len(content.strip()) >= 40, (line.where, content)  # openssl rand -base64 32
        assert SECRET not in done.stdout + done.stderr  # nothing typed is echoed


def test_a_stand_in_table_that_misses_a_host_is_caught() -> None:
    table = network_stand_ins({"planner": 1, "ews": 2, "graph": 3})
    assert OUTSIDE_HOST.search(substituted("curl -sS https://outlook.office365.com/EWS/Exchange.asmx", table))
    assert not OUTSIDE_HOST.search(substituted("nc -vz rabbitmq.kommune.local 5671", table))
    assert shutil.which("nc") and shutil.which("curl") and shutil.which("openssl"), "./dev installs netcat-openbsd and curl"

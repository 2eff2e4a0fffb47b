"""The status page in a real browser: `plannersync run status-page` as a process, Debian's headless Chromium looking.

A seeded store (three mailboxes: one delivering on the default reader, one failing on Graph, one whose status detail
is markup), a dead letter in the publisher's dead-letter queue and a reconciler health file; the page must show each
mailbox's state, reader, counts and error, the stages' depths, and escape everything. The screenshot must be a
rendered page, not a blank one. `plannersync status` shows the same facts in its table and `--json`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from lxml import html as lxml_html

from shared.adapters.store import open_store
from shared.broker.topology import Topology
from shared.domain.contracts import Interval
from shared.domain.delivery_plan import DeliveredChange, Holding
from shared.health import write_health
from shared.workers import Health
from tests.support import browser
from tests.support.broker import publish_raw
from tests.support.processes import PLANNERSYNC, WorkerProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(not browser.available(), reason="needs Debian's chromium (apt-get install chromium)")

ANNE, BO, CE = "anne@jobcenter.dk", "bo@jobcenter.dk", "ce@jobcenter.dk"
MARKUP = '<script>document.title="owned"</script><b>bold</b>'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(database_url: str, health_dir: Path) -> None:
    store = open_store(database_url, auto_upgrade=True)
    now = datetime.now(timezone.utc)
    for address in (ANNE, BO, CE):
        store.add_mailbox(address)
    store.set_backend(BO, "graph")
    store.set_mailbox_status(ANNE, "streaming", "subscribed")
    store.set_mailbox_status(BO, "failing", "ErrorImpersonateUserDenied")
    store.set_mailbox_status(CE, "new", MARKUP)
    store.save_sync_position(ANNE, "sync-state-1", now - timedelta(minutes=2), full=True)
    store.acquire_leases([ANNE], "cp-host:4242", now + timedelta(minutes=10), now)   # a change-producer replica reads it
    store.acquire_leases([BO], "cp-host:4343", now - timedelta(minutes=1), now - timedelta(minutes=2))   # expired: nobody
    start = now + timedelta(days=1)
    changes = [
        DeliveredChange(f"uid-{i}", version=1, holding=Holding(True, Interval(start=start + timedelta(hours=i), end=start + timedelta(hours=i, minutes=30))))
        for i in range(3)
    ]
    store.record_delivered(ANNE, [*changes, DeliveredChange("gone", version=1, holding=Holding.absent())])
    store.record_delivery_outcome(ANNE, None)
    store.record_delivery_outcome(BO, "code 99: refused by Planner")
    nightly = (now + timedelta(hours=5)).isoformat()
    write_health(health_dir, "reconciler", Health("waiting", time.time(), facts={"next_run_at": nightly, "last_run_at": (now - timedelta(hours=19)).isoformat()}))
    # the publisher reports its OCES certificate's expiry; the status page holds no certificate (decision 83)
    write_health(health_dir, "publisher", Health("consuming", time.time(), facts={"planner_certificate_expires_at": (now + timedelta(days=20, hours=1)).isoformat()}))


@pytest.fixture
def page(worker_env: dict[str, str], topology: Topology, tmp_path: Path, processes: list[WorkerProcess]) -> dict[str, Any]:
    health_dir = Path(worker_env["PLANNERSYNC_STATUS__HEALTH_DIR"])
    seed(worker_env["PLANNERSYNC_DATABASE__URL"], health_dir)
    publish_raw("", topology.stage("publisher").dead_letter_queue(), b'{"not": "a message"}')
    port, metrics_port = free_port(), free_port()
    env = {
        **worker_env,
        "PLANNERSYNC_STATUS__PAGE_PORT": str(port),
        "PLANNERSYNC_STATUS__PAGE_REFRESH": "1s",
        "PLANNERSYNC_STATUS__METRICS_PORT": str(metrics_port),
    }
    proc = WorkerProcess("status-page", env, tmp_path).start()
    processes.append(proc)
    url = f"http://127.0.0.1:{port}/"

    def dead_letter_seen() -> bool:
        try:
            data = requests.get(url + "status.json", timeout=5).json()
        except (requests.RequestException, ValueError):
            return False
        dead = data.get("stages", {}).get("publisher", {}).get("dead_letters")
        return bool(dead and dead["ready"] == 1)  # the management API's figures lag a few seconds

    wait_for(dead_letter_seen, timeout=60, interval=0.5, what="the status page showing the dead letter")
    return {"url": url, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "env": env, "process": proc}


def cell(tree: Any, row: str, field: str) -> str:
    found = tree.xpath(f'//tr[@data-mailbox="{row}"]/td[@data-field="{field}"]')
    assert len(found) == 1, f"no {field} cell for {row}"
    return str(found[0].text_content())


def test_the_page_shows_each_mailbox_its_stages_and_workers_in_a_real_browser(page: dict[str, Any], tmp_path: Path) -> None:
    dom = browser.dump_dom(page["url"])
    tree = lxml_html.fromstring(dom)
    assert cell(tree, ANNE, "status") == "streaming" and cell(tree, ANNE, "status_detail") == "subscribed"
    assert cell(tree, ANNE, "backend") == "default" and cell(tree, ANNE, "read_by") == "cp-host:4242"
    assert cell(tree, BO, "read_by") == "" and cell(tree, CE, "read_by") == ""
    assert cell(tree, ANNE, "busy_times_held") == "3"  # present rows only, the absent one not
    assert cell(tree, ANNE, "last_sync_at").endswith("UTC") and cell(tree, ANNE, "last_full_sync_at").endswith("UTC")
    assert cell(tree, ANNE, "last_delivery_at").endswith("UTC") and cell(tree, ANNE, "last_error") == ""
    assert cell(tree, BO, "backend") == "graph" and cell(tree, BO, "status") == "failing"
    assert cell(tree, BO, "busy_times_held") == "0"
    assert cell(tree, BO, "last_error") == "code 99: refused by Planner" and cell(tree, BO, "last_error_at").endswith("UTC")
    assert tree.xpath('string(//p[@id="mailbox-summary"])') == "failing: 1, new: 1, streaming: 1"
    dead = tree.xpath('//tr[@data-stage="publisher"]/td[@data-field="dead_letters"]')[0]
    assert dead.text_content() == "1" and "bad" in dead.get("class")
    assert tree.xpath('string(//tr[@data-stage="transformer"]/td[@data-field="dead_letters"])') == "0"
    assert "10s" not in tree.xpath('string(//tr[@data-stage="publisher"]/td[@data-field="retry"])')  # the test's own ladder
    assert "300ms: 0" in tree.xpath('string(//tr[@data-stage="publisher"]/td[@data-field="retry"])')
    assert tree.xpath('string(//tr[@data-worker="reconciler"]/td[@data-field="next_run_at"])').endswith("UTC")
    assert tree.xpath('//tr[@data-worker="status-page"]'), "the page's own health file"
    certificate = tree.xpath('//p[@id="certificate"]')[0]
    assert certificate.xpath('string(span[@data-field="days_left"])') == "20" and certificate.get("class") == "warn"   # < 30 days
    # escaped: the markup is text, no script ran (there is no script element at all), the title is ours
    assert cell(tree, CE, "status_detail") == MARKUP
    assert not tree.xpath("//script") and not tree.xpath("//td//b")
    assert tree.xpath("string(//title)") == "plannersync status"

    shot = browser.screenshot(page["url"], tmp_path / "status.png")
    facts = browser.png_facts(shot)
    assert (facts.width, facts.height) == browser.WINDOW
    assert facts.non_white > facts.pixels * 0.02, facts  # text, table borders and coloured cells
    assert facts.colours > 8, facts  # not one flat colour


def test_the_json_endpoint_and_the_cli_show_the_same(page: dict[str, Any]) -> None:
    response = requests.get(page["url"] + "status.json", timeout=5)
    assert response.headers["Content-Type"] == "application/json"
    data = response.json()
    anne = next(m for m in data["mailboxes"] if m["mailbox"] == ANNE)
    assert (anne["backend"], anne["status"], anne["busy_times_held"], anne["read_by"]) == (None, "streaming", 3, "cp-host:4242")
    served = lxml_html.fromstring(requests.get(page["url"], timeout=5).text)   # the page as served, without a browser
    assert cell(served, ANNE, "read_by") == "cp-host:4242" and cell(served, BO, "read_by") == ""
    assert data["stages"]["publisher"]["dead_letters"]["ready"] == 1
    assert data["mailboxes_by_status"] == {"failing": 1, "new": 1, "streaming": 1}
    done = subprocess.run([PLANNERSYNC, "status", "--json"], env=page["env"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    assert [(m["mailbox"], m["status"], m["busy_times_held"], m["backend"]) for m in cli["mailboxes"]] == [
        (m["mailbox"], m["status"], m["busy_times_held"], m["backend"]) for m in data["mailboxes"]
    ]
    table = subprocess.run([PLANNERSYNC, "status"], env=page["env"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if line.strip().startswith("mailbox"))
    assert "reader" in header and "read by" in header and "busy times" in header and "last snapshot" in header
    anne_line = next(line for line in table.stdout.splitlines() if ANNE in line)
    assert " default " in anne_line and " cp-host:4242 " in anne_line and "streaming (subscribed)" in anne_line
    assert "dead letters 1" in table.stdout


def test_the_page_is_read_only_and_sends_no_script_and_strict_headers(page: dict[str, Any]) -> None:
    response = requests.get(page["url"], timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"] and response.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script" not in response.text and "&lt;script&gt;" in response.text
    assert requests.post(page["url"], data=b"x", timeout=5).status_code == 501  # no method that could change anything
    assert requests.get(page["url"] + "nothing-here", timeout=5).status_code == 404


def test_the_status_page_exports_mailboxes_by_status_and_queue_depths(page: dict[str, Any]) -> None:
    text = requests.get(page["metrics"], timeout=5).text
    assert 'plannersync_mailboxes{status="streaming"} 1.0' in text and 'plannersync_mailboxes{status="failing"} 1.0' in text
    assert 'plannersync_queue_messages{stage="publisher",tier="dlq"} 1.0' in text
    assert 'plannersync_health_file_next_run_timestamp_seconds{worker="reconciler"}' in text
    assert 'plannersync_worker_ok{worker="status-page"} 1.0' in text
    assert "plannersync_management_api_up 1.0" in text


def test_a_port_in_use_is_one_line_and_exit_3(worker_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**worker_env, "PLANNERSYNC_STATUS__PAGE_PORT": str(port)}
        done = subprocess.run([PLANNERSYNC, "run", "status-page"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    crashed = [json.loads(line) for line in done.stderr.splitlines() if '"worker_crashed"' in line]
    assert crashed and f"cannot listen on 127.0.0.1:{port}" in crashed[0]["problem"]

"""A replica's owner id for its claims (decision 89): apart from every live replica on the host, and the same as its
previous process's after a crash, so a restarted replica takes its own leftover claims back at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.adapters.claims import replica_owner


def test_two_live_replicas_on_one_host_get_different_owners_and_a_restarted_one_gets_its_predecessors(tmp_path: Path) -> None:
    first, first_slot = replica_owner(tmp_path, "publisher")
    second, second_slot = replica_owner(tmp_path, "publisher")
    assert first_slot is not None and second_slot is not None and first != second
    assert replica_owner(tmp_path, "transformer")[0] not in (first, second)  # each stage has its own slots
    first_slot.close()  # the first replica's process ended
    again, again_slot = replica_owner(tmp_path, "publisher")
    assert again == first and again_slot is not None


def test_a_replica_killed_with_sigkill_leaves_its_owner_to_the_process_that_replaces_it(tmp_path: Path) -> None:
    script = (
        "import sys, time; from pathlib import Path; from shared.adapters.claims import replica_owner; "
        f"owner, slot = replica_owner(Path({str(tmp_path)!r}), 'publisher'); print(owner, flush=True); time.sleep(60)"
    )
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root, env={"PYTHONPATH": str(root)})
    try:
        assert process.stdout is not None
        killed_owner = process.stdout.readline().strip()
        assert killed_owner and replica_owner(tmp_path, "publisher")[0] != killed_owner  # alive: its slot is taken
        process.kill()
        process.wait(10)
        assert replica_owner(tmp_path, "publisher")[0] == killed_owner
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

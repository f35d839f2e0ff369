"""The sandbox, pool and warm-reset examples run as a user would run them and print what they promise.

(examples/microvm_shell.py and snapshot_restore.py boot Linux: the e2e tests cover that path.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str) -> str:
    p = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_guest_function_example_matches_zlib_and_reports_fault_and_budget():
    out = _run("guest_function.py").splitlines()
    assert out[0] == "adler32 computed in the guest"
    assert "match" in out
    assert "fault: vector 14, cr2 0x0" in out
    assert "runaway guest stopped by its 0.2 s budget" in out


def test_pool_example_counts_primes_in_200_vms_without_leaks():
    out = _run("pool.py")
    assert "primes below 20000: guests 2262, host 2262" in out
    assert "resources back to baseline" in out


def test_warm_reset_example_shows_fresh_state_on_every_warm_call_and_a_restored_vm():
    out = _run("warm_reset.py")
    assert "warm calls see a fresh guest every time: [1007]" in out
    assert "VMs built for 20 warm calls: 1" in out
    assert "the guest changed memory: True" in out
    assert "memory as checkpointed: True" in out


def test_fork_example_shows_children_diverging_from_the_parent():
    out = _run("fork.py")
    for line in ("children start at the parent's count: True", "each child counted on in its own memory: True",
                 "no child's count reached another: True", "the parent runs on after the fork: True and no child saw "
                 "it: True", "pages the children share with the parent (template memfd): True"):
        assert line in out, out


def test_incremental_snapshot_example_restores_and_merges_exactly():
    out = _run("incremental_snapshot.py")
    for line in ("the chain restores exactly: True", "counter as saved: True",
                 "the merged snapshot restores the same: True"):
        assert line in out, out

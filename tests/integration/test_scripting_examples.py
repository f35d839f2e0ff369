"""The sandbox and pool examples run as a user would run them and print what they promise.

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

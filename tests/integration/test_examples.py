"""Each example runs as a user would run it and prints what its docstring promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str) -> str:
    p = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_hello_real_mode_prints_the_guest_message():
    out = _run("hello_real_mode.py")
    assert out.splitlines() == ["Hello from real mode!",
                                "guest stopped with HLT after 22 port writes"]


def test_long_mode_compute_guest_crc_matches_zlib():
    out = _run("long_mode_compute.py")
    assert "guest mode: long64, stopped with HLT" in out
    line = next(l for l in out.splitlines() if l.startswith("CRC-32"))
    guest, host = line.split("guest ")[1].split(", host ")
    assert guest == host
    assert "\nmatch\n" in out


def test_interrupts_example_delivers_irq_line_msi_and_irqfd_in_order():
    out = _run("interrupts.py")
    guest_lines = [l for l in out.splitlines() if l.startswith("guest:")]
    assert guest_lines == ["guest: handler for vector 0x30 ran",
                           "guest: handler for vector 0x40 ran",
                           "guest: handler for vector 0x31 ran"]
    assert out.splitlines()[-1] == "loop ended with INTR; vectors seen: 0x30, 0x40, 0x31"


def test_exit_stats_example_counts_each_write_where_it_was_handled():
    p = subprocess.run([sys.executable, str(EXAMPLES / "exit_stats.py"), "500"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    rows = {}
    for line in p.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if cells[0] in ("port (kvmpy)", "MMIO (kvmpy)", "port (ioeventfd)"):
            rows[cells[0]] = cells[1:]
    exits_to_kvmpy = {name: int(r[0]) for name, r in rows.items()}
    assert exits_to_kvmpy == {"port (kvmpy)": 500, "MMIO (kvmpy)": 500, "port (ioeventfd)": 0}
    assert int(rows["port (ioeventfd)"][4]) == 500  # each write signalled the eventfd once
    assert int(rows["MMIO (kvmpy)"][3]) == 500  # KVM's own mmio_exits counter agrees
    for name in ("port (kvmpy)", "MMIO (kvmpy)"):
        assert int(rows[name][1]) >= 500  # KVM's exits counter: at least one per write
    assert "cheaper than one that exits to kvmpy" in p.stdout

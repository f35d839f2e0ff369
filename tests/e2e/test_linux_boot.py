"""End to end: `kvmpy run` boots kvmpy's own kernel and busybox initramfs with 2 vCPUs.

One boot serves every test in this module (a boot takes a minute or more on
the software KVM backend): the fixture drives the console like a person at a
terminal would (waits for the shell, types a command, types `poweroff -f`)
and records what the guest printed and how `kvmpy run` exited.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from kvmpy.boot.initramfs import INIT_MARKER

pytestmark = [pytest.mark.e2e, pytest.mark.kvm]

BOOT_TIMEOUT = 300  # seconds to the shell prompt; ~60-90 s measured on the PVM backend
COMMAND = "echo kvmpy-answer-$((6*7)) && uname -s\n"


@dataclass
class Session:
    console: str
    returncode: int
    stderr: str
    marks: dict[str, float]


def _read_until(proc: subprocess.Popen, sel: selectors.BaseSelector, buf: bytearray, text: bytes,
                timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while text not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None and not sel.select(0):
            return text in buf
        for key, _ in sel.select(min(left, 1.0)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
            buf += chunk
    return True


@pytest.fixture(scope="module")
def session(guest_artifacts) -> Session:
    vmlinux, initrd = guest_artifacts
    cmd = [sys.executable, "-m", "kvmpy.cli", "run", "--kernel", str(vmlinux), "--initrd", str(initrd),
           "--cpus", "2", "--mem", "128M", "--timeout", str(BOOT_TIMEOUT + 120)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = bytearray()
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        if _read_until(proc, sel, buf, INIT_MARKER.encode(), BOOT_TIMEOUT):
            marks["init"] = time.monotonic() - t0
            # The shell prints its prompt after the marker; then type like a user.
            _read_until(proc, sel, buf, b"# ", 60)
            proc.stdin.write(COMMAND.encode())
            proc.stdin.flush()
            if _read_until(proc, sel, buf, b"kvmpy-answer-42", 60):
                marks["command"] = time.monotonic() - t0
            _read_until(proc, sel, buf, b"# ", 60)
            proc.stdin.write(b"poweroff -f\n")
            proc.stdin.flush()
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _read_until(proc, sel, buf, b"\0", 1)  # drain
    stderr = proc.stderr.read().decode(errors="replace")
    return Session(buf.decode(errors="replace"), returncode, stderr, marks)


def test_kernel_prints_its_banner(session: Session) -> None:
    assert "Linux version 6." in session.console, session.console[-3000:]


def test_both_cpus_are_brought_up(session: Session) -> None:
    assert "Brought up 1 node, 2 CPUs" in session.console, session.console[-3000:]


def test_kernel_reaches_init(session: Session) -> None:
    assert "Run /init as init process" in session.console, session.console[-3000:]


def test_init_runs_and_prints_its_marker(session: Session) -> None:
    assert INIT_MARKER in session.console, session.console[-3000:]


def test_shell_answers_a_typed_command(session: Session) -> None:
    assert "kvmpy-answer-42" in session.console and "Linux" in session.console.split("kvmpy-answer-42")[-1], \
        session.console[-3000:]


def test_poweroff_ends_the_vm_cleanly(session: Session) -> None:
    assert session.returncode == 0, (session.returncode, session.stderr[-2000:], session.console[-2000:])
    assert "guest poweroff" in session.stderr

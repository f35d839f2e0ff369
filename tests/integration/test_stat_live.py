"""`kvmpy stat`'s live view, driven in a real terminal (tmux) against a running VM.

The VM is a tiny guest in this process whose vCPU thread keeps exiting: per
round one `out` to port 0x10 and three to port 0x11, paced by the device
(5 ms per round) so that the counts grow at the same rate on any host. Its
control socket is served from a temporary directory; `kvmpy stat --dir` in
a tmux pane reads it, and the test reads the pane like a person reads the
screen and types keys into it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmpy.stats.api import MachineStats
from kvmpy.stats.control import ControlServer

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="needs tmux (scripts/install-deps.sh installs it)")

ROOT = Path(__file__).parents[2]
LOOP = """
1:  out %al, $0x10
    out %al, $0x11
    out %al, $0x11
    out %al, $0x11
    jmp 1b
"""
HEADER = re.compile(r"busy \(pid \d+\): ([\d,]+) exits")


class Tmux:
    """One tmux server of our own (its own socket), one pane running a command."""

    def __init__(self, command: str) -> None:
        self.socket = f"kvmpy-test-{os.getpid()}-{id(self)}"
        self._tmux("new-session", "-d", "-s", "t", "-x", "150", "-y", "45", command)
        self.path = Path(self._tmux("display-message", "-p", "#{socket_path}").strip())

    def _tmux(self, *args: str) -> str:
        # The pane's size is the terminal's: no COLUMNS/LINES of ours may override it.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        out = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                             text=True, timeout=30, env=env, check=False)
        if out.returncode:
            raise RuntimeError(f"tmux {args[0]}: {out.stderr.strip()}")
        return out.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, what: str, check, timeout: float = 60.0) -> str:
        """The first screen on which `check(screen)` is true; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"the screen never showed {what}; last screen:\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30, check=False)
        self.path.unlink(missing_ok=True)  # kill-server leaves the socket file


def exits_shown(screen: str) -> int | None:
    m = HEADER.search(screen)
    return int(m.group(1).replace(",", "")) if m else None


def row_order(screen: str, *labels: str) -> list[str]:
    """`labels` in the order their table rows appear on the screen."""
    found = {l: screen.find(f" {l} ") for l in labels}
    return [l for l in sorted(found, key=found.get) if found[l] >= 0]


@pytest.fixture
def running_vm(guest, tmp_path):
    g = guest("64", LOOP)
    # 5 ms of device time per round: ~800 exits/s on any host, and an idle host CPU.
    g.port.on_write = lambda offset, size, value: time.sleep(0.005) if offset == 0 else None
    loop = g.make_loop()
    stats = MachineStats(g)
    server = ControlServer(stats, name="busy", directory=tmp_path)
    failure: list[BaseException] = []

    def vcpu() -> None:
        try:
            loop.run()
        except BaseException as e:  # reported by the test, not lost in the thread
            failure.append(e)

    thread = threading.Thread(target=vcpu, name="vcpu0", daemon=True)
    thread.start()
    yield g
    loop.stop()
    thread.join(30)
    server.close()
    stats.close()
    assert not thread.is_alive() and not failure, failure


@pytest.fixture
def live(running_vm, tmp_path):
    cmd = (f"cd {ROOT} && PYTHONPATH={ROOT} {sys.executable} -m kvmpy.stats.stat_cli --dir {tmp_path} "
           f"--interval 0.5; echo \"stat exited with $?\"; stty -a | grep -o -- '-*icanon'; sleep 60")
    term = Tmux(cmd)
    yield term
    term.close()


def test_live_view_redraws_with_new_counts_sorts_switches_views_and_quits(live):
    first = live.wait_for("the VM's header and its IO row", lambda s: bool(exits_shown(s)) and " IO " in s)
    assert "reason" in first and "kvm_reason" in first
    assert "q quits" in first  # the key line
    n0 = exits_shown(first)
    later = live.wait_for("a higher exit count", lambda s: (exits_shown(s) or 0) > n0)
    assert exits_shown(later) > n0

    live.keys("2")  # the ports view, sorted by count: 0x0011 has three exits per round to 0x0010's one
    ports = live.wait_for("the ports view", lambda s: "0x0010" in s and "0x0011" in s)
    assert "direction" in ports and "recording port" in ports
    assert row_order(ports, "0x0011", "0x0010") == ["0x0011", "0x0010"]

    live.keys("s", "s", "s")  # count -> rate -> vmm -> name
    by_name = live.wait_for("the ports sorted by name",
                            lambda s: row_order(s, "0x0011", "0x0010") == ["0x0010", "0x0011"])
    assert "direction" in by_name

    live.keys("v")  # the next view: mmio, where this guest has nothing
    live.wait_for("the mmio view", lambda s: "(nothing yet)" in s and "0x0010" not in s)
    live.keys("1")
    n1 = exits_shown(later)
    # Back in the reasons view, and the redraws with new counts go on.
    back = live.wait_for("the reasons view with new counts",
                         lambda s: "kvm_reason" in s and (exits_shown(s) or 0) > n1)
    assert " IO " in back

    live.keys("q")
    done = live.wait_for("stat's exit", lambda s: "stat exited with" in s, timeout=30)
    assert "stat exited with 0" in done
    # The terminal is back in canonical mode (the live view's cbreak mode was undone).
    assert re.search(r"^icanon$", done, re.MULTILINE), done

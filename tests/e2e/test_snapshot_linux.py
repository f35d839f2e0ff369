"""End to end: one Linux boot, a snapshot at the shell, clones restored from it continue exactly.

One boot serves the module (a boot takes one to five minutes on the PVM
backend). Before the snapshot the shell starts a counter loop that writes
its count to /tmp/c every second; the clones restored from the snapshot
must keep counting from where it was, keep their console (the snapshot's
text, then new output), answer typed commands, and be two independent
machines sharing one memory file.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pytest

from kvmpy.machine import DEFAULT_CMDLINE, MachineConfig
from kvmpy.microvm import MicroVM, MicroVMConfig, machine_supports
from kvmpy.snapshot import Snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.kvm]

BOOT_TIMEOUT = 600
CMD_TIMEOUT = 180
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 1; done &"
# On PVM the guest TSC is the host's (KVM_SET_MSRS of IA32_TSC is ignored), so a
# restored guest sees its TSC jump by the time since the snapshot; a tick-based
# clocksource keeps the guest's time continuous across that jump (docs/scripting.md).
CMDLINE = DEFAULT_CMDLINE + " clocksource=refined-jiffies"


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]


@dataclass
class Restored:
    boot_seconds: float
    before: list[float]  # counter and uptime just before the snapshot
    console_at_snapshot: str
    restore_seconds: list[float]
    answers: list[str]
    later: list[list[float]]  # counter and uptime in each clone, a few seconds on
    consoles: list[str]
    snapshot: Snapshot


@pytest.fixture(scope="module")
def restored(guest_artifacts, tmp_path_factory) -> Restored:
    vmlinux, initrd = guest_artifacts
    snapdir = tmp_path_factory.mktemp("snap") / "shell"
    t0 = time.monotonic()
    with MicroVM(MicroVMConfig(kernel=vmlinux, initrd=initrd, memory="128M", cmdline=CMDLINE)) as vm:
        vm.start()
        vm.expect("# ", BOOT_TIMEOUT)
        boot = time.monotonic() - t0
        vm.sendline(COUNTER)
        vm.expect("# ", CMD_TIMEOUT)
        time.sleep(3)
        before = _numbers(vm.run("cat /tmp/c /proc/uptime", timeout=CMD_TIMEOUT))
        vm.snapshot(snapdir)
        console_at_snapshot = vm.console
    snap = Snapshot.open(snapdir)
    clones = []
    try:
        for _ in range(2):
            clones.append(MicroVM.restore(snap))
        answers = [c.run(f"echo clone-answer-$((6*7+{n}))", timeout=CMD_TIMEOUT) for n, c in enumerate(clones)]
        time.sleep(4)
        later = [_numbers(c.run("cat /tmp/c /proc/uptime", timeout=CMD_TIMEOUT)) for c in clones]
        consoles = [c.console for c in clones]
        seconds = [c.restore_seconds for c in clones]
    finally:
        for c in clones:
            c.close()
    return Restored(boot, before, console_at_snapshot, seconds, answers, later, consoles, snap)


def test_restored_clones_answer_typed_commands(restored):
    assert [a.strip() for a in restored.answers] == ["clone-answer-42", "clone-answer-43"]


def test_guest_counter_continues_from_the_snapshot(restored):
    count_before = restored.before[0]
    for later in restored.later:
        assert later[0] > count_before, (restored.before, later)  # counting on, not restarted at 1
        assert later[0] < count_before + 600


def test_uptime_continues_from_the_snapshot_point(restored):
    for later in restored.later:
        assert later[1] > restored.before[1], (restored.before, later)


def test_console_continues_the_snapshot_console(restored):
    for console in restored.consoles:
        assert console.startswith(restored.console_at_snapshot)
        assert "clone-answer-4" in console[len(restored.console_at_snapshot):]


def test_clones_are_independent(restored):
    a, b = restored.consoles
    assert "clone-answer-42" in a and "clone-answer-43" not in a
    assert "clone-answer-43" in b and "clone-answer-42" not in b


def test_restore_takes_milliseconds_not_a_boot(restored):
    # Not an absolute bound: a restore must be a small fraction of the boot it replaces.
    for s in restored.restore_seconds:
        assert s < restored.boot_seconds / 20, (s, restored.boot_seconds)


def test_snapshot_records_vcpu_vm_and_device_state(restored):
    state = restored.snapshot.state
    vcpu = state["vcpus"][0]
    for key in ("regs", "sregs", "fpu", "msrs", "lapic", "vcpu_events", "mp_state", "debugregs"):
        assert key in vcpu
    assert len(vcpu["msrs"]) > 10
    assert set(state["vm"]["irqchip"]) == {"pic_master", "pic_slave", "ioapic"}
    assert any(k.startswith("pio:0x3f8") for k in state["devices"])
    assert state["kvmpy"]["syscall_trap"] is None or state["kvmpy"]["syscall_trap"]["guest_lstar"]


@pytest.mark.skipif(not machine_supports("nets"), reason="MachineConfig has no 'nets' yet: no virtio-net to ping")
def test_restored_guest_answers_ping_on_its_tap(guest_artifacts, tmp_path):
    import subprocess

    from pyroute2 import IPRoute

    from kvmpy.microvm import NetConfig

    vmlinux, initrd = guest_artifacts
    tap, host_ip, guest_ip = "kvmpysnap0", "172.30.99.1", "172.30.99.2"
    cfg = MicroVMConfig(kernel=vmlinux, initrd=initrd, memory="128M", cmdline=CMDLINE, nets=[NetConfig(tap=tap)])
    with MicroVM(cfg) as vm:
        vm.start()
        vm.expect("# ", BOOT_TIMEOUT)
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=tap)[0]
            ipr.addr("add", index=idx, address=host_ip, prefixlen=24)
            ipr.link("set", index=idx, state="up")
        vm.run(f"ip addr add {guest_ip}/24 dev eth0 && ip link set eth0 up", timeout=CMD_TIMEOUT)
        vm.snapshot(tmp_path / "net")
    with MicroVM.restore(tmp_path / "net"):
        ping = subprocess.run(["ping", "-c", "3", "-W", "10", guest_ip], capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout + ping.stderr

"""End to end: one Linux boot, a snapshot at the shell, clones restored from it continue exactly.

One boot serves the module (a boot takes one to five minutes on the PVM
backend). Before the snapshot the shell starts a counter loop that writes
its count to /tmp/c every second; the clones restored from the snapshot
must keep counting from where it was, keep their console (the snapshot's
text, then new output), answer typed commands, and be two independent
machines sharing one memory file.

The booted guest has a virtio-net NIC configured by `ip=` on the command
line; each clone gets a fresh TAP with the same host address, and the host
pings the first clone over its TAP before the second exists (two TAPs on
one subnet would make the route ambiguous). It also has a read-only
virtio-blk disk of random bytes, read once before the snapshot; each clone
reads blocks it never read before (no page cache can answer), through the
restored device, and they must be the image's.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass

import pytest

from kvmpy.machine import DEFAULT_CMDLINE
from kvmpy.microvm import DiskConfig, MicroVM, MicroVMConfig, NetConfig
from kvmpy.snapshot import Snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.kvm]

BOOT_TIMEOUT = 600
CMD_TIMEOUT = 180
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 1; done &"
# On PVM the guest TSC is the host's (KVM_SET_MSRS of IA32_TSC is ignored), so a
# restored guest sees its TSC jump by the time since the snapshot; a tick-based
# clocksource keeps the guest's time continuous across that jump (docs/scripting.md).
HOST_IP, GUEST_IP = "172.30.99.1", "172.30.99.2"
DISK_BLOCKS = 256  # 4 KiB blocks of the read-only disk
READ_BEFORE, READ_BY_CLONE = 3, (100, 200)  # blocks read before the snapshot / by each clone after it
CMDLINE = (DEFAULT_CMDLINE + " clocksource=refined-jiffies"
           f" ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off")


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
    ping_replies: int  # from the first clone, over its new TAP
    clone_taps: list[str]
    boot_tap: str
    disk_md5: list[str]  # md5 of each 4 KiB block of the disk image
    read_before: str  # the guest's md5 of block READ_BEFORE, before the snapshot
    read_by_clones: list[str]  # each clone's md5 of its block of READ_BY_CLONE


@pytest.fixture(scope="module")
def restored(guest_artifacts, tmp_path_factory) -> Restored:
    if os.geteuid() != 0 or not os.access("/dev/net/tun", os.W_OK):
        pytest.skip("needs root and /dev/net/tun for the guest's TAP")
    from test_virtio_linux import ping  # raw-socket ICMP echo: the host has no ping binary

    vmlinux, initrd = guest_artifacts
    snapdir = tmp_path_factory.mktemp("snap") / "shell"
    image = snapdir.parent / "random.img"
    image.write_bytes(os.urandom(DISK_BLOCKS * 4096))
    data = image.read_bytes()
    disk_md5 = [hashlib.md5(data[i:i + 4096]).hexdigest() for i in range(0, len(data), 4096)]
    t0 = time.monotonic()
    net = NetConfig(mac="52:54:00:99:00:02", host_address=f"{HOST_IP}/24")
    config = MicroVMConfig(kernel=vmlinux, initrd=initrd, memory="128M", cmdline=CMDLINE, nets=[net],
                           disks=[DiskConfig(image, read_only=True)])
    with MicroVM(config) as vm:
        vm.start()
        boot_tap = next(s.device.owner.name for s in vm.machine.virtio.slots if hasattr(s.device, "owner"))
        vm.expect("# ", BOOT_TIMEOUT)
        boot = time.monotonic() - t0
        vm.sendline(COUNTER)
        vm.expect("# ", CMD_TIMEOUT)
        read_before = vm.run(_read_block(READ_BEFORE), timeout=CMD_TIMEOUT)
        time.sleep(3)
        before = _numbers(vm.run("cat /tmp/c /proc/uptime", timeout=CMD_TIMEOUT))
        vm.snapshot(snapdir)
        console_at_snapshot = vm.console
    snap = Snapshot.open(snapdir)
    clones = []
    try:
        clones.append(MicroVM.restore(snap))
        replies = ping(GUEST_IP, count=3, timeout=15)  # like `ping -c 1 -W 5`, up to three tries
        clones.append(MicroVM.restore(snap))
        taps = [c.config.nets[0].tap for c in clones]  # the new TAPs the clones were given
        answers = [c.run(f"echo clone-answer-$((6*7+{n}))", timeout=CMD_TIMEOUT) for n, c in enumerate(clones)]
        read_by_clones = [c.run(_read_block(b), timeout=CMD_TIMEOUT) for c, b in zip(clones, READ_BY_CLONE)]
        time.sleep(4)
        later = [_numbers(c.run("cat /tmp/c /proc/uptime", timeout=CMD_TIMEOUT)) for c in clones]
        consoles = [c.console for c in clones]
        seconds = [c.restore_seconds for c in clones]
    finally:
        for c in clones:
            c.close()
    return Restored(boot, before, console_at_snapshot, seconds, answers, later, consoles, snap, replies, taps,
                    boot_tap, disk_md5, read_before, read_by_clones)


def _read_block(n: int) -> str:
    return f"dd if=/dev/vda bs=4096 skip={n} count=1 2>/dev/null | md5sum"


def _md5_of(output: str) -> str:
    match = re.search(r"\b[0-9a-f]{32}\b", output)
    assert match, output
    return match.group(0)


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
    assert state["syscall_trap"] is None or state["syscall_trap"]["guest_lstar"]


def test_restored_guest_answers_ping_on_its_new_tap(restored):
    assert restored.ping_replies >= 1, restored.consoles[0][-2000:]


def test_each_clone_gets_its_own_tap(restored):
    assert len(set(restored.clone_taps + [restored.boot_tap])) == 3, (restored.boot_tap, restored.clone_taps)


def test_snapshot_records_the_nic_config(restored):
    disk, nic = restored.snapshot.config["virtio"]
    assert nic["kind"] == "net" and nic["mac"] == "52:54:00:99:00:02" and nic["host_address"] == f"{HOST_IP}/24"
    assert disk["kind"] == "blk" and disk["read_only"]
    transports = [v for k, v in sorted(restored.snapshot.state["devices"].items()) if k.startswith("mmio:")]
    assert [len(t["queues"]) for t in transports] == [1, 2]  # blk: requestq; net: receiveq and transmitq
    for t in transports:
        assert t["status"] & 4 and all(q["ready"] for q in t["queues"])  # DRIVER_OK


def test_guest_reads_the_disk_before_the_snapshot(restored):
    assert _md5_of(restored.read_before) == restored.disk_md5[READ_BEFORE]


def test_restored_clones_read_new_blocks_through_the_restored_disk(restored):
    for block, output in zip(READ_BY_CLONE, restored.read_by_clones):
        assert _md5_of(output) == restored.disk_md5[block], (block, output)

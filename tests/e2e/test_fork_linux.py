"""End to end: one Linux boot, forked into diverging children, incremental snapshots, vsock across both.

One boot serves the module. The guest mounts a read-only ext4 disk holding
the vsock test client (tests/vsock_client.py) and listens on vsock port
6000; the host connects in (an open connection). Then the VM is forked:
each child's guest sees that connection reset (the transport reset event),
reconnects to a host listener beside its own vsock socket, and writes a
marker into its tmpfs that no other machine may see; the parent's
connection stays open and answers. Then a full and an incremental snapshot
of the parent: the incremental restores and answers commands.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import pytest

from kvmpy.disk import make_ext4_image
from kvmpy.machine import DEFAULT_CMDLINE
from kvmpy.microvm import DiskConfig, MicroVM, MicroVMConfig, VsockConfig

from vsock_client import build_vsock_client, serve_one

pytestmark = [pytest.mark.e2e, pytest.mark.kvm]

BOOT_TIMEOUT = 600
CMD_TIMEOUT = 180
GUEST_PORT, HOST_PORT = 6000, 5000
CMDLINE = DEFAULT_CMDLINE + " clocksource=refined-jiffies"


@dataclass
class Run:
    markers: dict[str, str] = field(default_factory=dict)  # machine -> `cat /tmp/marker` there
    answers: list[str] = field(default_factory=list)
    child_listen_logs: list[str] = field(default_factory=list)
    reconnect_replies: list[str] = field(default_factory=list)
    host_got: list[bytes] = field(default_factory=list)
    parent_reply: bytes = b""
    parent_listen_log: str = ""
    incremental_answer: str = ""
    incremental_bytes: int = 0
    full_bytes: int = 0


@pytest.fixture(scope="module")
def run(guest_artifacts, tmp_path_factory) -> Run:
    vmlinux, initrd = guest_artifacts
    work = tmp_path_factory.mktemp("fork-e2e")
    client = build_vsock_client(work)
    if client is None:
        pytest.skip("no gcc with a static libc for the guest's vsock client")
    root = work / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "vsockt").write_bytes(client.read_bytes())
    os.chmod(root / "bin" / "vsockt", 0o755)
    image = make_ext4_image(work / "tools.img", root, "8M")
    uds = str(work / "v.sock")
    out = Run()
    config = MicroVMConfig(kernel=vmlinux, initrd=initrd, memory="128M", cmdline=CMDLINE,
                           disks=[DiskConfig(image, read_only=True)], vsock=VsockConfig(3, backend="userspace",
                                                                                         uds_path=uds))
    with MicroVM(config) as vm:
        vm.start()
        vm.expect("# ", BOOT_TIMEOUT)
        vm.run("mkdir -p /mnt && mount -o ro /dev/vda /mnt", timeout=CMD_TIMEOUT)
        vm.sendline(f"/mnt/bin/vsockt listen {GUEST_PORT} > /tmp/l.log 2>&1 &")
        vm.expect("# ", CMD_TIMEOUT)
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.settimeout(CMD_TIMEOUT)
        deadline = time.monotonic() + CMD_TIMEOUT
        while "VSOCK-LISTENING" not in vm.run("cat /tmp/l.log", timeout=CMD_TIMEOUT):
            assert time.monotonic() < deadline, "the guest never listened"
        host.connect(uds)
        host.sendall(f"CONNECT {GUEST_PORT}\n".encode())
        assert host.recv(64).startswith(b"OK ")  # the connection is open in both
        children = vm.fork(2)
        try:
            for i, c in enumerate(children):
                out.answers.append(c.run(f"echo child-$((40+{i}))", timeout=CMD_TIMEOUT).strip())
            children[0].run("echo written-in-child0 > /tmp/marker", timeout=CMD_TIMEOUT)
            for i, c in enumerate(children):
                out.markers[f"child{i}"] = c.run("cat /tmp/marker 2>&1", timeout=CMD_TIMEOUT)
                out.child_listen_logs.append(c.run("sleep 1; cat /tmp/l.log", timeout=CMD_TIMEOUT))
                path = c.machine.virtio.slots[1].device.uds_path + f"_{HOST_PORT}"  # beside its own socket
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(path)
                listener.listen(1)
                t = serve_one(listener, CMD_TIMEOUT, out.host_got)
                out.reconnect_replies.append(c.run(f"/mnt/bin/vsockt connect 2 {HOST_PORT} again-{i}",
                                                   timeout=CMD_TIMEOUT))
                t.join(CMD_TIMEOUT)
                listener.close()
        finally:
            for c in children:
                c.close()
        out.markers["parent"] = vm.run("cat /tmp/marker 2>&1", timeout=CMD_TIMEOUT)
        host.sendall(b"still-open")
        while len(out.parent_reply) < len(b"pong:still-open"):  # the guest writes it in two parts
            part = host.recv(64)
            if not part:
                break
            out.parent_reply += part
        host.close()
        out.parent_listen_log = vm.run("sleep 1; cat /tmp/l.log", timeout=CMD_TIMEOUT)
        vm.snapshot(work / "s0")
        vm.run("echo incremental-$((6*7)) > /tmp/inc", timeout=CMD_TIMEOUT)
        vm.snapshot(work / "s1", parent=work / "s0")
    out.full_bytes = (work / "s0" / "memory.bin").stat().st_size
    out.incremental_bytes = (work / "s1" / "memory.bin").stat().st_size
    with MicroVM.restore(work / "s1") as clone:
        out.incremental_answer = clone.run("cat /tmp/inc", timeout=CMD_TIMEOUT).strip()
    return out


def test_forked_children_answer_typed_commands(run):
    assert run.answers == ["child-40", "child-41"]


def test_a_marker_written_in_one_child_is_in_no_other_machine(run):
    assert "written-in-child0" in run.markers["child0"]
    assert "written-in-child0" not in run.markers["child1"] and "No such file" in run.markers["child1"]
    assert "written-in-child0" not in run.markers["parent"] and "No such file" in run.markers["parent"]


def test_each_childs_guest_sees_its_vsock_connection_reset(run):
    for log in run.child_listen_logs:
        assert "read: Connection reset by peer" in log, log


def test_children_reconnect_to_a_host_listener(run):
    for i, reply in enumerate(run.reconnect_replies):
        assert f"VSOCK-REPLY:host-says:again-{i}" in reply, reply
    assert sorted(run.host_got) == [b"again-0", b"again-1"]


def test_the_parents_vsock_connection_stays_open(run):
    assert run.parent_reply == b"pong:still-open"
    assert "VSOCK-SERVED:still-open" in run.parent_listen_log


def test_an_incremental_snapshot_restores_and_answers(run):
    assert run.incremental_answer == "incremental-42"
    assert run.incremental_bytes < run.full_bytes // 8, (run.incremental_bytes, run.full_bytes)

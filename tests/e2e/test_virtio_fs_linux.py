"""End to end: kvmpy's Linux guest mounts host directories over virtio-fs, served by a real virtiofsd.

One boot serves the module, through the public API: `MicroVMConfig(shares=[...])`
with a writable share (tag "rw") and a read-only one (tag "ro") of two
host directories. The test types into the guest's shell:

- `mount -t virtiofs rw /mnt/rw` and `... ro /mnt/ro` (the guest's
  virtio_fs driver found both tags in the devices' configuration space);
- `cat` of a file the host wrote before the boot, through each share;
- a write into the writable share, which the host then reads from its
  directory (the data went guest -> virtqueue -> virtiofsd -> host file);
- a write into the read-only share, which the guest sees fail with EROFS
  (the host kernel refused it in virtiofsd's read-only bind mount) and
  which leaves nothing in the host directory.
"""

from __future__ import annotations

import os

import pytest

from kvmpy.microvm import MicroVM, MicroVMConfig
from kvmpy.virtiofsd import ShareConfig, VirtiofsdError, find_virtiofsd

try:
    find_virtiofsd()
    _NO_DAEMON = ""
except VirtiofsdError as e:
    _NO_DAEMON = str(e)

pytestmark = [
    pytest.mark.e2e, pytest.mark.kvm,
    pytest.mark.skipif(bool(_NO_DAEMON), reason=_NO_DAEMON or "virtiofsd present"),
    pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd's namespace sandbox and ro shares need root"),
]

BOOT_TIMEOUT = 600  # seconds to the shell on a busy software-KVM host
HOST_TEXT = "hello from the host directory"
GUEST_TEXT = "written by the guest over virtio-fs"


@pytest.fixture(scope="module")
def session(guest_artifacts, tmp_path_factory):
    vmlinux, initrd = guest_artifacts
    work = tmp_path_factory.mktemp("virtio-fs-e2e")
    rw, ro = work / "rw", work / "ro"
    for d in (rw, ro):
        d.mkdir()
        (d / "hello.txt").write_text(HOST_TEXT + f" ({d.name})\n")
    config = MicroVMConfig(kernel=vmlinux, initrd=initrd, memory="128M",
                           shares=[ShareConfig(rw, "rw"), f"{ro}=ro,ro"])
    out: dict = {"rw": rw, "ro": ro}
    with MicroVM(config) as vm:
        vm.start()
        vm.expect("KVMPY-INIT-OK", BOOT_TIMEOUT)
        vm.expect("# ", 120)
        out["mount"] = vm.run("mkdir -p /mnt/rw /mnt/ro && mount -t virtiofs rw /mnt/rw && "
                              "mount -t virtiofs ro /mnt/ro && echo MOUNTED-$((20+1))", timeout=300)
        out["read_rw"] = vm.run("cat /mnt/rw/hello.txt", timeout=120)
        out["read_ro"] = vm.run("cat /mnt/ro/hello.txt", timeout=120)
        out["write_rw"] = vm.run(f"echo '{GUEST_TEXT}' > /mnt/rw/from-guest.txt; echo STATUS=$?", timeout=120)
        out["host_sees"] = (rw / "from-guest.txt").read_text() if (rw / "from-guest.txt").exists() else None
        out["write_ro"] = vm.run("echo nope > /mnt/ro/from-guest.txt; echo STATUS=$?", timeout=120)
        out["ls_mounts"] = vm.run("grep virtiofs /proc/mounts", timeout=60)
        out["errors"] = [s.transport.last_error for s in vm.machine.virtio.slots if s.transport.last_error]
        vm.sendline("poweroff -f")
        out["outcome"] = vm.wait(120)
    return out


def test_guest_mounts_both_shares_by_tag(session):
    assert "MOUNTED-21" in session["mount"], session["mount"]
    assert "rw /mnt/rw virtiofs" in session["ls_mounts"] and "ro /mnt/ro virtiofs" in session["ls_mounts"]


def test_guest_reads_host_files(session):
    assert HOST_TEXT + " (rw)" in session["read_rw"]
    assert HOST_TEXT + " (ro)" in session["read_ro"]


def test_host_sees_the_guests_write(session):
    assert "STATUS=0" in session["write_rw"], session["write_rw"]
    assert session["host_sees"] == GUEST_TEXT + "\n"


def test_read_only_share_refuses_writes(session):
    assert "Read-only file system" in session["write_ro"] and "STATUS=0" not in session["write_ro"], \
        session["write_ro"]
    assert not (session["ro"] / "from-guest.txt").exists()


def test_no_device_failed_and_the_guest_powered_off(session):
    assert not session["errors"], session["errors"]
    assert session["outcome"] is not None and session["outcome"].status.value == "poweroff", session["outcome"]

"""End to end: `kvmpy run --jail` boots the guest to a shell with the seccomp filter in force (kill mode).

One jailed boot with a read-only disk, virtio-rng and a TAP NIC: while the
guest runs, the VMM's /proc/<pid>/status is read from outside (unprivileged
uid, no capabilities, seccomp filter mode, pid 1 of its own pid namespace);
then a command reads the disk through virtio-blk and the guest powers off.
A system call outside the allow-list anywhere on that path would have
killed the VMM (the launcher then says which one); afterwards no TAP, jail
directory or cgroup is left.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmpy.boot.initramfs import INIT_MARKER

pytestmark = [pytest.mark.e2e, pytest.mark.kvm]

BOOT_TIMEOUT = 300


def _read_until(proc, sel, buf: bytearray, text: bytes, timeout: float) -> bool:
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


def test_jailed_guest_boots_to_a_shell_and_powers_off(guest_artifacts, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the jail needs root")
    vmlinux, initrd = guest_artifacts
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"JAILDISK42" + bytes((1 << 20) - 10))
    err = open(tmp_path / "stderr", "w+b")
    cmd = [sys.executable, "-m", "kvmpy.cli", "run", "--jail", "--kernel", str(vmlinux), "--initrd", str(initrd),
           "--mem", "128M", "--timeout", str(BOOT_TIMEOUT + 120), "--disk", f"{disk},ro", "--rng"]
    if os.access("/dev/net/tun", os.W_OK):
        cmd += ["--net", "tap,ip=172.31.239.1/24"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = bytearray()
    status: dict[str, str] = {}
    taps: list[str] = []
    try:
        assert _read_until(proc, sel, buf, INIT_MARKER.encode(), BOOT_TIMEOUT), buf[-2000:]
        err.seek(0)
        m = re.search(rb"VMM pid (\d+) as uid 65534", err.read())
        assert m, "the launcher did not report the jailed VMM"
        pid = int(m.group(1))
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        taps = [n for n in os.listdir("/sys/class/net") if n.startswith(f"kvmpy{proc.pid}-")]
        assert _read_until(proc, sel, buf, b"# ", 60)
        proc.stdin.write(b"echo jailed-answer-$((6*7)) $(head -c 10 /dev/vda)\n")
        proc.stdin.flush()
        assert _read_until(proc, sel, buf, b"jailed-answer-42 JAILDISK42", 60), buf[-2000:]
        _read_until(proc, sel, buf, b"# ", 30)
        proc.stdin.write(b"poweroff -f\n")
        proc.stdin.flush()
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err.seek(0)
    stderr = err.read().decode(errors="replace")
    assert returncode == 0, stderr
    assert "killed by its seccomp filter" not in stderr
    assert status["Uid"].split() == ["65534"] * 4 and int(status["CapEff"], 16) == 0
    assert status["Seccomp"].strip() == "2" and status["NSpid"].split()[-1] == "1"
    jail_id = re.search(r"kvmpy: jail (\w+):", stderr).group(1)
    assert not Path(f"/run/kvmpy-jail/{jail_id}").exists()  # the launcher removed the jail and its cgroup
    assert not list(Path("/sys/fs/cgroup").glob(f"*/kvmpy-{jail_id}"))
    if "--net" in cmd:  # the launcher named the TAP kvmpy<its pid>-<n>; it went with the VMM
        assert "host network namespace" in stderr and len(taps) == 1
        assert not [n for n in os.listdir("/sys/class/net") if n.startswith(f"kvmpy{proc.pid}-")]

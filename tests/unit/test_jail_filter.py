"""kvmpy.jail without a jail: the allow-list and filter, the config checks, the command line it re-runs."""

from __future__ import annotations

import argparse

import pytest

from kvmpy import jail
from kvmpy.jail import JailConfig, JailError, SeccompAction


def _run_args(argv: list[str]) -> argparse.Namespace:
    from kvmpy.cli import _parser

    return _parser().parse_args(["run", *argv])


def test_every_allowed_name_is_a_system_call_of_this_architecture():
    import pyseccomp

    arch = pyseccomp.system_arch()
    for name in jail.allowed_syscalls():
        assert pyseccomp.resolve_syscall(arch, name) >= 0, name


def test_dangerous_calls_are_not_in_the_allow_list():
    allowed = set(jail.allowed_syscalls())
    for name in ("execve", "execveat", "fork", "vfork", "ptrace", "mount", "umount2", "pivot_root", "chroot",
                 "setuid", "setresuid", "setgid", "unshare", "setns", "kexec_load", "init_module", "bpf",
                 "perf_event_open", "process_vm_writev", "keyctl", "mknod", "mknodat", "chown", "kill"):
        assert name not in allowed, name


FILTER_PROBE = r"""
import errno, fcntl, json, os, socket, struct, sys, termios, threading
from kvmpy import jail
r, w = os.pipe()
jail.install_seccomp(jail.SeccompAction.ERRNO)
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as e:
        return errno.errorcode[e.errno]
def thread():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
out = {
    "socket AF_UNIX": attempt(lambda: socket.socket(socket.AF_UNIX).close()),
    "socket AF_INET": attempt(lambda: socket.socket(socket.AF_INET).close()),
    "socket AF_NETLINK": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
    "thread": attempt(thread),
    "fork": attempt(lambda: os.fork() or None),
    "execve": attempt(lambda: os.execv("/bin/true", ["true"])),
    "ioctl FIONREAD": attempt(lambda: fcntl.ioctl(r, termios.FIONREAD, b"    ")),
    "ioctl SIOCGIFCONF": attempt(lambda: fcntl.ioctl(r, 0x8912, b"\0" * 16)),
    "kill": attempt(lambda: os.kill(os.getpid(), 0)),
    "pipe": attempt(os.pipe),
}
sys.stdout.write(json.dumps(out))
"""


def test_the_filter_allows_threads_unix_sockets_and_kvm_style_ioctls_only():
    """The real filter (ERRNO mode), loaded in a child process: what passes, what gets EPERM."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FILTER_PROBE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "socket AF_UNIX": "allowed", "socket AF_INET": "EPERM", "socket AF_NETLINK": "EPERM",
        "thread": "allowed",  # clone3 answers ENOSYS, glibc falls back to clone with CLONE_THREAD
        "fork": "EPERM", "execve": "EPERM", "ioctl FIONREAD": "allowed", "ioctl SIOCGIFCONF": "EPERM",
        "kill": "EPERM", "pipe": "EPERM"}


def test_kill_mode_kills_the_process_with_sigsys():
    import signal
    import subprocess
    import sys

    code = "from kvmpy import jail; import os; jail.install_seccomp(); os.execv('/bin/true', ['true'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGSYS


def test_config_refuses_root_unknown_devices_and_tiny_limits():
    with pytest.raises(JailError, match="uid/gid 0"):
        JailConfig(uid=0).validate()
    with pytest.raises(JailError, match="unknown"):
        JailConfig(devices=("kvm", "sda")).validate()
    with pytest.raises(JailError, match="pids_max"):
        JailConfig(pids_max=2).validate()
    with pytest.raises(JailError, match="memory_max"):
        JailConfig(memory_max=1 << 20).validate()
    JailConfig().validate()


def test_jail_options_are_stripped_and_images_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vmlinux").write_bytes(b"")
    (tmp_path / "d.img").write_bytes(b"")
    argv = ["run", "--kernel", "vmlinux", "--jail", "--jail-uid", "1234", "--jail-mem=512M", "--disk", "d.img,ro",
            "--quirks", "none"]
    args = _run_args(argv[1:])
    out = jail.vmm_argv(argv, args, tmp_path / "vmlinux", None)
    assert out == ["run", "--kernel", str(tmp_path / "vmlinux"), "--disk", f"{tmp_path / 'd.img'},ro",
                   "--quirks", "none"]
    binds = jail.vmm_binds(args, tmp_path / "vmlinux", None)
    assert [(b.path, b.read_only) for b in binds] == [(str(tmp_path / "vmlinux"), True),
                                                       (str(tmp_path / "d.img"), True)]


def test_writable_disk_is_bound_read_write():
    args = _run_args(["--disk", "/tmp/x.img"])
    binds = jail.vmm_binds(args, jail.Path("/k"), None)
    assert (binds[-1].path, binds[-1].read_only) == ("/tmp/x.img", False)


def test_config_from_args_follows_the_devices_asked_for():
    c = jail.config_from_args(_run_args(["--jail", "--mem", "256M", "--rng"]))
    assert c.devices == ("kvm", "urandom") and c.new_net and c.memory_max == (256 << 20) + jail.MEMORY_OVERHEAD
    c = jail.config_from_args(_run_args(["--jail", "--net", "tap", "--jail-uid", "4242", "--jail-seccomp", "errno"]))
    assert "net/tun" in c.devices and not c.new_net and c.uid == 4242 and c.seccomp is SeccompAction.ERRNO


def test_cgroup_without_any_hierarchy_is_a_warning_not_an_error(tmp_path):
    cg = jail.Cgroup.create("x", 1 << 30, 64, root=tmp_path)
    assert cg.version == 0 and cg.dirs == [] and "not applied" in cg.warning


def test_cgroup_v1_layout_gets_one_directory_per_controller(tmp_path):
    for c in ("memory", "pids"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "cgroup.procs").write_text("")
    cg = jail.Cgroup.create("vm1", 300 << 20, 20, root=tmp_path)
    assert cg.version == 1 and {d.parent.name for d in cg.dirs} == {"memory", "pids"}
    assert (tmp_path / "memory/kvmpy-vm1/memory.limit_in_bytes").read_text() == str(300 << 20)
    assert (tmp_path / "pids/kvmpy-vm1/pids.max").read_text() == "20"

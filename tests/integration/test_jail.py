"""kvmpy.jail on the real host: namespaces, private root, cgroup limits, uid drop and the seccomp filter.

Each test runs tests/jail_probe.py in a fresh jail: it opens /dev/kvm and
makes a VM as the VMM does, locks itself down, reports, waits for a line,
then tries one thing the filter must refuse (or allow). The test inspects
/proc/<pid> of the jailed process from outside while it waits.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kvmpy.jail import Bind, JailConfig, JailedProcess, SeccompAction, SeccompViolation

pytestmark = pytest.mark.kvm

TESTS = Path(__file__).resolve().parent.parent
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts")

if os.geteuid() != 0:
    pytest.skip("the jail needs root", allow_module_level=True)


DEFAULT_JAIL = JailConfig()  # frozen: one shared default is safe


def _probe(action: str, *extra: str, config: JailConfig = DEFAULT_JAIL, binds=()) -> JailedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return JailedProcess(config, "jail_probe:main", [action, *extra], binds, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _report(jp: JailedProcess) -> dict:
    line = jp.proc.stdout.readline()
    if not line:
        jp.wait(30)  # raises SeccompViolation if the filter killed the probe
    assert line, jp.proc.stderr.read().decode()
    return json.loads(line)


def _go(jp: JailedProcess) -> None:
    jp.proc.stdin.write(b"go\n")
    jp.proc.stdin.flush()


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def test_inet_socket_after_lock_down_kills_the_process_and_names_the_call():
    with _probe("socket-inet") as jp:
        info = _report(jp)
        assert info["api_from_new_thread"] == 12  # KVM ioctls pass the filter, also from a new thread
        _go(jp)
        with pytest.raises(SeccompViolation, match=r"socket \(41\)") as e:
            jp.wait(30)
        assert e.value.syscall.startswith("socket")
        assert jp.proc.stdout.read() == b""  # it never got to report an outcome


def test_a_thread_started_before_the_filter_is_covered_too():
    with _probe("execve", "old-thread") as jp:
        _report(jp)
        _go(jp)
        with pytest.raises(SeccompViolation, match="execve"):
            jp.wait(30)


def test_errno_mode_fails_forbidden_calls_with_eperm_and_keeps_running():
    config = JailConfig(seccomp=SeccompAction.ERRNO)
    for action, expected in (("execve", "EPERM"), ("socket-inet", "EPERM"), ("fork", "EPERM"),
                             ("setuid-root", "EPERM"), ("socket-unix", "allowed")):
        with _probe(action, config=config) as jp:
            _report(jp)
            _go(jp)
            outcome = json.loads(jp.proc.stdout.readline())
            assert jp.wait(30) == 0
        assert outcome == {"action": action, "outcome": expected}


def test_the_process_runs_unprivileged_as_pid_1_of_its_own_namespaces():
    with _probe("none") as jp:
        info = _report(jp)
        status = _status(jp.pid)
        assert info["uid"] == info["gid"] == 65534 and info["pid"] == 1
        assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
        assert status["Groups"].strip() == ""
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"  # 2: filter mode
        assert status["NSpid"].split() == [str(jp.pid), "1"]
        assert info["hostname"] == "kvmpy-jail"
        for ns in NAMESPACES:
            assert os.readlink(f"/proc/{jp.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        _go(jp)
        assert jp.wait(30) == 0


def test_the_network_namespace_is_the_hosts_when_a_tap_is_wanted():
    with _probe("none", config=JailConfig(new_net=False, devices=("kvm", "net/tun"))) as jp:
        _report(jp)
        assert os.readlink(f"/proc/{jp.pid}/ns/net") == os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{jp.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        _go(jp)
        jp.wait(30)


def test_a_tap_made_before_the_drop_is_closed_and_gone_after_it():
    from kvmpy.net.tap import link_exists

    name = f"kvmpyj{os.getpid() % 100000}"
    with _probe(f"tap={name}", config=JailConfig(new_net=False, devices=("kvm", "net/tun"))) as jp:
        _report(jp)
        assert link_exists(name)
        _go(jp)
        assert json.loads(jp.proc.stdout.readline()) == {"action": "close-tap", "outcome": "allowed"}
        assert not link_exists(name)  # while the jailed process still runs
        _go(jp)
        assert jp.wait(30) == 0


def test_the_root_holds_only_the_listed_devices_and_binds(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    writable = tmp_path / "rw.img"
    writable.write_bytes(b"\0" * 4096)
    with _probe("open-host-file", binds=[Bind(str(image)), Bind(str(writable), read_only=False)]) as jp:
        info = _report(jp)
        root = Path(f"/proc/{jp.pid}/root")
        found = set()
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            if rel == "proc":
                dirnames[:] = []  # the jail's own procfs
                continue
            found.update(os.path.normpath(os.path.join(rel, f)) for f in filenames)
        assert found == {"dev/kvm", str(image).lstrip("/"), str(writable).lstrip("/")}
        assert set(info["root"]) == {"dev", "proc", "run", "tmp", str(tmp_path).split("/")[1]}
        mounts = {line.split()[4]: line.split()[5] for line in Path(f"/proc/{jp.pid}/mountinfo").read_text()
                  .splitlines()}
        assert mounts[str(image)].startswith("ro") and mounts[str(writable)].startswith("rw")
        assert mounts["/proc"].startswith("ro")
        kvm = os.stat(root / "dev/kvm")
        assert (kvm.st_uid, kvm.st_gid, kvm.st_mode & 0o777) == (65534, 65534, 0o600)
        _go(jp)
        assert json.loads(jp.proc.stdout.readline())["outcome"] == "ENOENT"  # the host's /etc is not there
        jp.wait(30)


def test_cgroup_limits_are_applied_and_the_cgroup_removed_after():
    config = JailConfig(memory_max=300 << 20, pids_max=20)
    with _probe("none", config=config) as jp:
        _report(jp)
        if jp.cgroup.version == 0:
            pytest.skip(jp.cgroup.warning)
        assert jp.cgroup.limits() == {"memory": 300 << 20, "pids": 20}
        cgroups = Path(f"/proc/{jp.pid}/cgroup").read_text()
        assert f"kvmpy-{jp.id}" in cgroups
        dirs = list(jp.cgroup.dirs)
        _go(jp)
        jp.wait(30)
    assert dirs and not any(d.exists() for d in dirs)
    assert not jp.dir.exists()


def test_a_killed_launcher_takes_its_vmm_along_and_the_next_start_removes_its_jail():
    """SIGKILL the launcher: the VMM dies with it (PDEATHSIG); its cgroup and directory go at the next start."""
    import signal
    import sys
    import textwrap
    import time

    code = textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {str(TESTS)!r})
        from kvmpy.jail import JailConfig, JailedProcess
        env = dict(os.environ, PYTHONPATH={str(TESTS)!r} + os.pathsep + os.environ.get("PYTHONPATH", ""))
        jp = JailedProcess(JailConfig(), "jail_probe:main", ["none"], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
        jp.proc.stdout.readline()
        print(jp.id, jp.pid, flush=True)
        jp.proc.wait()
    """)
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    jail_id, vmm = launcher.stdout.readline().split()
    vmm_pid = int(vmm)
    assert Path(f"/proc/{vmm_pid}").exists()
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{vmm_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{vmm_pid}").exists(), "the jailed VMM outlived its launcher"
    stale = Path("/run/kvmpy-jail") / jail_id.decode()
    assert stale.exists()  # nobody was left to clean it...
    with _probe("none") as jp:  # ...until the next jail starts
        _report(jp)
        assert jail_id.decode() in jp.stale_removed
        assert not stale.exists()
        assert not list(Path("/sys/fs/cgroup").glob(f"*/kvmpy-{jail_id.decode()}"))
        _go(jp)
        jp.wait(30)

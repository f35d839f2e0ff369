"""A stand-in VMM for tests/integration/test_jail.py, run inside a kvmpy jail (entry "jail_probe:main").

Like the VMM it opens /dev/kvm and creates a VM and a vCPU as root, then
calls `kvmpy.jail.lock_down()`; after that it proves KVM ioctls still work
(from the main thread and from a thread started after the filter), prints
one JSON line about itself, waits for a line on stdin (the test inspects
/proc/<pid> meanwhile), then does what argv[0] names, from the main thread
or (argv[1] == "old-thread") from a thread that existed before the filter.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

import kvmpy
from kvmpy import jail


def _attempt(action: str) -> str:
    try:
        if action == "socket-inet":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        elif action == "socket-unix":
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        elif action == "execve":
            os.execv("/bin/sh", ["sh", "-c", "true"])
        elif action == "fork":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        elif action == "open-host-file":
            open("/etc/passwd").close()
        elif action == "setuid-root":
            os.setuid(0)
        elif action == "none":
            pass
        else:
            return f"unknown action {action}"
        return "allowed"
    except OSError as e:
        import errno

        return errno.errorcode.get(e.errno, str(e.errno))


def main(argv: list[str]) -> int:
    action = argv[0]
    from_old_thread = len(argv) > 1 and argv[1] == "old-thread"
    kvm = kvmpy.Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu()
    go = threading.Event()
    result: dict[str, str] = {}
    old = threading.Thread(target=lambda: (go.wait(), result.setdefault("old", _attempt(action))), daemon=True)
    old.start()  # a thread from before the filter: TSYNC must cover it too
    hostname = socket.gethostname()  # uname(2) is not on the VMM's list
    machine = None
    if action.startswith("tap="):  # a TAP-backed NIC made as root, as the VMM's machine has it
        from types import SimpleNamespace

        from kvmpy.devices.virtio.net import NetDevice
        from kvmpy.net.tap import Tap

        tap = Tap(action[4:])
        machine = SimpleNamespace(config=SimpleNamespace(devices=[NetDevice(tap.fd, owner=tap)]))
    jail.lock_down()
    after: dict[str, int] = {}
    t = threading.Thread(target=lambda: after.setdefault("api", kvm.get_api_version()))
    t.start()
    t.join()
    info = {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "hostname": hostname,
            "api_from_new_thread": after.get("api"), "vcpu": vcpu.id, "root": sorted(os.listdir("/"))}
    print(json.dumps(info), flush=True)
    sys.stdin.readline()
    if machine is not None:  # closing the NIC after the uid drop: no netlink, no EPERM
        machine.config.devices[0].close()
        print(json.dumps({"action": "close-tap", "outcome": "allowed"}), flush=True)
        sys.stdin.readline()
        return 0
    if from_old_thread:
        go.set()
        old.join()
        outcome = result["old"]
    else:
        outcome = _attempt(action)
    print(json.dumps({"action": action, "outcome": outcome}), flush=True)
    return 0

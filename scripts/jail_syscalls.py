"""Measure the system calls a jailed VMM makes once its seccomp filter is in, and compare with the allow-list.

    scripts/jail_syscalls.py [--boot-wait 200] [--strace-log FILE]

Boots kvmpy's guest with `kvmpy run --jail --jail-seccomp log` under
`strace -f` (log mode: nothing is refused, so the whole run is seen), waits
for the shell, types a command, powers off. kvmpy.jail stat()s a marker path
just before it loads the filter; every call made by any thread after that
line is what the running VMM needs. Prints a table of those calls with their
counts and flags any that kvmpy.jail.ALLOWED_SYSCALLS lacks (exit status 1
then). With --strace-log it only parses an existing log.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmpy import jail  # noqa: E402

LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")
RESULT = re.compile(r"= (\d+)(?: <[^>]*>)?$")


def parse(log: Path) -> tuple[collections.Counter, int]:
    """(calls the VMM's threads made after the filter went in, by name; lines before it).

    strace -f also follows the launcher and the relay. The VMM is the process
    that stat()ed the marker; its threads are the pids first seen after it
    that never execve (strace prints host pids, while clone inside the jail's
    pid namespace returns the namespace's, so clone results cannot be used).
    """
    first_seen: dict[int, int] = {}
    execs: set[int] = set()
    events: list[tuple[int, str]] = []
    vmm: int | None = None
    loaded = False
    before = 0
    with open(log, errors="replace") as f:
        for n, line in enumerate(f):
            m = LINE.match(line)
            if not m:
                continue
            pid, name = int(m.group(1)), m.group(3) or m.group(2)
            first_seen.setdefault(pid, n)
            if name == "execve":
                execs.add(pid)
            if vmm is None:
                before += 1
                if jail.SECCOMP_MARKER in line:
                    vmm = pid
                continue
            if not loaded:  # libseccomp's own calls, up to the filter load, are not the VMM's
                loaded = m.group(3) == "seccomp" and pid == vmm
                continue
            if m.group(3):  # count a call where it starts, not where it resumes
                events.append((pid, name))
    if vmm is None:
        raise SystemExit(f"{log}: no line with the marker {jail.SECCOMP_MARKER}: was the filter ever installed?")
    ours = {p for p, n in first_seen.items() if p == vmm or (n > first_seen[vmm] and p not in execs)}
    return collections.Counter(name for pid, name in events if pid in ours), before


def measure(log: Path, boot_wait: float, run_args: list[str], command: str) -> None:
    cmd = ["strace", "-f", "-qq", "-o", str(log), sys.executable, "-m", "kvmpy.cli", "run", "--jail",
           "--jail-seccomp", "log", "--timeout", str(boot_wait + 200), *run_args]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    buf = b""
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + boot_wait
    typed = False
    while proc.poll() is None:
        try:
            buf += proc.stdout.read() or b""
        except BlockingIOError:
            pass
        if not typed and (b"/ # " in buf or time.monotonic() > deadline):
            proc.stdin.write(f"{command}; echo jailed-$((6*7))\n".encode())
            proc.stdin.flush()
            time.sleep(60)
            proc.stdin.write(b"poweroff -f\n")
            proc.stdin.flush()
            typed = True
        time.sleep(0.5)
    print(f"kvmpy run --jail exited {proc.returncode}; saw the command's output: {b'jailed-42' in buf}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strace-log", type=Path, help="parse this log instead of measuring")
    p.add_argument("--boot-wait", type=float, default=400, help="seconds to wait for the shell")
    p.add_argument("--run-args", default="", help="more `kvmpy run` options, e.g. '--disk IMG --rng'")
    p.add_argument("--guest-command", default="true", help="a shell command for the guest before power-off")
    args = p.parse_args()
    log = args.strace_log
    if log is None:
        log = Path("/tmp/kvmpy-jail-syscalls.strace")
        measure(log, args.boot_wait, args.run_args.split(), args.guest_command)
    counts, before = parse(log)
    allowed = set(jail.allowed_syscalls())
    group_of = {n: g for g, names in jail.ALLOWED_SYSCALLS.items() for n in names}
    group_of["clone3"] = "answered ENOSYS by the filter: glibc falls back to clone"
    print(f"{before} strace lines before the filter (imports, set-up); after it:")
    print(f"{'system call':<20} {'calls':>9}  group")
    for name, n in counts.most_common():
        print(f"{name:<20} {n:>9}  {group_of.get(name, 'MISSING from ALLOWED_SYSCALLS')}")
    missing = sorted(set(counts) - allowed - {"clone3"})  # clone3 is answered ENOSYS on purpose
    unused = sorted(allowed - set(counts))
    print(f"used {len(counts)}, allowed {len(allowed)}, missing {missing}, allowed but unused here {unused}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Boot milestones of the minimal Linux guest: kvmpy, and QEMU's microvm in the same run.

Both VMMs boot the same kernel (kvmpy's vmlinux), initramfs and command line
and the script timestamps the console: first byte, the kernel banner,
"Run /init", init's marker (user space), and the end. QEMU (if installed)
runs `-M microvm` with KVM and the vmlinux's PVH entry; on the PVM backend
it has no userspace instruction assists, so the table records how far it
gets. `--update-docs` writes the table into docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import selectors
import shutil
import subprocess
import sys
import time

from perfdoc import update_section

from kvmpy.boot.initramfs import INIT_MARKER, build_busybox_initramfs
from kvmpy.guest.build import build_kernel
from kvmpy.machine import DEFAULT_CMDLINE
from kvmpy.platform import detect_backend, resolve_quirks

HEADING = "## Linux boot milestones (scripts/bench_boot.py)"
MILESTONES = [
    ("first console byte", b""),
    ("kernel banner", b"Linux version"),
    ("both CPUs up", b"smp: Brought up"),
    ("Run /init", b"Run /init as init process"),
    ("user space (init marker)", INIT_MARKER.encode()),
]
# Printed by kvmpy's default init's shell; typed `poweroff -f` ends the VM.
PROMPT = b"# "


def timeline(cmd: list[str], timeout: float, *, poweroff: bool) -> tuple[dict[str, float], float | None, str]:
    """Seconds from process start to each milestone; seconds to exit (None if killed)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = bytearray()
    seen: dict[str, float] = {}
    typed = False
    deadline = t0 + timeout
    try:
        while time.monotonic() < deadline:
            events = sel.select(0.5)
            if not events and proc.poll() is not None:
                break
            for key, _ in events:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf += chunk
                now = time.monotonic() - t0
                for name, marker in MILESTONES:
                    if name not in seen and (marker in buf if marker else buf):
                        seen[name] = now
            if poweroff and not typed and INIT_MARKER.encode() in buf and PROMPT in buf.split(INIT_MARKER.encode())[-1]:
                proc.stdin.write(b"poweroff -f\n")
                proc.stdin.flush()
                typed = True
            if proc.poll() is not None and not sel.get_map():
                break
        ended = time.monotonic() - t0 if proc.poll() is not None else None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return seen, ended, buf.decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--no-qemu", action="store_true")
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args(argv)

    kernel = build_kernel(progress=False)
    initrd = build_busybox_initramfs()
    quirks = resolve_quirks("auto")
    cmdline = " ".join(w for w in (DEFAULT_CMDLINE, quirks.cmdline) if w)
    runs: list[tuple[str, dict[str, float], float | None, str]] = []

    kvmpy_cmd = [sys.executable, "-m", "kvmpy.cli", "run", "--quiet", "--kernel", str(kernel.vmlinux),
                 "--initrd", str(initrd), "--cpus", str(args.cpus), "--mem", "128M", "--timeout", str(args.timeout)]
    seen, ended, log = timeline(kvmpy_cmd, args.timeout + 10, poweroff=True)
    runs.append(("kvmpy", seen, ended, log))

    qemu = shutil.which("qemu-system-x86_64")
    if qemu and not args.no_qemu:
        # Default CPU model: "-cpu host" fails here setting MSR 0x10a (ARCH_CAPABILITIES).
        qemu_cmd = [qemu, "-M", "microvm", "-enable-kvm", "-m", "128M", "-smp", str(args.cpus),
                    "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                    "-kernel", str(kernel.vmlinux), "-initrd", str(initrd), "-append", cmdline]
        seen, ended, log = timeline(qemu_cmd, args.timeout, poweroff=True)
        runs.append(("QEMU microvm", seen, ended, log))

    names = [n for n, _ in MILESTONES] + ["VM ended (poweroff)"]
    header = "| milestone | " + " | ".join(r[0] for r in runs) + " |"
    lines = [header, "| --- |" + " --- |" * len(runs)]
    for name in names:
        cells = []
        for _, seen, ended, _ in runs:
            value = ended if name.startswith("VM ended") else seen.get(name)
            cells.append(f"{value:.1f} s" if value is not None else "not reached")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    for name, seen, _, log in runs:
        if "user space (init marker)" not in seen:
            print(f"\n{name}: last console lines:\n" + "\n".join(log.splitlines()[-5:]))
    if args.update_docs:
        notes = []
        for name, seen, _, log in runs:
            if "user space (init marker)" not in seen:
                lines = [line.strip() for line in log.splitlines() if line.strip()]
                errors = [line for line in lines if "error" in line.lower()]
                shown = (errors or lines)[-2:]
                notes.append(f"- {name} stopped after: `{' / '.join(t[:150] for t in shown)}`")
        section = (f"{HEADING}\n\nMeasured {datetime.date.today()} on backend `{detect_backend().value}`, "
                   f"{args.cpus} vCPUs, 128 MiB, kvmpy's kernel ({kernel.version}) and busybox initramfs, "
                   "times from process start.\n\n" + table + "\n\n" + "\n".join(notes) + "\n")
        update_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

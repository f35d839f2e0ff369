"""The `kvmpy` command: run a Linux guest, build the guest artifacts, describe the host.

    kvmpy run [--kernel K] [--initrd I] [--cmdline ...] [--mem 128M] [--cpus N]
    kvmpy build-guest
    kvmpy info
    kvmpy lab [NAME] [--quick] [--json] [--plot DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import select
import signal
import sys
import termios
import threading
import tty
from pathlib import Path
from typing import Callable, Sequence

from .errors import KvmError
from .machine import (DEFAULT_CMDLINE, ConfigError, DiskConfig, Machine, MachineConfig, ModuleConfig, NetConfig,
                      Outcome, VsockConfig, build)
from .platform import detect_backend, resolve_quirks
from . import kut
from .stats import stat_cli
from .lab import cli as lab_cli

ESCAPE = 0x01  # Ctrl-A, then 'x' quits (as in QEMU)

RUN_EPILOG = """\
With no --kernel, kvmpy builds (once, cached) its own micro-VM kernel from
Debian's linux-source and a busybox initramfs, and boots those.

The console is the guest's COM1 on your terminal. Press Ctrl-A then x to
stop the VM. Exit status: 0 guest powered off, 1 error, 3 guest rebooted
(the VM stops instead of restarting), 4 guest kernel panic, 130 stopped
from the host (Ctrl-A x, Ctrl-C, --timeout), and (code << 1) | 1 when the
guest wrote code to --debug-exit, as QEMU.

Host quirks: kvmpy completes instructions KVM failed to emulate (on any
host; this only happens where KVM's emulator has gaps); on a software KVM
backend (PVM) it also adds command-line feature masks and routes guest
syscalls. --quirks none turns all of it off; --quirks pvm forces the PVM set.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmpy", description="A thin hypervisor in Python on Linux KVM.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a Linux guest with its console on this terminal",
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--kernel", type=Path, help="bzImage or ELF vmlinux (default: the built guest kernel)")
    run.add_argument("--initrd", type=Path, help="initramfs (default: the built busybox initramfs)")
    run.add_argument("--cmdline", default=DEFAULT_CMDLINE,
                     help="kernel command line (default: %(default)r)")
    run.add_argument("--append", default="", help="words added to the command line")
    run.add_argument("--mem", default="128M", help="guest memory, e.g. 256M or 1G (default: %(default)s)")
    run.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default: %(default)s)")
    run.add_argument("--entry", choices=["auto", "linux64", "pvh", "multiboot"], default="auto",
                     help="boot protocol (default: multiboot for a multiboot-only kernel, else Linux's "
                          "64-bit entry; pvh for a vmlinux's PVH entry)")
    run.add_argument("--module", action="append", default=[], metavar="FILE[,STRING]",
                     help="a multiboot module, with its command-line string (repeatable)")
    for name, what in (("debug-exit", "isa-debug-exit at 0xf4: the VM ends with status (code << 1) | 1"),
                       ("testdev", "QEMU's pc-testdev ports and MMIO buffer"),
                       ("fw-cfg", "QEMU's fw_cfg at 0x510 (signature, RAM size, CPU count)"),
                       ("acpi", "ACPI RSDP/RSDT/FADT tables and a PM timer")):
        run.add_argument(f"--{name}", dest="test_devices", action="append_const", const=name, default=[],
                         help=f"test device: {what}")
    run.add_argument("--quirks", choices=["auto", "pvm", "none"], default="auto",
                     help="host workarounds: detect (auto), force the PVM set, or none")
    run.add_argument("--disk", action="append", default=[], metavar="IMG[,ro]",
                     help="a virtio-blk disk on a raw image (repeatable; the first is /dev/vda)")
    run.add_argument("--net", action="append", default=[], metavar="tap[=NAME][,ip=A/P][,mac=M][,bridge=B]",
                     help="a virtio-net NIC on a TAP device kvmpy creates (repeatable; removed at exit)")
    run.add_argument("--vsock", metavar="CID[,backend=auto|vhost|userspace]",
                     help="a virtio-vsock device with this guest CID; host side: the kernel's vhost-vsock "
                          "(AF_VSOCK) when /dev/vhost-vsock exists, else AF_UNIX sockets (default: auto)")
    run.add_argument("--rng", action="store_true", help="a virtio-rng device fed from the host's urandom")
    run.add_argument("--share", action="append", default=[], metavar="HOSTDIR[=TAG][,ro]",
                     help="a host directory over virtio-fs (virtiofsd); in the guest: mount -t virtiofs TAG DIR "
                          "(TAG defaults to the directory's name; repeatable)")
    run.add_argument("--timeout", type=float, help="stop the VM after this many seconds")
    run.add_argument("--quiet", action="store_true", help="no kvmpy messages on stderr")

    sub.add_parser("build-guest", help="build the micro-VM kernel and busybox initramfs (cached)")
    sub.add_parser("info", help="show the KVM backend, quirks and key capabilities")
    stat_cli.add_parser(sub)
    kut.add_parser(sub)
    lab_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "build-guest":
            return cmd_build_guest()
        if args.command == "stat":
            return stat_cli.run(args)
        if args.command == "kvm-unit-tests":
            return kut.run(args)
        if args.command == "lab":
            return lab_cli.run(args)
        return cmd_info()
    except KvmError as e:  # every user error kvmpy finds is one of these: one line, status 1
        print(f"kvmpy: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # what the system refused (a file, a device node) that kvmpy did not wrap
        print(f"kvmpy: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1


def default_guest(progress: bool = True) -> tuple[Path, Path]:
    """(vmlinux, initramfs) of kvmpy's own guest, building them if needed."""
    from .boot.initramfs import build_busybox_initramfs
    from .guest.build import build_kernel

    kernel = build_kernel(progress=progress)
    return kernel.vmlinux, build_busybox_initramfs()


def cmd_build_guest() -> int:
    vmlinux, initrd = default_guest()
    print(f"kernel:    {vmlinux}\ninitramfs: {initrd}")
    return 0


def cmd_info() -> int:
    from .kvm import Capability, Kvm

    backend = detect_backend()
    print(f"backend: {backend.value}")
    print(f"quirks:  {resolve_quirks('auto').describe()}")
    with Kvm() as kvm:
        print(f"KVM API version {kvm.get_api_version()}")
        for cap in ("IRQCHIP", "PIT2", "IRQFD", "IOEVENTFD", "SIGNAL_MSI", "IRQ_ROUTING", "READONLY_MEM",
                    "SYNC_REGS", "X86_USER_SPACE_MSR", "BINARY_STATS_FD", "DIRTY_LOG_RING", "NR_VCPUS",
                    "MAX_VCPUS", "NR_MEMSLOTS"):
            print(f"  KVM_CAP_{cap:<20} {kvm.check_extension(Capability[cap])}")
    return 0


def run_config(args: argparse.Namespace) -> MachineConfig:
    """The `MachineConfig` of `kvmpy run`'s arguments, validated (the kernel may still be missing)."""
    cmdline = " ".join(w for w in (args.cmdline, args.append) if w)
    config = MachineConfig(
        kernel=args.kernel, initrd=args.initrd, cmdline=cmdline, memory=args.mem, vcpus=args.cpus,
        quirks=args.quirks, entry=args.entry, disks=tuple(DiskConfig.parse(d) for d in args.disk),
        nets=tuple(NetConfig.parse(n) for n in args.net),
        vsock=None if args.vsock is None else VsockConfig.parse(args.vsock), rng=args.rng, shares=tuple(args.share),
        modules=tuple(ModuleConfig.parse(m) for m in args.module), test_devices=tuple(args.test_devices))
    try:
        return config.validate(kernel_optional=True)
    except ConfigError as e:  # name the option, not the config field
        raise ConfigError(str(e).replace("vcpus:", "--cpus:").replace("memory:", "--mem:")) from None


def cmd_run(args: argparse.Namespace) -> int:
    config = run_config(args)  # every argument is checked before anything is built
    if config.kernel is None:
        built_kernel, built_initrd = default_guest(progress=not args.quiet)
        config = dataclasses.replace(config, kernel=built_kernel, initrd=config.initrd or built_initrd)
    machine = build(config, console=_console_writer())
    if not args.quiet:
        print(f"kvmpy: {Path(str(config.kernel)).name}, {args.mem} RAM, {config.vcpus} vCPU(s), "
              f"{machine.quirks.describe()}; Ctrl-A x quits", file=sys.stderr)
    with machine, _Console(machine) as console:
        machine.start()
        outcome = _wait(machine, args.timeout, console)
    if not args.quiet:
        print(f"\r\nkvmpy: guest {outcome.status.value}" + (f": {outcome.detail}" if outcome.detail else ""),
              file=sys.stderr)
    return outcome.exit_code


def _wait(machine: Machine, timeout: float | None, console: "_Console") -> Outcome:
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        waited = 0.0
        while True:
            outcome = machine.wait(0.1)
            if outcome is not None:
                return outcome
            waited += 0.1
            if stop.is_set() or console.quit.is_set():
                return machine.stop("stopped from the host")
            if timeout is not None and waited >= timeout:
                return machine.stop(f"timeout after {timeout:g} s")
    finally:
        signal.signal(signal.SIGINT, previous)


def _console_writer() -> Callable[[bytes], None]:
    """Guest console bytes to our stdout, unbuffered (through the fd when there is one)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # a stdout without an fd (captured, redirected in-process)
        def write(b: bytes) -> None:
            sys.stdout.buffer.write(b)
            sys.stdout.flush()
        return write
    return lambda b: _write_all(fd, b)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


class _Console:
    """Host stdin -> guest COM1: raw mode on a terminal (restored on exit), Ctrl-A x quits."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.quit = threading.Event()
        self._fd = sys.stdin.fileno() if sys.stdin is not None and not sys.stdin.closed else -1
        self._saved: list | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Console:
        if self._fd < 0:
            return self
        if os.isatty(self._fd):
            self._saved = termios.tcgetattr(self._fd)
            tty.setraw(self._fd)
        self._thread = threading.Thread(target=self._pump, name="console-input", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        escape = False
        while not self.quit.is_set() and not self.machine.finished:
            try:
                ready, _, _ = select.select([self._fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(self._fd, 256)
            except OSError:
                return
            if not data:
                return  # EOF on stdin: keep the guest running, stop reading
            out = bytearray()
            for byte in data:
                if escape:
                    escape = False
                    if byte in (ord("x"), ord("X")):
                        self.quit.set()
                        return
                    if byte != ESCAPE:
                        out.append(ESCAPE)
                elif byte == ESCAPE:
                    escape = True
                    continue
                out.append(byte)
            view = bytes(out)
            while view and not self.machine.finished:
                taken = self.machine.send_input(view)
                view = view[taken:]
                if view:
                    self.machine.serial.wait_for_rx_space(0.5)

    def __exit__(self, *exc: object) -> None:
        self.quit.set()
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)


if __name__ == "__main__":
    sys.exit(main())

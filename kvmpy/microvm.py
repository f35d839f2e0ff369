"""`MicroVM`: drive a Linux micro-VM from a script.

    from kvmpy import MicroVM, MicroVMConfig

    with MicroVM(MicroVMConfig(kernel="vmlinux", initrd="initramfs.cpio")) as vm:
        vm.start()
        vm.expect("# ", timeout=300)          # the shell prompt
        print(vm.run("uname -a"))              # a command's output
        vm.snapshot("snap/")                   # pause, save, resume
    clone = MicroVM.restore("snap/")           # milliseconds later, a second guest

Built on `kvmpy.machine.Machine` (which assembles the VM and runs the vCPU
threads); this layer adds an up-front validated config, a life cycle
(created -> running <-> paused -> stopped), console matching with
timeouts, outcomes as exceptions when asked, snapshots and restore
(`kvmpy/snapshot.py`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .devices.virtio.attach import devices_from_config
from .devices.virtio.vsock import BACKENDS as VSOCK_BACKENDS
from .errors import KvmError
from .machine import DEFAULT_CMDLINE, Machine, MachineConfig, Outcome, Status, memory_problem
from .memory import parse_size
from .x86.mptable import max_cpus

MAX_CMDLINE = 2047
IFNAMSIZ = 16
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


class MicroVMError(KvmError):
    """Base of the errors `MicroVM` raises."""


class ConfigError(MicroVMError, ValueError):
    """A `MicroVMConfig` field is wrong; the message names the field and the fix."""


class VmStateError(MicroVMError):
    """The call does not fit the VM's state (e.g. `pause()` before `start()`)."""


class VmFailed(MicroVMError):
    """The guest ended badly (error or panic) or ended while a caller waited for text; `.outcome` says how."""

    def __init__(self, message: str, outcome: Outcome | None) -> None:
        super().__init__(message)
        self.outcome = outcome


class GuestPanic(VmFailed):
    """The guest kernel panicked ("Kernel panic - not syncing" on the console)."""


class ExpectTimeout(MicroVMError, TimeoutError):
    """`expect()` did not see its pattern in time; the message ends with the console's tail."""

    def __init__(self, pattern: str, timeout: float, tail: str) -> None:
        super().__init__(f"console did not show {pattern} within {timeout} s; last output:\n{tail}")
        self.pattern, self.timeout, self.tail = pattern, timeout, tail


# -- config ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskConfig:
    """A virtio-blk disk backed by a host file or block device."""

    path: Path
    read_only: bool = False


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net interface on a host TAP device (`tap` may be None: the machine creates one)."""

    tap: str | None = None
    mac: str | None = None
    host_address: str | None = None  # "ADDR/PREFIX" for the host end of the TAP, e.g. "172.30.0.1/24"


@dataclass(frozen=True)
class VsockConfig:
    """A virtio-vsock device with the guest's context ID.

    `backend`: "auto" (the kernel's vhost-vsock when /dev/vhost-vsock exists,
    else userspace), "vhost" (an error if it is missing) or "userspace"
    (AF_UNIX sockets, Firecracker's layout; the one that can be snapshotted).
    """

    cid: int
    backend: str = "auto"


def machine_supports(name: str) -> bool:
    """True when the machine can take `name`: a `MachineConfig` field, or disks/nets/vsock through `devices`."""
    fields = {f.name for f in dataclasses.fields(MachineConfig)}
    return name in fields or hasattr(MachineConfig, name) or (name in ("disks", "nets", "vsock")
                                                               and "devices" in fields)


@dataclass
class MicroVMConfig:
    """What to boot and on how much machine; `validate()` (run by `MicroVM`) checks every field."""

    kernel: str | os.PathLike[str]
    initrd: str | os.PathLike[str] | None = None
    cmdline: str = DEFAULT_CMDLINE
    memory: int | str = "256M"
    vcpus: int = 1
    disks: Sequence[DiskConfig | str | os.PathLike[str]] = field(default_factory=list)
    nets: Sequence[NetConfig | str] = field(default_factory=list)
    vsock: VsockConfig | int | None = None
    rng: bool = False  # a virtio-rng device (the guest's entropy from the host's urandom)
    quirks: str = "auto"

    def validate(self) -> None:
        """Normalize the fields in place, or raise `ConfigError` naming the first bad one."""
        for what in ("kernel", "initrd"):
            value = getattr(self, what)
            if value is None:
                if what == "kernel":
                    raise ConfigError("kernel: required (a vmlinux or bzImage path)")
                continue
            p = Path(value)
            if not p.is_file():
                raise ConfigError(f"{what} {str(p)!r}: no such file")
            if not os.access(p, os.R_OK):
                raise ConfigError(f"{what} {str(p)!r}: not readable by this user")
            setattr(self, what, p)
        if not isinstance(self.cmdline, str) or "\0" in self.cmdline:
            raise ConfigError("cmdline: must be a string without NUL bytes")
        if len(self.cmdline.encode()) > MAX_CMDLINE // 2:
            raise ConfigError(f"cmdline: {len(self.cmdline)} bytes; at most {MAX_CMDLINE // 2} leave room "
                              "for the words kvmpy adds (limit 2047 in all)")
        try:
            mem = parse_size(self.memory)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"memory: {e}") from None
        problem = memory_problem(mem)
        if problem:
            raise ConfigError(f"memory: {problem}")
        self.memory = mem
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= max_cpus():
            raise ConfigError(f"vcpus: {self.vcpus!r}; must be an integer from 1 to {max_cpus()}")
        if self.quirks not in ("auto", "pvm", "none"):
            raise ConfigError(f"quirks: {self.quirks!r}; one of 'auto', 'pvm', 'none'")
        self.disks = [self._disk(i, d) for i, d in enumerate(self.disks)]
        self.nets = [self._net(i, n) for i, n in enumerate(self.nets)]
        if self.vsock is not None:
            v = self.vsock if isinstance(self.vsock, VsockConfig) else VsockConfig(self.vsock)  # type: ignore[arg-type]
            if not isinstance(v.cid, int) or not 3 <= v.cid < 0xFFFF_FFFF:
                raise ConfigError(f"vsock: guest CID {v.cid!r}; 0-2 are reserved, use 3 to 2^32-2")
            if v.backend not in VSOCK_BACKENDS:
                raise ConfigError(f"vsock: backend {v.backend!r}; one of {', '.join(map(repr, VSOCK_BACKENDS))}")
            self.vsock = v
        for name in ("disks", "nets", "vsock"):
            if getattr(self, name) and not machine_supports(name):
                raise ConfigError(f"{name}: this kvmpy's machine has no {name} support yet "
                                  f"(MachineConfig has no {name!r} field); remove them from the config")

    @staticmethod
    def _disk(i: int, d: DiskConfig | str | os.PathLike[str]) -> DiskConfig:
        disk = d if isinstance(d, DiskConfig) else DiskConfig(Path(d))
        p = Path(disk.path)
        if not (p.is_file() or p.is_block_device()):
            raise ConfigError(f"disks[{i}] {str(p)!r}: no such file or block device")
        if not os.access(p, os.R_OK if disk.read_only else os.R_OK | os.W_OK):
            raise ConfigError(f"disks[{i}] {str(p)!r}: not {'readable' if disk.read_only else 'writable'}; "
                              "use DiskConfig(path, read_only=True) for a read-only disk")
        return DiskConfig(p, disk.read_only)

    @staticmethod
    def _net(i: int, n: NetConfig | str) -> NetConfig:
        net = n if isinstance(n, NetConfig) else NetConfig(tap=n)
        if net.tap is not None and not (0 < len(net.tap) < IFNAMSIZ and "/" not in net.tap
                                        and not any(c.isspace() for c in net.tap)):
            raise ConfigError(f"nets[{i}] tap {net.tap!r}: not a valid interface name (1-15 characters)")
        if net.mac is not None and not _MAC.match(net.mac):
            raise ConfigError(f"nets[{i}] mac {net.mac!r}: expected six hex bytes like 52:54:00:12:34:56")
        if net.host_address is not None:
            try:
                ipaddress.ip_interface(net.host_address)
            except ValueError:
                raise ConfigError(f"nets[{i}] host_address {net.host_address!r}: expected ADDR/PREFIX like "
                                  "172.30.0.1/24") from None
        return net

    def machine_config(self) -> MachineConfig:
        """The `MachineConfig`, its virtio devices already made (images open, TAPs created).

        Making them before any VM exists means a bad image or TAP fails
        first; whoever builds the `Machine` closes `devices` if that fails
        (`MicroVM.start` does).
        """
        mc = MachineConfig(kernel=Path(self.kernel), initrd=None if self.initrd is None else Path(self.initrd),
                           cmdline=self.cmdline, memory=self.memory, cpus=self.vcpus, quirks=self.quirks)
        mc.devices = devices_from_config(self.disks, self.nets, self.vsock, rng=self.rng)
        return mc


# -- the VM ----------------------------------------------------------------------------

class MicroVM:
    """A Linux micro-VM with a life cycle, console matching, snapshots and restore.

    States: "created" (validated, nothing allocated), "running", "paused",
    "stopped". `close()` (or leaving the `with` block) always frees the VM.
    `console_sink` receives every console byte as it arrives (e.g.
    sys.stdout.buffer.write).
    """

    def __init__(self, config: MicroVMConfig, *, console_sink: Callable[[bytes], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.console_sink = console_sink
        self.machine: Machine | None = None
        self.state = "created"
        self._cursor = 0  # expect() searches the console from here
        self._lock = threading.Lock()
        self.restore_seconds: float | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> MicroVM:
        """Build the machine (load the kernel) and start the vCPUs."""
        with self._lock:
            if self.state != "created":
                raise VmStateError(f"start(): the VM is {self.state}; start() runs once")
            mc = self.config.machine_config()
            try:
                self.machine = Machine(mc, console=self.console_sink)
            except BaseException:
                for dev in mc.devices:  # closing twice is harmless; Machine closes what it attached
                    dev.close()
                raise
            self.machine.start()
            self.state = "running"
        return self

    def pause(self) -> None:
        """Stop the vCPUs where they are (the guest's clock stops with them)."""
        m = self._need("pause", "running")
        m.pause()
        self.state = "paused"

    def resume(self) -> None:
        m = self._need("resume", "paused")
        m.resume()
        self.state = "running"

    def stop(self) -> Outcome:
        """Stop the guest from the host; returns its outcome (STOPPED unless it had ended)."""
        if self.machine is None:
            self.state = "stopped"
            return Outcome(Status.STOPPED, "never started")
        outcome = self.machine.stop()
        self.state = "stopped"
        return outcome

    def wait(self, timeout: float | None = None, *, check: bool = False) -> Outcome | None:
        """The guest's `Outcome` once it ends (power-off, reboot, panic, error); None on timeout.

        `check=True` raises `GuestPanic` / `VmFailed` for a panic or an error instead.
        """
        m = self.machine
        if m is None:
            raise VmStateError("wait(): the VM was never started")
        outcome = m.wait(timeout)
        if outcome is not None:
            self.state = "stopped"
            if check:
                self._raise_for(outcome)
        return outcome

    @property
    def outcome(self) -> Outcome | None:
        return None if self.machine is None else self.machine.wait(0)

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        self.state = "stopped"

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _need(self, what: str, *states: str) -> Machine:
        if self.state not in states or self.machine is None:
            raise VmStateError(f"{what}(): the VM is {self.state}, not {' or '.join(states)}")
        return self.machine

    @staticmethod
    def _raise_for(outcome: Outcome) -> None:
        if outcome.status is Status.PANIC:
            raise GuestPanic(f"guest kernel panic: {outcome.detail}", outcome)
        if outcome.status is Status.ERROR:
            raise VmFailed(f"VM stopped with an error: {outcome.detail}", outcome)

    # -- console --------------------------------------------------------------------

    @property
    def console_bytes(self) -> bytes:
        """Everything the guest printed on its console so far."""
        if self.machine is None:
            return b""
        with self.machine.console.cond:
            return bytes(self.machine.console.data)

    @property
    def console(self) -> str:
        return self.console_bytes.decode(errors="replace")

    def send(self, data: str | bytes) -> None:
        """Type `data` on the guest's console."""
        m = self._need("send", "running", "paused")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        while raw:
            taken = m.send_input(raw)
            raw = raw[taken:]
            if raw:
                m.serial.wait_for_rx_space(1.0)

    def sendline(self, line: str | bytes = "") -> None:
        self.send((line.encode() if isinstance(line, str) else line) + b"\n")

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 30.0) -> re.Match:
        """Wait until the console shows `pattern` (literal text, or a compiled regex) after the
        previous match; return the match (on text decoded as UTF-8, undecodable bytes escaped).

        Raises `ExpectTimeout`, `GuestPanic` if the kernel panics first, or
        `VmFailed` if the guest ends without printing it.
        """
        m = self._need("expect", "running", "paused", "stopped")
        if isinstance(pattern, re.Pattern):
            rx = pattern if isinstance(pattern.pattern, str) else re.compile(
                pattern.pattern.decode("utf-8", "surrogateescape"), pattern.flags & ~re.ASCII)
            shown = f"/{rx.pattern}/"
        else:
            text = pattern.decode("utf-8", "surrogateescape") if isinstance(pattern, bytes) else pattern
            rx, shown = re.compile(re.escape(text)), repr(text)
        deadline = time.monotonic() + timeout
        log = m.console
        with log.cond:
            while True:
                window = log.since(self._cursor).decode("utf-8", "surrogateescape")
                self._cursor = max(self._cursor, log.base)  # output older than the log keeps is gone
                found = rx.search(window)
                if found:
                    self._cursor += len(window[:found.end()].encode("utf-8", "surrogateescape"))
                    return found
                outcome = m.wait(0) if m.finished else None
                if outcome is not None:
                    self.state = "stopped"
                    self._raise_for(outcome)
                    raise VmFailed(f"guest ended ({outcome.status.value}: {outcome.detail}) before the console "
                                   f"showed {shown}", outcome)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExpectTimeout(shown, timeout, window[-2000:])
                log.cond.wait(min(left, 0.2))

    def run(self, command: str, *, prompt: str | re.Pattern = "# ", timeout: float = 60.0) -> str:
        """Type a shell command, wait for the next prompt, return what the command printed.

        Assumes a shell at `prompt` that echoes its input (a serial console does).
        """
        # Start and end markers, typed quoted in two halves: the shell's echo of the
        # line (which a line editor may wrap or decorate) never contains them whole.
        tag = f"__kvmpy_{time.monotonic_ns()}"
        self.sendline(f'echo "{tag}""_start__"; {command}; echo "{tag}""_end__"')
        self.expect(re.compile(re.escape(f"{tag}_start__") + r"\r?\n"), timeout)
        found = self.expect(re.compile(r"(.*?)" + re.escape(f"{tag}_end__") + r"\r?\n", re.S), timeout)
        self.expect(prompt, timeout)
        output = found.group(1)
        return output.replace("\r\n", "\n")

    # -- snapshots ---------------------------------------------------------------------

    def snapshot(self, directory: str | os.PathLike[str]) -> Path:
        """Save the VM's complete state to `directory`; a running VM pauses for it and resumes."""
        from .snapshot import take_snapshot

        m = self._need("snapshot", "running", "paused")
        was_running = self.state == "running"
        if was_running:
            self.pause()
        try:
            return take_snapshot(m, directory, meta={"expect_cursor": self._cursor})
        finally:
            if was_running:
                self.resume()

    @classmethod
    def restore(cls, snapshot: str | os.PathLike[str] | object, *, start: bool = True,
                console_sink: Callable[[bytes], None] | None = None) -> MicroVM:
        """A new VM continuing from `snapshot` (a directory or an opened `kvmpy.snapshot.Snapshot`).

        Memory is mapped copy-on-write from the snapshot, so many clones of
        one snapshot share it. With `start=False` the VM comes back paused.
        """
        from .snapshot import Snapshot, restore_machine

        snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.open(snapshot)  # type: ignore[arg-type]
        machine, report = restore_machine(snap, console=console_sink)
        c = snap.config
        self = cls.__new__(cls)
        self.config = MicroVMConfig(kernel=c["kernel"], initrd=c["initrd"], cmdline=c["cmdline"],
                                    memory=c["memory"], vcpus=c["cpus"], quirks=c["quirks"])
        self.config.disks, self.config.nets = [], []
        for dev, d in zip(machine.config.devices, c["virtio"]):  # what the clone has, its new TAPs included
            if d["kind"] == "blk":
                self.config.disks.append(DiskConfig(Path(d["path"]), d["read_only"]))
            elif d["kind"] == "net":
                self.config.nets.append(NetConfig(tap=dev.owner.name, mac=d["mac"], host_address=d["host_address"]))
            elif d["kind"] == "vsock":
                self.config.vsock = VsockConfig(int(d["cid"]), backend="userspace")  # only it is snapshotted
            elif d["kind"] == "rng":
                self.config.rng = True
        self.console_sink = console_sink
        self.machine = machine
        self._lock = threading.Lock()
        self._cursor = int(snap.manifest.get("meta", {}).get("expect_cursor", machine.console.end))
        self.restore_seconds = report.seconds
        if start:
            machine.start()
            self.state = "running"
        else:
            machine._paused = True  # built, not started: resume() starts the vCPUs
            self.state = "paused"
        return self

    def __repr__(self) -> str:
        return f"MicroVM({Path(self.config.kernel).name}, {self.state})"


__all__ = ["ConfigError", "DiskConfig", "ExpectTimeout", "GuestPanic", "MicroVM", "MicroVMConfig",
           "MicroVMError", "NetConfig", "VmFailed", "VmStateError", "VsockConfig", "machine_supports"]

"""The running machine: one parked-or-running thread per vCPU, pause/resume, and how the guest ended.

`kvmpy.machine.build(config)` assembles a `Machine` (kvmpy/machine/builder.py);
this module runs it. Life cycle:

    created --start()--> running --pause()--> paused --resume()--> running
                            \\______________ stopped <_____________/
                              (the guest ended, or stop()/close())

Each vCPU has one thread for the machine's life (Firecracker's model):
`pause()` asks every thread to leave KVM_RUN (a kick) and park on a
condition variable; `resume()` wakes them, and each continues its own exit
loop. A thread ends only when the machine stops.

How the guest stopped becomes an `Outcome` and a process exit status:
power-off (console line "reboot: Power down": a kernel without ACPI halts
there), reboot (i8042 reset or triple fault), panic (console "Kernel
panic"), a write to isa-debug-exit, error (the VMM could not continue).
"""

from __future__ import annotations

import contextlib
import enum
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bus import Bus
from ..devices.console_log import ConsoleLog as BoundedConsoleLog
from ..devices.i8042 import I8042
from ..devices.serial import Serial16550
from ..devices.testdev import debug_exit_status
from ..devices.virtio.attach import VirtioDevices
from ..devices.virtio.iothread import IoThread
from ..errors import GuestError, KvmError, SnapshotError
from ..exits import Exit, IntrExit, ShutdownExit, SystemEventExit
from ..kvm import Kvm
from ..memory import GuestMemory
from ..platform import Quirks
from ..runloop import VcpuLoop
from ..stats.api import MachineStats
from ..stats.control import ControlServer
from ..vcpu import Vcpu
from ..vm import Vm
from ..x86.msr_filter import MsrFilter
from ..x86.syscall_trap import SyscallTrap
from .config import MachineConfig
from .state import MachineState

POWER_OFF_MARKER = b"reboot: Power down"
HALT_MARKER = b"reboot: System halted"
PANIC_MARKER = b"Kernel panic - not syncing"


class Status(enum.Enum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    PANIC = "panic"
    DEBUG_EXIT = "debug-exit"  # the guest wrote to isa-debug-exit
    ERROR = "error"
    STOPPED = "stopped"  # stopped by the host (stop(), Ctrl-C, timeout)

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


# The process exit status of `kvmpy run` for each way a guest can end.
_EXIT_CODES = {Status.POWEROFF: 0, Status.ERROR: 1, Status.REBOOT: 3, Status.PANIC: 4, Status.STOPPED: 130,
               Status.DEBUG_EXIT: 1}


@dataclass(frozen=True)
class Outcome:
    status: Status
    detail: str = ""
    code: int | None = None  # the value written to isa-debug-exit

    @property
    def exit_code(self) -> int:
        """The `kvmpy run` status; for isa-debug-exit QEMU's (code << 1) | 1."""
        if self.status is Status.DEBUG_EXIT and self.code is not None:
            return debug_exit_status(self.code)
        return self.status.exit_code


class Ending:
    """Where every way of ending meets: the first outcome wins (a panic may still replace a reboot).

    Devices get `finish` as their callback (the i8042's reset, isa-debug-exit,
    the console scanner); the machine listens to stop its vCPUs.
    """

    def __init__(self) -> None:
        self.outcome: Outcome | None = None
        self.done = threading.Event()
        self._listeners: list[Callable[[], None]] = []

    def listen(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def finish(self, outcome: Outcome, defer: bool = False) -> None:
        if self.outcome is None or (self.outcome.status is Status.REBOOT and outcome.status is Status.PANIC):
            self.outcome = outcome
        if defer:
            return  # a panic still prints its trace, then resets (panic=-1)
        self.done.set()
        for fn in self._listeners:
            fn()


@dataclass
class ConsoleLog(BoundedConsoleLog):
    """The guest's COM1 output (bounded, kvmpy/devices/console_log.py), passed on to `sink` as it comes,
    and scanned line by line for the power-off and panic lines that end a guest without ACPI."""

    sink: Callable[[bytes], None] | None = None
    on_outcome: Callable[..., None] | None = None
    scan_from: int = 0  # absolute offset up to which the markers were looked for

    def append(self, b: bytes) -> None:
        super().append(b)
        if self.sink is not None:
            self.sink(b)
        if b == b"\n":
            self._scan()

    def _scan(self) -> None:
        window = self.since(max(self.scan_from - 64, 0))
        self.scan_from = self.end
        if self.on_outcome is None:
            return
        if PANIC_MARKER in window:
            self.on_outcome(Outcome(Status.PANIC, "guest kernel panic"), defer=True)
        elif POWER_OFF_MARKER in window or HALT_MARKER in window:
            self.on_outcome(Outcome(Status.POWEROFF, "guest powered off"))

    def contents(self) -> bytes:
        """What is kept (from `base` to `end`)."""
        with self.cond:
            return bytes(self.data)

    def snapshot_state(self) -> dict:
        with self.cond:
            return {"end": self.end, "base": self.base, "scan_from": self.scan_from}

    def restore_state(self, state: dict, data: bytes) -> None:
        """Continue from a `snapshot_state()` and the bytes that were kept then (`contents()`)."""
        with self.cond:
            self.base = int(state["base"])
            self.data[:] = data[:int(state["end"]) - self.base]
            self.scan_from = int(state["scan_from"])


class VcpuThread:
    """The one thread of one vCPU: runs its exit loop, parks on pause, ends with the machine.

    States: "created", "running", "parked", "exited". `park()` returns once
    the thread is out of KVM_RUN (parked or exited); `unpark()` lets it run
    on. The exit that ends the loop for any other reason goes to `on_exit`.
    """

    def __init__(self, loop: VcpuLoop, on_exit: Callable[[VcpuLoop, Exit | BaseException], None]) -> None:
        self.loop = loop
        self.state = "created"
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._park = False
        self._quit = False
        self._thread = threading.Thread(target=self._body, name=f"vcpu{loop.vcpu.id}", daemon=True)

    def start(self) -> None:
        self.state = "running"
        self._thread.start()

    def _body(self) -> None:
        while True:
            try:
                result: Exit | BaseException = self.loop.run()
            except Exception as e:  # reported as the outcome; never hang the other vCPUs
                result = e
            with self._cond:
                if isinstance(result, IntrExit) and self._park and not self._quit:
                    self.state = "parked"
                    self._cond.notify_all()
                    while self._park and not self._quit:
                        self._cond.wait()
                    if not self._quit:
                        self.state = "running"
                        self.loop.rearm()
                        continue
                self.state = "exited"
                self._cond.notify_all()
            if not (isinstance(result, IntrExit) and self._quit):
                self._on_exit(self.loop, result)
            return

    def park(self) -> None:
        with self._cond:
            if self.state != "running":
                return
            self._park = True
        self.loop.stop()
        with self._cond:
            while self.state == "running":
                self._cond.wait()

    def unpark(self) -> None:
        with self._cond:
            self._park = False
            self._cond.notify_all()

    def quit(self) -> None:
        """End the thread at its next exit (or now, if parked)."""
        with self._cond:
            self._quit = True
            self._cond.notify_all()
        self.loop.stop()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)


class Machine:
    """An assembled micro-VM (made by `kvmpy.machine.build` or `restore`): `start()`, then `wait()`.

    Every part is an attribute from the start; `virtio` and `iothread` are
    None on a machine without virtio devices, `syscall_trap` off the PVM
    backend, `boot` on a restored machine.
    """

    def __init__(self, *, config: MachineConfig, kvm: Kvm, own_kvm: bool, vm: Vm, memory: GuestMemory,
                 quirks: Quirks, multiboot: bool, pio: Bus, mmio: Bus, serial: Serial16550, i8042: I8042,
                 vcpus: list[Vcpu], loops: list[VcpuLoop], assists: list[Any], msr_filter: MsrFilter,
                 syscall_trap: SyscallTrap | None, faulted_msrs: list[int], virtio: VirtioDevices | None,
                 iothread: IoThread | None, console: ConsoleLog, ending: Ending) -> None:
        self.config = config
        self.kvm, self._own_kvm = kvm, own_kvm
        self.vm = vm
        self.memory = memory
        self.quirks = quirks
        self.multiboot = multiboot
        self.pio, self.mmio = pio, mmio
        self.serial, self.i8042 = serial, i8042
        self.vcpus, self.loops, self.assists = vcpus, loops, assists
        self.msr_filter, self.syscall_trap, self.faulted_msrs = msr_filter, syscall_trap, faulted_msrs
        self.virtio, self.iothread = virtio, iothread
        self.console, self.ending = console, ending
        self.boot: Any = None  # the loader's BootEntry (None on a restored machine)
        self.cmdline = ""  # the full kernel command line the guest got
        self.stats_source: MachineStats | None = None
        self.control: ControlServer | None = None
        self.threads = [VcpuThread(loop, self._vcpu_exited) for loop in loops]
        self._state = "created"
        self._lock = threading.Lock()
        self._closed = False
        ending.listen(self._stop_vcpus)

    # -- state -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """"created", "running", "paused" or "stopped"."""
        return "stopped" if self.ending.done.is_set() else self._state

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    @property
    def finished(self) -> bool:
        """True once the guest has stopped (or is being stopped)."""
        return self.ending.done.is_set()

    # -- running -----------------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per vCPU (a paused machine resumes instead)."""
        with self._lock:
            if self._state == "paused":
                self._resume()
            elif self._state == "created" and not self.finished:
                self._start()

    def _start(self) -> None:
        # The stats fds must be open before any KVM_RUN: opening a vCPU's
        # waits for its mutex, which a running vCPU holds.
        self.stats_source = MachineStats(self)
        try:
            self.control = ControlServer(self.stats_source, name=Path(str(self.config.kernel)).name)
        except KvmError as e:
            print(f"kvmpy: no control socket for `kvmpy stat`: {e}", file=sys.stderr)
        self._state = "running"
        for t in self.threads:
            t.start()

    def pause(self) -> None:
        """Park every vCPU thread outside KVM_RUN; the guest's state stays in KVM. Returns once all are parked."""
        with self._lock:
            if self._state != "running" or self.finished:
                return
            for t in self.threads:
                t.park()
            self._state = "paused"

    def resume(self) -> None:
        """Let the parked vCPU threads run on (a machine restored paused starts its threads now)."""
        with self._lock:
            self._resume()

    def _resume(self) -> None:
        if self._state != "paused" or self.finished:
            return
        if all(t.state == "created" for t in self.threads):
            self._start()
            return
        self._state = "running"
        for t in self.threads:
            t.unpark()

    def mark_paused(self) -> None:
        """A machine built but not started counts as paused (a restore with start=False)."""
        with self._lock:
            if self._state == "created":
                self._state = "paused"

    def _vcpu_exited(self, loop: VcpuLoop, result: Exit | BaseException) -> None:
        if isinstance(result, GuestError):
            outcome = Outcome(Status.ERROR, str(result))
        elif isinstance(result, KvmError):
            outcome = Outcome(Status.ERROR, f"vcpu {loop.vcpu.id}: {result}")
        elif isinstance(result, BaseException):  # a VMM bug: report it as the outcome
            outcome = Outcome(Status.ERROR, f"vcpu {loop.vcpu.id}: {type(result).__name__}: {result}")
        elif self.finished and self.ending.outcome is not None:
            return
        elif isinstance(result, ShutdownExit):
            outcome = Outcome(Status.REBOOT, "triple fault")
        elif isinstance(result, SystemEventExit):
            outcome = Outcome(Status.POWEROFF if result.type == 1 else Status.REBOOT, f"system event {result.type}")
        else:
            outcome = Outcome(Status.ERROR, f"unexpected exit {result.name}")
        self.ending.finish(outcome)

    def _stop_vcpus(self) -> None:
        for t in self.threads:
            t.quit()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """The outcome once the guest stopped; None if `timeout` passed first."""
        if not self.ending.done.wait(timeout):
            return None
        for t in self.threads:
            t.join(5)
        return self.ending.outcome

    def stop(self, detail: str = "stopped by the host") -> Outcome:
        self.ending.finish(Outcome(Status.STOPPED, detail))
        for t in self.threads:
            t.join(5)
        assert self.ending.outcome is not None
        return self.ending.outcome

    def send_input(self, data: bytes) -> int:
        """Queue host keystrokes for the guest's COM1; returns how many were taken."""
        return self.serial.receive(data)

    # -- state of a paused machine (kvmpy/snapshot.py writes it) -----------------------

    def bus_devices(self) -> Iterator[tuple[str, Any]]:
        """Every device on the buses once, keyed "pio:0x3f8:COM1"-style."""
        seen: set[int] = set()
        for bus_name, bus in (("pio", self.pio), ("mmio", self.mmio)):
            for r in bus.ranges:
                if id(r.device) not in seen:
                    seen.add(id(r.device))
                    yield f"{bus_name}:{r.base:#x}:{r.name}", r.device

    def quiesced(self) -> Any:
        """A context in which nothing changes guest RAM or device state: the vCPUs must be parked,
        and the virtio devices hold still (their I/O thread would go on receiving into guest RAM)."""
        return self.virtio.quiesced() if self.virtio is not None else contextlib.nullcontext()

    def snapshot_state(self) -> MachineState:
        """Every component's own state; the machine must be paused (or built and not started).

        Take it inside `quiesced()`, together with whatever else must match it (guest RAM).
        """
        if self.state not in ("paused", "created"):
            raise SnapshotError(f"the machine is {self.state}; pause() it before taking its state")
        if self.config.cpuid is not None or not self.config.pit:
            # A restore rebuilds the machine from its recorded config; these two
            # (the kvm-unit-tests runner's) cannot be recorded.
            raise SnapshotError("cannot snapshot a machine with a custom CPUID table (MachineConfig.cpuid) "
                                "or without a PIT (MachineConfig.pit=False)")
        devices = list(self.bus_devices())
        missing = [k for k, dev in devices if not hasattr(dev, "snapshot_state")]
        if missing:
            raise SnapshotError("cannot snapshot: device(s) " + ", ".join(missing) +
                                " have no snapshot_state()/restore_state()")
        msr_indices = self.kvm.get_msr_index_list()
        return MachineState(
            vcpus=[v.snapshot_state(msr_indices) for v in self.vcpus],
            vm=self.vm.snapshot_state(),
            devices={k: _device_state(k, dev) for k, dev in devices},
            msr_filter=self.msr_filter.snapshot_state(),
            syscall_trap=None if self.syscall_trap is None else self.syscall_trap.snapshot_state(),
            console=self.console.snapshot_state())

    def restore_state(self, state: MachineState, console: bytes = b"") -> dict[int, list[int]]:
        """Load every component's state into this (built, not started) machine; returns refused MSRs per vCPU."""
        if self.state != "created":
            raise SnapshotError(f"restore_state(): the machine is {self.state}; only a new one can take a state")
        if len(state.vcpus) != len(self.vcpus):
            raise SnapshotError(f"{len(state.vcpus)} vCPU states for {len(self.vcpus)} vCPUs")
        if (state.syscall_trap is None) != (self.syscall_trap is None):
            was = "off" if state.syscall_trap is None else "on"
            raise SnapshotError(f"the state was taken with the syscall trap {was}; this host's quirks differ")
        self.msr_filter.restore_state(state.msr_filter)
        self.vm.restore_state(state.vm)
        refused = {vcpu.id: vcpu.restore_state(s) for vcpu, s in zip(self.vcpus, state.vcpus)}
        devices = dict(self.bus_devices())
        for key, dstate in state.devices.items():
            dev = devices.get(key)
            if dev is None:
                raise SnapshotError(f"the state has device {key}; this machine has only {sorted(devices)}")
            try:
                dev.restore_state(dstate)
            except KvmError as e:
                raise SnapshotError(f"restoring {key}: {e}") from None
        if self.syscall_trap is not None and state.syscall_trap is not None:
            self.syscall_trap.restore_state(state.syscall_trap)
        self.console.restore_state(state.console, console)
        return refused

    # -- statistics and the end ----------------------------------------------------------

    def stats(self) -> dict:
        """A snapshot of the exit statistics: userspace accounting and KVM's own counters."""
        source = self.stats_source if self.stats_source is not None else MachineStats(self)
        return source.stats_snapshot()

    def completions(self) -> dict[str, int]:
        """How often kvmpy completed each instruction KVM could not emulate, over all vCPUs."""
        out: dict[str, int] = {}
        for a in self.assists:
            for k, v in a.completed.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def exit_stats(self) -> list:
        return [loop.accounting for loop in self.loops]

    def close(self) -> None:
        if self._closed:
            return
        if not self.finished:
            self.stop()
        self._closed = True
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.stats_source is not None:
            self.stats_source.close()
            self.stats_source = None
        if self.virtio is not None:
            self.virtio.close()
        if self.iothread is not None:
            self.iothread.close()
        self.vm.close()
        self.memory.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Machine({Path(str(self.config.kernel)).name}, {self.state})"


def _device_state(key: str, dev: Any) -> dict:
    try:
        return dev.snapshot_state()
    except KvmError as e:
        raise SnapshotError(f"cannot snapshot {key}: {e}") from None


__all__ = ["ConsoleLog", "Ending", "Machine", "Outcome", "Status", "VcpuThread"]

"""The assembled micro-VM that boots Linux: config -> memory, loader, irqchip, devices, vCPU threads.

Order matters for the error promise: the config is validated and the kernel
and initrd are loaded into (not yet registered) guest memory first, so a bad
image fails before any VM exists. Then the VM gets its in-kernel irqchip
(PIC, IOAPIC, LAPICs) and PIT, the memory slots, COM1 and the i8042, and one
vCPU per CPU. The boot CPU starts at the kernel's entry; the others wait in
KVM for the INIT/SIPI the guest sends through its LAPIC. QEMU's test devices
(isa-debug-exit, pc-testdev, fw_cfg, ACPI with S3 wake-up) come on request:
the kvm-unit-tests runner (kvmpy/kut.py) runs its tests on this machine.

How the guest stopped becomes an `Outcome` and a process exit status:
power-off (console line "reboot: Power down": a kernel without ACPI halts
there), reboot (i8042 reset or triple fault), panic (console "Kernel
panic"), error (the VMM could not continue).
"""

from __future__ import annotations

import enum
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from ._kvm import lib
from .assists import Assists
from .boot.linux import BootEntry, kernel_info, load_linux
from .boot.multiboot import load_multiboot
from .bus import Bus, mmio_bus, pio_bus
from .devices.console_log import ConsoleLog
from .devices.i8042 import I8042
from .devices.fw_cfg import FW_CFG_PORT_SEL, FW_CFG_PORTS, FwCfg
from .devices.rtc import CmosRtc
from .devices.testdev import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit, PcTestDev, debug_exit_status
from .devices.serial import Serial16550
from .devices.virtio.attach import VirtioDevices, attach_virtio
from .devices.virtio.iothread import IoThread
from .errors import BootError, GuestError, KvmError
from .exits import Exit, IntrExit, ShutdownExit, SystemEventExit
from .kvm import Kvm
from .memory import GuestMemory, parse_size
from .platform import Quirks, resolve_quirks
from .runloop import VcpuLoop
from .stats.api import MachineStats
from .stats.control import ControlServer
from .vcpu import Vcpu
from .vm import Vm
from .x86 import acpi, firmware, modes, syscall_trap
from .x86.acpi import write_acpi_tables
from .x86.cpuid import vcpu_cpuid
from .x86.mptable import max_cpus, write_mptable
from .x86.msr_filter import MsrFilter, fault_absent_feature_msrs

COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_PORT = 0x60
I8042_PORTS = 5  # 0x60 data .. 0x64 status/command
RTC_PORT = 0x70  # CMOS index 0x70, data 0x71

# Like Firecracker's default: serial console, reset through the keyboard
# controller, no module loading, and a panic turns into a reset we can see.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 nomodule i8042.noaux i8042.nomux i8042.dumbkbd"

MIN_MEMORY = 32 << 20
TEST_DEVICES = ("debug-exit", "testdev", "fw-cfg", "acpi")

_EXIT_INTR = lib.KVM_EXIT_INTR

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


def memory_problem(size: int) -> str | None:
    """What is wrong with `size` bytes as a Linux guest's RAM on this host, or None."""
    host = psutil.virtual_memory().total
    if size < MIN_MEMORY:
        return f"{size >> 20} MiB is too small to boot Linux (at least {MIN_MEMORY >> 20} MiB)"
    if size > host:
        return f"{size >> 20} MiB is more than this host has ({host >> 20} MiB)"
    if size % 4096:
        return f"{size:#x} bytes is not a multiple of 4 KiB"
    return None


@dataclass
class MachineConfig:
    """What to boot and on how much machine. Validated by `validate()`."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    memory: int | str = "128M"  # as Firecracker; boot time on an emulating backend grows with it
    cpus: int = 1
    quirks: str = "auto"  # auto | pvm | none
    entry: str = "auto"  # auto | linux64 | pvh | multiboot (auto: multiboot for a kernel that is only that)
    modules: list[tuple[Path, str]] = field(default_factory=list)  # multiboot modules: (file, string)
    # QEMU's test devices, off in the micro-VM: any of "debug-exit" (isa-debug-exit
    # at 0xf4: the VM ends with status (code << 1) | 1), "testdev" (pc-testdev
    # ports and MMIO buffer), "fw-cfg" (0x510), "acpi" (RSDP/RSDT/FADT, PM timer).
    test_devices: tuple[str, ...] = ()
    # `kvmpy.devices.virtio` devices (BlockDevice, NetDevice, EntropyDevice,
    # VsockDevice), attached in order at 0xd0000000 + n*4K, GSI 5, 6, 7, 9, ...
    devices: list = field(default_factory=list)
    pit: bool = True  # the in-kernel i8254 (QEMU's -machine pit=off drops it)
    # Each vCPU's CPUID table: cpuid(kvm, apic_id, cpus) -> entries. None: KVM's
    # supported table with the topology of `cpus` (kvmpy.x86.cpuid.vcpu_cpuid).
    cpuid: Callable[[Kvm, int, int], list] | None = None

    def validate(self) -> None:
        mem = parse_size(self.memory) if isinstance(self.memory, str) else self.memory
        problem = memory_problem(mem)
        if problem:
            raise BootError(f"memory {problem}")
        if not 1 <= self.cpus <= max_cpus():
            raise BootError(f"cpus {self.cpus}: must be between 1 and {max_cpus()}")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd),
                           *(("multiboot module", m) for m, _ in self.modules)):
            if path is not None and not Path(path).is_file():
                raise BootError(f"{what} {path}: no such file")
        unknown = set(self.test_devices) - set(TEST_DEVICES)
        if unknown:
            raise BootError(f"unknown test device(s) {', '.join(sorted(unknown))}; "
                            f"choose from {', '.join(TEST_DEVICES)}")
        self.memory = mem


class Machine:
    """A Linux-booting micro-VM. `start()`, then `wait()` for its `Outcome`."""

    def __init__(self, config: MachineConfig, *, console: Callable[[bytes], None] | None = None,
                 kvm: Kvm | None = None, memory: GuestMemory | None = None) -> None:
        # `memory` given: restoring a snapshot (kvmpy/snapshot.py). The guest's
        # RAM is already there, so no kernel is loaded and no boot CPU set up;
        # the config came from a validated machine and its files need not exist.
        self._restoring = memory is not None
        if not self._restoring:
            config.validate()
        self.config = config
        self.quirks: Quirks = resolve_quirks(config.quirks)
        self.console = ConsoleLog()
        self._console_sink = console
        self._outcome: Outcome | None = None
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._scan_from = 0
        self._paused = False
        self.stats_source: MachineStats | None = None
        self.control: ControlServer | None = None

        self.multiboot = config.entry == "multiboot" or (
            config.entry == "auto" and Path(config.kernel).is_file()
            and kernel_info(config.kernel).kind == "multiboot")
        # The syscall trap is built around Linux's GDT and page-table layout; a multiboot
        # kernel (a kvm-unit-test, say) gets the backend as it is.
        self._trap_syscalls = self.quirks.syscall_trap and not self.multiboot
        self.memory = memory if memory is not None else GuestMemory(config.memory)
        try:
            if not self._restoring:
                self.boot: BootEntry = self._load()
                write_mptable(self.memory, config.cpus)
                if "acpi" in config.test_devices:
                    write_acpi_tables(self.memory)
            self.kvm = kvm if kvm is not None else Kvm()
            self._own_kvm = kvm is None
            self.vm: Vm = self.kvm.create_vm()
            self._build_vm()
        except BaseException:
            self._detach_virtio()
            self.memory.close()
            raise

    # -- assembly ---------------------------------------------------------------

    def _load(self) -> BootEntry:
        """Load the kernel by its kind: Linux (bzImage, vmlinux, PVH) or multiboot."""
        config = self.config
        reserved = syscall_trap.RESERVED if self._trap_syscalls else ()
        if self.multiboot:
            if config.initrd is not None:
                raise BootError(f"{config.kernel}: a multiboot kernel takes modules, not an initrd")
            return load_multiboot(self.memory, config.kernel, cmdline=config.cmdline,
                                  modules=config.modules, reserved=reserved)
        return load_linux(self.memory, config.kernel, initrd=config.initrd, cmdline=self._cmdline(tsc_khz=None),
                          entry=config.entry, reserved=reserved)  # type: ignore[arg-type]

    def _cmdline(self, tsc_khz: int | None) -> str:
        words = [self.config.cmdline]
        if self.quirks.cmdline:
            words.append(self.quirks.cmdline)
        if self.quirks.tsc_khz_on_cmdline and tsc_khz:
            words.append(f"tsc_early_khz={tsc_khz}")
        virtio = getattr(self, "virtio", None)  # virtio hook: virtio_mmio.device=4K@...:<gsi>
        if virtio is not None:
            words.extend(virtio.cmdline)
        return " ".join(w for w in words if w)

    def _build_vm(self) -> None:
        vm = self.vm
        vm.set_tss_addr()
        vm.set_identity_map_addr()
        vm.create_irqchip()
        if self.config.pit:
            vm.create_pit2()
        vm.add_memory(self.memory)

        self.pio: Bus = pio_bus()
        self.mmio: Bus = mmio_bus()
        self.serial = Serial16550(self._on_console, irq=lambda level: vm.irq_line(COM1_IRQ, int(level)))
        self.pio.register(COM1_PORT, 8, self.serial, "COM1")
        self.i8042 = I8042(on_reset=lambda: self._finish(Outcome(Status.REBOOT, "i8042 reset")))
        self.pio.register(I8042_PORT, I8042_PORTS, self.i8042, "i8042")
        self.rtc = CmosRtc()
        self.pio.register(RTC_PORT, 2, self.rtc, "CMOS RTC")
        self._attach_test_devices()
        self._attach_virtio()

        cpus, cpuid = self.config.cpus, self.config.cpuid
        supported = self.kvm.get_supported_cpuid() if cpuid is None else []
        self.vcpus: list[Vcpu] = []
        self.loops: list[VcpuLoop] = []
        for i in range(cpus):
            vcpu = vm.create_vcpu(i)
            vcpu.set_cpuid2(vcpu_cpuid(supported, i, cpus) if cpuid is None else cpuid(self.kvm, i, cpus))
            self.vcpus.append(vcpu)
            assists = Assists(self.memory, enabled=self.quirks.emulation_assists, mmio_bus=self.mmio)
            loop = VcpuLoop(vcpu, self.pio, self.mmio, assists=assists)
            self.loops.append(loop)
        if "acpi" in self.config.test_devices:
            self.loops[0].handlers[_EXIT_INTR] = self._wake_from_s3

        # MSRs kvmpy answers itself: IA32_LSTAR for the syscall trap, and on PVM the
        # feature MSRs the guest's CPUID lacks (kvmpy/x86/msr_filter.py).
        self.msr_filter = MsrFilter(vm)
        self.syscall_trap: syscall_trap.SyscallTrap | None = None
        if self._trap_syscalls:
            self.syscall_trap = syscall_trap.SyscallTrap(vm, self.memory, self.msr_filter)
        self.faulted_msrs: list[int] = []
        if self.quirks.feature_msr_faults:
            self.faulted_msrs = fault_absent_feature_msrs(self.msr_filter, self.vcpus[0].get_cpuid2())
        self.msr_filter.install()
        for loop in self.loops:
            if self.msr_filter.handlers:
                self.msr_filter.attach(loop)
            if self.syscall_trap is not None:
                self.syscall_trap.attach(loop)

        if self._restoring:
            return
        if self.multiboot:
            firmware.leave_bios_state(vm, self.memory)  # 8259 bases, real-mode IVT
        if not self.multiboot and (self.quirks.tsc_khz_on_cmdline or self.virtio is not None):
            self._rewrite_cmdline(self._cmdline(self.vcpus[0].get_tsc_khz()))
        self._setup_boot_cpu(self.vcpus[0])

    def _attach_test_devices(self) -> None:
        """QEMU's test devices, each only when the config names it."""
        wanted = self.config.test_devices
        if "debug-exit" in wanted:
            self.debug_exit = DebugExit(lambda code: self._finish(Outcome(Status.DEBUG_EXIT, f"code {code}", code)))
            self.pio.register(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, self.debug_exit, "isa-debug-exit")
        if "testdev" in wanted:
            self.testdev = PcTestDev(irq_line=lambda n, level: self.vm.irq_line(n, level))
            self.testdev.register(self.pio, self.mmio)
        if "fw-cfg" in wanted:
            self.fw_cfg = FwCfg(ram_size=self.memory.size, nb_cpus=self.config.cpus)
            self.pio.register(FW_CFG_PORT_SEL, FW_CFG_PORTS, self.fw_cfg, "fw_cfg")
        if "acpi" in wanted:
            self._s3_pending = False
            self.pio.register(acpi.PM1A_EVT_BLK, 8, acpi.Pm1Registers(on_sleep=self._on_acpi_sleep), "pm1a")
            self.pio.register(acpi.PM_TMR_BLK, 4, acpi.PmTimer(), "pm timer")

    def _on_acpi_sleep(self, slp_typ: int) -> None:
        # S3: the boot CPU wakes at once at the firmware waking vector, as if a
        # wake event came. The `out` that asked for it must complete first (KVM
        # API: complete pending I/O before KVM_SET_REGS), so the state changes
        # in the boot CPU's thread at its next KVM_RUN, which the kick ends at once.
        if slp_typ == 1:
            self._s3_pending = True
            self.vcpus[0].kick()

    def _wake_from_s3(self, exit: IntrExit) -> bool:
        if self._s3_pending:
            self._s3_pending = False
            vector = self.memory.read_u32(acpi.FACS_WAKING_VECTOR)
            # What a BIOS resume path leaves (ACPI 1.0b, 9.3.2): real mode, CS:IP = vector>>4 : vector&0xf.
            modes.setup_real_mode(self.vcpus[0], vector, cs=vector >> 4, stack=None)
        return True

    # -- virtio hook (issue 5) ----------------------------------------------------

    def _attach_virtio(self) -> None:
        """Wire `config.devices` to the MMIO bus, ioeventfd/irqfd and one I/O thread."""
        self.virtio: VirtioDevices | None = None
        self.iothread: IoThread | None = None
        if not self.config.devices:
            return
        self.iothread = IoThread()
        self.virtio = attach_virtio(self.vm, self.memory, self.mmio, self.config.devices, iothread=self.iothread)

    def _detach_virtio(self) -> None:
        if getattr(self, "virtio", None) is not None:
            self.virtio.close()
            self.virtio = None
        if getattr(self, "iothread", None) is not None:
            self.iothread.close()
            self.iothread = None

    def _rewrite_cmdline(self, cmdline: str) -> None:
        # The loader placed and measured the command line before the VM
        # existed; the TSC frequency is only known now. Same address, longer text.
        data = cmdline.encode() + b"\0"
        if len(data) > 2048:
            raise BootError(f"command line of {len(data)} bytes is too long (limit 2047)")
        self.memory.write(self.boot.cmdline_addr, data)
        self.cmdline = cmdline

    def _setup_boot_cpu(self, vcpu: Vcpu) -> None:
        b = self.boot
        if b.mode == "linux64":
            modes.setup_long_mode(vcpu, self.memory, b.rip, stack=0, regs={"rsi": b.rsi})
        else:
            modes.setup_protected_mode(vcpu, self.memory, b.rip, stack=0, regs={"rax": b.rax, "rbx": b.rbx})

    # -- console ----------------------------------------------------------------

    def _on_console(self, data: bytes) -> None:
        self.console.append(data)
        if self._console_sink is not None:
            self._console_sink(data)
        if data == b"\n":
            self._scan_console()

    def _scan_console(self) -> None:
        log = self.console
        window = log.since(max(self._scan_from - 64, 0))
        self._scan_from = log.end
        if PANIC_MARKER in window:
            self._finish(Outcome(Status.PANIC, "guest kernel panic"), defer=True)
        elif POWER_OFF_MARKER in window or HALT_MARKER in window:
            self._finish(Outcome(Status.POWEROFF, "guest powered off"))

    def send_input(self, data: bytes) -> int:
        """Queue host keystrokes for the guest's COM1; returns how many were taken."""
        return self.serial.receive(data)

    # -- running ------------------------------------------------------------------

    def start(self) -> None:
        # The stats fds must be open before any KVM_RUN: opening a vCPU's
        # waits for its mutex, which a running vCPU holds.
        if self.stats_source is None:
            self.stats_source = MachineStats(self)
            try:
                self.control = ControlServer(self.stats_source, name=Path(self.config.kernel).name)
            except KvmError as e:
                print(f"kvmpy: no control socket for `kvmpy stat`: {e}", file=sys.stderr)
        for loop in self.loops:
            t = threading.Thread(target=self._vcpu_thread, args=(loop,), name=f"vcpu{loop.vcpu.id}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    # -- pause and resume (kvmpy/microvm.py, kvmpy/snapshot.py) -------------------

    def pause(self) -> None:
        """Stop every vCPU thread at its next exit (a kick); the guest's state stays in KVM."""
        if self._paused or self._done.is_set():
            return
        self._paused = True
        for loop in self.loops:
            loop.stop()
        for t in self._threads:
            t.join()
        self._threads.clear()

    def resume(self) -> None:
        """Restart the vCPU threads of a paused machine; each vCPU continues where it stopped."""
        if not self._paused or self._done.is_set():
            return
        # A loop once stopped stays stopped: fresh loops, same handlers, assists and accounting.
        self.loops = [VcpuLoop(lp.vcpu, lp.pio, lp.mmio, assists=lp.assists, handlers=lp.handlers,
                               accounting=lp.accounting) for lp in self.loops]
        self._paused = False
        self.start()

    @property
    def paused(self) -> bool:
        return self._paused

    def _vcpu_thread(self, loop: VcpuLoop) -> None:
        try:
            exit = loop.run()
            if self._paused and isinstance(exit, IntrExit) and not self._done.is_set():
                return  # pause(): not an outcome
            outcome = self._outcome_of(exit)
        except GuestError as e:
            outcome = Outcome(Status.ERROR, str(e))
        except KvmError as e:
            outcome = Outcome(Status.ERROR, f"vcpu {loop.vcpu.id}: {e}")
        except Exception as e:  # a VMM bug: report, never hang the other vCPUs
            outcome = Outcome(Status.ERROR, f"vcpu {loop.vcpu.id}: {type(e).__name__}: {e}")
        if outcome is not None:
            self._finish(outcome)

    def _outcome_of(self, exit: Exit) -> Outcome | None:
        if self._done.is_set() and self._outcome is not None:
            return None
        if isinstance(exit, ShutdownExit):
            return Outcome(Status.REBOOT, "triple fault")
        if isinstance(exit, SystemEventExit):
            return Outcome(Status.POWEROFF if exit.type == 1 else Status.REBOOT, f"system event {exit.type}")
        return Outcome(Status.ERROR, f"unexpected exit {exit.name}")

    def _finish(self, outcome: Outcome, defer: bool = False) -> None:
        if self._outcome is None or (self._outcome.status is Status.REBOOT and outcome.status is Status.PANIC):
            self._outcome = outcome
        if defer:
            return  # a panic still prints its trace, then resets (panic=-1)
        self._done.set()
        for loop in self.loops:
            loop.stop()

    @property
    def finished(self) -> bool:
        """True once the guest has stopped (or is being stopped)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """The outcome once the guest stopped; None if `timeout` passed first."""
        if not self._done.wait(timeout):
            return None
        for t in self._threads:
            t.join(5)
        return self._outcome

    def stop(self, detail: str = "stopped by the host") -> Outcome:
        self._finish(Outcome(Status.STOPPED, detail))
        for t in self._threads:
            t.join(5)
        assert self._outcome is not None
        return self._outcome

    def stats(self) -> dict:
        """A snapshot of the exit statistics: userspace accounting and KVM's own counters."""
        source = self.stats_source if self.stats_source is not None else MachineStats(self)
        return source.stats_snapshot()

    def close(self) -> None:
        if not self._done.is_set():
            self.stop()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.stats_source is not None:
            self.stats_source.close()
            self.stats_source = None
        self._detach_virtio()
        self.vm.close()
        self.memory.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def exit_stats(self) -> list:
        return [loop.accounting for loop in self.loops]


__all__ = ["DEFAULT_CMDLINE", "Machine", "MachineConfig", "Outcome", "Status"]

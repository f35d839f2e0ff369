"""The one place a machine is assembled: `build(config)` for a boot, `restore(...)` for a snapshot.

`build` reads top to bottom as the machine comes together (Firecracker's
`build_microvm_for_boot`):

1. validate the config; identify the kernel image (a bad or truncated image
   fails here, before anything exists); resolve the host's quirks;
2. make the devices the config names: disk images opened, TAPs created,
   vsock sockets bound (errors here, still before any VM);
3. create the VM: TSS and identity-map addresses, the memory slots, the MSR
   filter (both before the irqchip: after it, each costs 7-15 ms on the
   software backend), in-kernel irqchip (PIC, IOAPIC, LAPICs), PIT; COM1, the i8042, the CMOS RTC and
   the requested test devices on the port bus; the virtio devices on the MMIO
   bus with ioeventfd/irqfd and one I/O thread;
4. create the vCPUs with their CPUID; register, per vCPU loop, what handles
   its exits: exit accounting, instruction completion, the MSR filter, the
   syscall trap (PVM only), S3 wake-up (ACPI test device only);
5. compute the full kernel command line once (the user's words, the
   quirks' masks, tsc_early_khz, one virtio_mmio.device= per device) and load
   the kernel and initrd once; write the MP table (and ACPI tables);
6. put the boot vCPU at the kernel's entry; the others wait in KVM for the
   guest's INIT/SIPI.

`restore` does 1-4 with the recorded config and devices, then loads every
component's saved state instead of 5-6.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .._kvm import lib
from ..assists import Assists
from ..boot.linux import KernelInfo, kernel_info, load_linux
from ..boot.multiboot import load_multiboot
from ..bus import mmio_bus, pio_bus
from ..devices.fw_cfg import FW_CFG_PORT_SEL, FW_CFG_PORTS, FwCfg
from ..devices.i8042 import I8042
from ..devices.rtc import CmosRtc
from ..devices.serial import Serial16550
from ..devices.testdev import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit, PcTestDev
from ..devices.virtio.attach import attach_virtio
from ..devices.virtio.iothread import IoThread
from ..devices.virtio.mmio import VirtioDevice
from ..errors import BootError, KvmError
from ..exits import Exit
from ..kvm import Kvm
from ..memory import GuestMemory
from ..platform import Quirks, resolve_quirks
from ..runloop import VcpuLoop
from ..stats.accounting import ExitAccounting
from ..x86 import acpi, firmware, modes, syscall_trap
from ..x86.cpuid import vcpu_cpuid
from ..x86.mptable import write_mptable
from ..x86.msr_filter import FEATURE_MSRS, MsrFilter, fault_absent_feature_msrs, fault_feature_msrs
from .config import MAX_CMDLINE, DiskConfig, MachineConfig, NetConfig, VsockConfig, as_disk, as_module, as_net, as_vsock
from .machine import ConsoleLog, Ending, Machine, Outcome, Status
from .state import MachineState

COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_PORT = 0x60
I8042_PORTS = 5  # 0x60 data .. 0x64 status/command
RTC_PORT = 0x70  # CMOS index 0x70, data 0x71

Console = Callable[[bytes], None]


class DeviceError(BootError):
    """A device the config names cannot be made (an image that will not open, a TAP that cannot be created)."""


def build(config: MachineConfig, *, console: Console | None = None, kvm: Kvm | None = None,
          devices: Sequence[VirtioDevice] = ()) -> Machine:
    """A machine ready to boot `config`'s kernel: call `start()`.

    `console` receives every byte the guest prints on COM1. `devices`: virtio
    devices made by the caller, attached after the config's own; the machine
    owns them from here on (they are closed with it, or if the build fails).
    """
    try:
        config = config.validate()
        info = kernel_info(config.kernel)  # type: ignore[arg-type]
    except BaseException:
        _close_all(devices)
        raise
    multiboot = config.entry == "multiboot" or (config.entry == "auto" and info.kind == "multiboot")
    if multiboot and config.initrd is not None:
        _close_all(devices)
        raise BootError(f"{config.kernel}: a multiboot kernel takes modules, not an initrd")
    if multiboot:
        config = dataclasses.replace(config, entry="multiboot")  # what a restore must know
    quirks = resolve_quirks(config.quirks)
    made = list(make_devices(config, existing=devices)) + list(devices)
    try:
        # memfd-backed RAM when a device's back end maps it from another process (virtio-fs's virtiofsd)
        shared = any(getattr(d, "needs_shared_memory", False) for d in made)
        memory = GuestMemory(config.memory_bytes, memfd=shared)
    except BaseException:
        _close_all(made)
        raise
    machine = _assemble(config, quirks, multiboot, memory, made, console, kvm)
    try:
        _boot(machine, config, quirks, info)
    except BaseException:
        machine.close()
        raise
    return machine


def restore(config: MachineConfig, state: MachineState, memory: GuestMemory, *, console_log: bytes = b"",
            devices: Sequence[VirtioDevice] = (), console: Console | None = None,
            kvm: Kvm | None = None) -> tuple[Machine, dict[int, list[int]]]:
    """A machine in a saved state, not started: the config it was built from, its RAM, its devices.

    The config is the recorded one (its files need not exist any more: the
    kernel is not loaded again). Returns the machine and, per vCPU, the MSRs
    KVM refused to set.
    """
    quirks = resolve_quirks(config.quirks)
    multiboot = config.entry == "multiboot"
    # The MSRs the saved guest saw fault must fault again (on PVM the CPUID they are derived
    # from is read back from KVM, which does not always answer the same).
    saved_msrs = [i for i in state.msr_filter.get("msrs", []) if i in FEATURE_MSRS]
    machine = _assemble(config, quirks, multiboot, memory, list(devices), console, kvm, feature_msrs=saved_msrs)
    try:
        refused = machine.restore_state(state, console_log)
    except BaseException:
        machine.close()
        raise
    return machine, refused


# -- the parts ---------------------------------------------------------------------

def make_devices(config: MachineConfig, *, existing: Sequence[VirtioDevice] = ()) -> list[VirtioDevice]:
    """The virtio devices `config` names, in attach order: disks, nets, rng, vsock.

    On an error the devices made so far (and `existing`) are closed and a
    `DeviceError` names the device.
    """
    from ..devices.virtio.blk import BlockDevice
    from ..devices.virtio.fs import share_devices
    from ..devices.virtio.net import NetDevice
    from ..devices.virtio.rng import EntropyDevice
    from ..devices.virtio.vsock import vsock_device
    from ..net.tap import Tap
    from ..storage import create_overlay

    made: list[VirtioDevice] = []
    what = ""
    try:
        for i, d in enumerate(map(as_disk, config.disks)):
            what = f"disks[{i}] {d.path}"
            if d.overlay:
                kept = None if d.overlay is True else Path(d.overlay)
                made.append(BlockDevice(create_overlay(d.path, kept, keep=kept is not None, base_format=d.format)))
            else:
                made.append(BlockDevice(d.path, read_only=d.read_only, format=d.format))
        for i, n in enumerate(map(as_net, config.nets)):
            what = f"nets[{i}]"
            tap = Tap(n.tap, host_address=n.host_address, bridge=n.bridge)
            try:
                made.append(NetDevice(tap.fd, n.mac, owner=tap))
            except BaseException:
                tap.close()
                raise
        if config.rng:
            made.append(EntropyDevice())
        if config.vsock is not None:
            v = as_vsock(config.vsock)
            what = f"vsock {v.cid}"
            made.append(vsock_device(v.cid, backend=v.backend, uds_path=v.uds_path))
        if config.shares:
            what = "shares"
            made.extend(share_devices(list(config.shares)))
    except BaseException as e:
        _close_all([*made, *existing])
        if isinstance(e, (OSError, ValueError)) and not isinstance(e, KvmError):
            raise DeviceError(f"{what}: {e}") from e
        raise
    return made


def device_configs(devices: Iterable[VirtioDevice]) -> dict[str, Any]:
    """The config fields that describe `devices` as they are (a restored clone's new TAP names included)."""
    disks, nets, vsock, rng, shares = [], [], None, False, []
    for dev in devices:
        kind = type(dev).__name__
        if kind == "BlockDevice":
            image = dev.image  # type: ignore[attr-defined]
            base = getattr(image, "base", None)  # an overlay's read-only base
            if base is not None:
                disks.append(DiskConfig(Path(base), False, None, True if not image.keep else str(image.path)))
            else:
                disks.append(DiskConfig(Path(dev.path), bool(dev.read_only),  # type: ignore[attr-defined]
                                        getattr(dev, "format", None)))
        elif kind == "NetDevice":
            owner = dev.owner  # type: ignore[attr-defined]
            nets.append(NetConfig(tap=getattr(owner, "name", None), mac=":".join(f"{b:02x}" for b in dev.mac),  # type: ignore[attr-defined]
                                  host_address=getattr(owner, "host_address", None),
                                  bridge=getattr(owner, "bridge", None)))
        elif kind == "EntropyDevice":
            rng = True
        elif kind == "VirtioFsDevice":
            shares.append(dev.share)  # type: ignore[attr-defined]
        elif kind in ("VsockDevice", "VhostVsockDevice"):
            vsock = VsockConfig(dev.guest_cid,  # type: ignore[attr-defined]
                                backend="userspace" if kind == "VsockDevice" else "vhost",
                                uds_path=getattr(dev, "uds_path", None))
    return {"disks": tuple(disks), "nets": tuple(nets), "vsock": vsock, "rng": rng, "shares": tuple(shares)}


def _assemble(config: MachineConfig, quirks: Quirks, multiboot: bool, memory: GuestMemory,
              devices: list[VirtioDevice], console_sink: Console | None, kvm: Kvm | None, *,
              feature_msrs: list[int] | None = None) -> Machine:
    """Steps 3 and 4: the VM, its buses and devices, the vCPUs and what handles their exits."""
    own_kvm = kvm is None
    iothread: IoThread | None = None
    virtio = None
    vm = None
    try:
        kvm = kvm if kvm is not None else Kvm()
        vm = kvm.create_vm()
        vm.set_tss_addr()
        vm.set_identity_map_addr()
        # Memory slots and the MSR filter before the in-kernel irqchip: once there is one,
        # each ioctl of KVM's that waits for an SRCU grace period (KVM_SET_USER_MEMORY_REGION,
        # KVM_X86_SET_MSR_FILTER) takes 7-15 ms on the software backend, against 0.2-0.3 ms
        # before it (measured: set-up 0.23 ms vs 15.5 ms); it was most of a fork's time.
        vm.add_memory(memory)
        # Each vCPU's CPUID table, known now: the feature MSRs the guest lacks follow from it.
        supported = kvm.get_supported_cpuid() if config.cpuid is None else []
        tables = [vcpu_cpuid(supported, i, config.vcpus) if config.cpuid is None
                  else config.cpuid(kvm, i, config.vcpus) for i in range(config.vcpus)]
        # MSRs kvmpy answers itself: IA32_LSTAR for the syscall trap, and on PVM the
        # feature MSRs the guest's CPUID lacks (kvmpy/x86/msr_filter.py).
        msr_filter = MsrFilter(vm)
        trap = None
        if quirks.syscall_trap and not multiboot:  # built around Linux's GDT and page tables
            trap = syscall_trap.SyscallTrap(vm, memory, msr_filter)
        faulted: list[int] = []
        if feature_msrs is not None:  # restoring: exactly what the saved machine faulted
            faulted = fault_feature_msrs(msr_filter, feature_msrs)
        elif quirks.feature_msr_faults:
            faulted = fault_absent_feature_msrs(msr_filter, tables[0])
        msr_filter.install()
        vm.create_irqchip()
        if config.pit:
            vm.create_pit2()

        ending = Ending()
        console = ConsoleLog(sink=console_sink, on_outcome=ending.finish)
        pio, mmio = pio_bus(), mmio_bus()
        def com1_irq(level: bool) -> None:
            vm.irq_line(COM1_IRQ, int(level))

        serial = Serial16550(console.append, irq=com1_irq)
        pio.register(COM1_PORT, 8, serial, "COM1")
        i8042 = I8042(on_reset=lambda: ending.finish(Outcome(Status.REBOOT, "i8042 reset")))
        pio.register(I8042_PORT, I8042_PORTS, i8042, "i8042")
        pio.register(RTC_PORT, 2, CmosRtc(), "CMOS RTC")
        s3 = _attach_test_devices(config, vm, memory, pio, mmio, ending)
        if devices:
            iothread = IoThread()
            virtio = attach_virtio(vm, memory, mmio, devices, iothread=iothread)
            devices = []  # attached: closed with `virtio` from here on

        vcpus, loops, completers = [], [], []
        for i in range(config.vcpus):
            vcpu = vm.create_vcpu(i)
            vcpu.set_cpuid2(tables[i])
            vcpus.append(vcpu)
            loop = VcpuLoop(vcpu, pio, mmio, accounting=ExitAccounting(vcpu.id))
            completer = Assists(memory, enabled=quirks.emulation_assists, mmio_bus=mmio)
            completer.attach(loop)
            loops.append(loop)
            completers.append(completer)
        if s3 is not None:
            s3.vcpu = vcpus[0]
            loops[0].add_handler(lib.KVM_EXIT_INTR, s3.on_kick)

        for loop in loops:
            if msr_filter.handlers:
                msr_filter.attach(loop)
            if trap is not None:
                trap.attach(loop)
        return Machine(config=config, kvm=kvm, own_kvm=own_kvm, vm=vm, memory=memory, quirks=quirks,
                       multiboot=multiboot, pio=pio, mmio=mmio, serial=serial, i8042=i8042, vcpus=vcpus,
                       loops=loops, assists=completers, msr_filter=msr_filter, syscall_trap=trap, faulted_msrs=faulted,
                       virtio=virtio, iothread=iothread, console=console, ending=ending)
    except BaseException:
        _close_all(devices)
        if virtio is not None:
            virtio.close()
        if iothread is not None:
            iothread.close()
        if vm is not None:
            vm.close()
        memory.close()
        if own_kvm and kvm is not None:
            kvm.close()
        raise


class _S3Wake:
    """ACPI S3 for the kvm-unit-tests: the boot CPU wakes at once at the firmware waking vector."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.vcpu: Any = None
        self.pending = False

    def on_sleep(self, slp_typ: int) -> None:
        # As if a wake event came at once. The `out` that asked for it must complete
        # first (KVM API: complete pending I/O before KVM_SET_REGS), so the state
        # changes in the boot CPU's thread at its next KVM_RUN, which the kick ends.
        if slp_typ == 1 and self.vcpu is not None:
            self.pending = True
            self.vcpu.kick()

    def on_kick(self, exit: Exit) -> bool:
        if self.pending:
            self.pending = False
            vector = self.memory.read_u32(acpi.FACS_WAKING_VECTOR)
            # What a BIOS resume path leaves (ACPI 1.0b, 9.3.2): real mode, CS:IP = vector>>4 : vector&0xf.
            modes.setup_real_mode(self.vcpu, vector, cs=vector >> 4, stack=None)
        return True


def _attach_test_devices(config: MachineConfig, vm: Any, memory: GuestMemory, pio: Any, mmio: Any,
                         ending: Ending) -> _S3Wake | None:
    """QEMU's test devices, each only when the config names it."""
    wanted = config.test_devices
    if "debug-exit" in wanted:
        debug_exit = DebugExit(lambda code: ending.finish(Outcome(Status.DEBUG_EXIT, f"code {code}", code)))
        pio.register(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, debug_exit, "isa-debug-exit")
    if "testdev" in wanted:
        PcTestDev(irq_line=lambda n, level: vm.irq_line(n, level)).register(pio, mmio)
    if "fw-cfg" in wanted:
        pio.register(FW_CFG_PORT_SEL, FW_CFG_PORTS, FwCfg(ram_size=memory.size, nb_cpus=config.vcpus), "fw_cfg")
    if "acpi" not in wanted:
        return None
    s3 = _S3Wake(memory)
    pio.register(acpi.PM1A_EVT_BLK, 8, acpi.Pm1Registers(on_sleep=s3.on_sleep), "pm1a")
    pio.register(acpi.PM_TMR_BLK, 4, acpi.PmTimer(), "pm timer")
    return s3


def kernel_cmdline(config: MachineConfig, quirks: Quirks, *, tsc_khz: int | None, virtio: Sequence[str]) -> str:
    """The whole command line the guest gets: the config's, the quirks' masks, tsc_early_khz, the virtio devices."""
    words = [config.cmdline, quirks.cmdline]
    if quirks.tsc_khz_on_cmdline and tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    words.extend(virtio)
    cmdline = " ".join(w for w in words if w)
    if len(cmdline.encode()) > MAX_CMDLINE:
        raise BootError(f"command line of {len(cmdline.encode())} bytes is too long (limit {MAX_CMDLINE}): "
                        "shorten cmdline or attach fewer devices")
    return cmdline


def _boot(machine: Machine, config: MachineConfig, quirks: Quirks, kernel: KernelInfo) -> None:
    """Steps 5 and 6: the command line, the kernel, the tables, the boot vCPU."""
    memory = machine.memory
    reserved = syscall_trap.RESERVED if machine.syscall_trap is not None else ()
    if machine.multiboot:
        machine.cmdline = config.cmdline
        boot = load_multiboot(memory, kernel.path, cmdline=config.cmdline, data=kernel.data,
                              modules=[(m.path, m.string) for m in map(as_module, config.modules)],
                              reserved=reserved)
    else:
        virtio = machine.virtio.cmdline if machine.virtio is not None else []
        tsc_khz = machine.vcpus[0].get_tsc_khz() if quirks.tsc_khz_on_cmdline else None
        machine.cmdline = kernel_cmdline(config, quirks, tsc_khz=tsc_khz, virtio=virtio)
        boot = load_linux(memory, kernel, initrd=config.initrd,  # type: ignore[arg-type]
                          cmdline=machine.cmdline, entry=config.entry, reserved=reserved)  # type: ignore[arg-type]
    machine.boot = boot
    write_mptable(memory, config.vcpus)
    if "acpi" in config.test_devices:
        acpi.write_acpi_tables(memory)
    if machine.multiboot:
        firmware.leave_bios_state(machine.vm, memory)  # 8259 bases, real-mode IVT
    vcpu = machine.vcpus[0]
    if boot.mode == "linux64":
        modes.setup_long_mode(vcpu, memory, boot.rip, stack=0, regs={"rsi": boot.rsi})
    else:
        modes.setup_protected_mode(vcpu, memory, boot.rip, stack=0, regs={"rax": boot.rax, "rbx": boot.rbx})


def _close_all(devices: Iterable[Any]) -> None:
    for dev in devices:
        try:
            dev.close()
        except OSError:
            pass


__all__ = ["DeviceError", "build", "device_configs", "kernel_cmdline", "make_devices", "restore"]

"""Lab 4, device emulation paths: the same guest write, handled in five places.

A tiny 64-bit guest kernel writes N times to a device register, then says
done. Only where the write goes changes:

- a port device in kvmpy: every `out` is a KVM_EXIT_IO back to Python;
- an MMIO device in kvmpy: every store to a GPA with no memory slot is a
  KVM_EXIT_MMIO (on VT-x/AMD-V an EPT/NPT misconfiguration KVM decodes);
- the same port, and the same MMIO address, bound to an ioeventfd: KVM
  completes the write in the kernel and signals an eventfd (how virtio
  queue notifications reach an I/O thread), kvmpy sees no exit;
- in-kernel devices: the i8254 PIT (KVM_CREATE_PIT2, port 0x43) and the
  LAPIC timer's initial-count register (KVM_CREATE_IRQCHIP, MMIO
  0xfee00380): KVM emulates the device, kvmpy sees no exit.
The MMIO device and its ioeventfd are also written from guest user mode
(CPL3), where the store runs natively and only the fault on it traps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .._kvm import ffi
from ..kvm import Kvm
from ..platform import detect_backend
from ..stats.api import measure
from ..tiny import Guest
from .common import Sink, cpl_guest, kvm_counter, program, run_until_done, wire_done
from .report import LabResult, LabTable

PORT, EVENTFD_PORT = 0x80, 0x84
REPEATS = 3
MMIO_DEV, MMIO_EVENTFD = 0xD1000, 0xD2000  # in the tiny guests' legacy hole: no memory slot
PIT_MODE_PORT = 0x43
LAPIC_TMICT = 0xFEE0_0380
PIT_CONTROL = 0x34  # channel 0, lobyte/hibyte, mode 2 (rate generator)
TMICT_VALUE = 0x0100_0000  # the LVT timer stays masked (its reset state): no interrupt


@dataclass(frozen=True)
class WritePath:
    name: str
    pre: str  # kernel-mode set-up (%rbx = the target)
    write: str  # the write, one instruction
    cpl: int = 0
    kind: str = ""  # "port", "mmio", "port-eventfd", "mmio-eventfd", "pit", "lapic"


PATHS = (
    WritePath("port -> kvmpy device", "", f"out %al, ${PORT:#x}", kind="port"),
    WritePath("MMIO -> kvmpy device", f"mov ${MMIO_DEV:#x}, %rbx", "movb %al, (%rbx)", kind="mmio"),
    WritePath("port -> ioeventfd", "", f"out %al, ${EVENTFD_PORT:#x}", kind="port-eventfd"),
    WritePath("MMIO -> ioeventfd", f"mov ${MMIO_EVENTFD:#x}, %rbx", "movb %al, (%rbx)", kind="mmio-eventfd"),
    WritePath("port -> in-kernel PIT", f"mov ${PIT_CONTROL:#x}, %al", f"out %al, ${PIT_MODE_PORT:#x}", kind="pit"),
    WritePath("MMIO -> in-kernel LAPIC timer", f"mov ${LAPIC_TMICT:#x}, %rbx\n mov ${TMICT_VALUE:#x}, %eax",
         "movl %eax, (%rbx)", kind="lapic"),
    WritePath("MMIO -> kvmpy device, from CPL3", f"mov ${MMIO_DEV:#x}, %rbx", "movb %al, (%rbx)", 3, "mmio"),
    WritePath("MMIO -> ioeventfd, from CPL3", f"mov ${MMIO_EVENTFD:#x}, %rbx", "movb %al, (%rbx)", 3, "mmio-eventfd"),
)


@dataclass
class PathRun:
    exits: dict[str, int]
    kvm: dict[str, Any]
    device_writes: int | None  # what the device saw: kvmpy device writes, eventfd count, ...
    evidence: str
    seconds: float


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _run_path(kvm: Kvm, path: WritePath, count: int) -> PathRun:
    loop = f"""
    mov ${count}, %r8
1:  {path.write}
    dec %r8
    jnz 1b
"""
    source = program(path.pre, loop, path.cpl, 0)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with cpl_guest(kvm, source, path.cpl, irqchip=True) as g:
            g.vm.create_pit2()
            sink = Sink()
            g.pio.register(PORT, 1, sink, "sink")
            g.mmio.register(MMIO_DEV, 0x1000, sink, "sink")
            g.vm.ioeventfd(efd, EVENTFD_PORT, 1, pio=True)
            g.vm.ioeventfd(efd, MMIO_EVENTFD, 1)
            done = wire_done(g)
            g.make_loop()
            with measure(g) as m:
                _, seconds = run_until_done(g, done)
            r = m.result
            exits = {k: v for k, v in r.exits.items() if k != "INTR"}
            exits["IO" if path.cpl == 0 else "MMIO"] -= 1  # the done signal
            exits = {k: v for k, v in exits.items() if v}
            evidence, seen = _evidence(g, path, sink, lambda: _eventfd_count(efd))
            return PathRun(exits, dict(r.kvm), seen, evidence, seconds)
    finally:
        os.close(efd)


def _evidence(g: Guest, path: WritePath, sink: Sink, eventfd: Callable[[], int]) -> tuple[str, int | None]:
    """What the device's state says happened, read back from the VMM side."""
    if path.kind in ("port", "mmio"):
        return f"kvmpy device saw {sink.writes} writes", sink.writes
    if path.kind.endswith("eventfd"):
        n = eventfd()
        return f"eventfd counter {n}", n
    if path.kind == "pit":
        ch0 = g.vm.get_pit2().channels[0]
        return f"PIT channel 0 mode {ch0.mode}, rw_mode {ch0.rw_mode}", None
    lapic = g.vcpu.get_lapic()
    tmict = int.from_bytes(bytes(ffi.buffer(lapic.regs)[0x380:0x384]), "little")
    return f"LAPIC TMICT {tmict:#x}", None


def run(kvm: Kvm, quick: bool = False) -> LabResult:
    backend = detect_backend()
    count = 200 if quick else 5000
    result = LabResult("devices", "device emulation paths", backend.value, quick)
    table = LabTable(f"{count} guest writes per path, then done",
                     ["path", "CPL", "writes", "exits to kvmpy", "KVM exits", "KVM io_exits", "KVM mmio_exits",
                      "device saw", "us/write"])
    runs = {}
    for path in PATHS:
        # Best of REPEATS: on a shared host one run can lose milliseconds to the scheduler; counts are exact.
        r = min((_run_path(kvm, path, count) for _ in range(REPEATS)), key=lambda x: x.seconds)
        runs[path.name] = r
        table.add(path.name, path.cpl, count, sum(r.exits.values()), kvm_counter(r.kvm, "exits"),
                  kvm_counter(r.kvm, "io_exits"), kvm_counter(r.kvm, "mmio_exits"), r.evidence,
                  r.seconds * 1e6 / count)
    result.tables.append(table)
    port_run = runs[PATHS[0].name]
    if port_run.exits.get("IO") and not port_run.kvm.get("io_exits"):
        result.notes.append("this KVM backend leaves io_exits at 0 even for port writes that exited to kvmpy: "
                            "it counts them in `exits` only")
    port, efd = port_run.seconds, runs[PATHS[2].name].seconds
    result.notes.append(f"a port write completed in the kernel (ioeventfd) costs {port / efd:.1f}x less than one "
                        "that exits to kvmpy, on this host")
    result.series = {"count": count, "paths": {name: {"exits": r.exits, "seconds": r.seconds,
                                                      "device_writes": r.device_writes}
                                               for name, r in runs.items()}}
    return result


def plot(result: LabResult, directory: Path) -> list[Path]:
    from .plots import bar_chart

    names = list(result.series["paths"])
    count = result.series["count"]
    us = [result.series["paths"][n]["seconds"] * 1e6 / count for n in names]
    return [bar_chart(directory / "devices.png", names, {"us per write": us}, ylabel="us per write (log)",
                      title=f"lab devices ({result.backend}): where a guest write is handled", log=True)]

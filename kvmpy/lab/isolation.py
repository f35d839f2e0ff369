"""Lab 5, isolation: what a guest can and cannot reach, and what the VMM sees when it tries.

A guest names only guest-physical addresses (GPAs); KVM maps a GPA to host
memory only through the memory slots the VMM registered. Everything else a
hostile guest can do is an exit the VMM decides about: a load or store to a
GPA with no slot is a KVM_EXIT_MMIO (the VMM answers, or ignores it), a
store to a read-only slot is a KVM_EXIT_MMIO too (the memory is unchanged),
a port nobody claims is a KVM_EXIT_IO, fetching code from no memory ends in
KVM_EXIT_INTERNAL_ERROR, and a triple fault is KVM_EXIT_SHUTDOWN: the VM is
over, the VMM goes on. Each probe runs in a VM of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..exits import Exit, InternalErrorExit, ShutdownExit
from .._kvm import lib
from ..kvm import Kvm
from ..platform import detect_backend
from ..stats.api import measure
from ..tiny import RAM_SIZE, RecordingPort, tiny_guest
from .common import cpl_guest, program, run_loop, run_until_done, wire_done
from .report import LabResult, LabTable

NO_SLOT = 0xD3000  # in the legacy hole: no memory slot
ROM = RAM_SIZE  # a read-only slot right after the guest's RAM
ROM_SIZE = 0x4000
ROM_PATTERN = 0x5A
BEYOND = 0x8000_0000  # 2 GiB: far beyond RAM, mapped by the guest's page tables, no slot
UNCLAIMED_PORT = 0x3F8  # COM1's port: no device on this VM
RESULT = 0x8008  # the guest stores what it read here (0x8000 page: lab data, below the page tables)


@dataclass(frozen=True)
class Probe:
    name: str
    pre: str
    access: str  # one instruction, repeated N times
    cpl: int = 0
    watch: str = ""  # "no-slot", "rom", "beyond", "port", "" (no device)


PROBES = (
    Probe("load from a GPA with no slot", f"mov ${NO_SLOT:#x}, %rbx", "movq (%rbx), %rax", watch="no-slot"),
    Probe("store to a GPA with no slot", f"mov ${NO_SLOT:#x}, %rbx", "movq %rax, (%rbx)", watch="no-slot"),
    Probe("store to a GPA with no slot, from CPL3", f"mov ${NO_SLOT:#x}, %rbx", "movq %rax, (%rbx)", 3,
          watch="no-slot"),
    Probe("store 2 GiB beyond RAM", f"mov ${BEYOND:#x}, %rbx", "movq %rax, (%rbx)", watch="beyond"),
    Probe("load from a read-only slot", f"mov ${ROM:#x}, %rbx", "movq (%rbx), %rax", watch="rom"),
    Probe("store to a read-only slot", f"mov ${ROM:#x}, %rbx\n mov $0x1122334455667788, %rax",
          "movq %rax, (%rbx)", watch="rom"),
    Probe("store to a read-only slot, from CPL3", f"mov ${ROM:#x}, %rbx\n mov $0x1122334455667788, %rax",
          "movq %rax, (%rbx)", 3, watch="rom"),
    Probe("out to a port no device claims", f"mov ${UNCLAIMED_PORT:#x}, %dx", "out %al, %dx", watch="port"),
)


@dataclass
class ProbeRun:
    exits: dict[str, int]
    vmm_saw: int  # accesses the VMM's bus received for the watched range
    addresses: list[int]  # the distinct GPAs (or ports) the VMM was shown
    guest_got: str  # what the guest read, or the memory after the stores
    kvm_exits: int | None


def _run_probe(kvm: Kvm, probe: Probe, count: int) -> ProbeRun:
    keep = f"mov %rax, {RESULT:#x}" if probe.cpl == 0 else ""  # what the last load returned, for the VMM
    loop = f"""
    mov ${count}, %r8
1:  {probe.access}
    dec %r8
    jnz 1b
    {keep}
"""
    regions = {"rom": {"gpa": ROM, "size": ROM_SIZE, "readonly": True}}
    with cpl_guest(kvm, program(probe.pre, loop, probe.cpl, 0), probe.cpl, extra_regions=regions) as g:
        g.mem.fill(ROM, ROM_SIZE, ROM_PATTERN)
        recorder = RecordingPort()
        if probe.watch == "no-slot":
            g.mmio.register(NO_SLOT, 0x1000, recorder, "watch")
        elif probe.watch == "rom":
            g.mmio.register(ROM, ROM_SIZE, recorder, "watch")
        elif probe.watch == "beyond":
            g.mmio.register(BEYOND, 0x1000, recorder, "watch")
        done = wire_done(g)
        g.make_loop()
        unclaimed0 = g.pio.unclaimed
        with measure(g) as m:
            run_until_done(g, done)
        exits = {k: v for k, v in m.result.exits.items() if k != "INTR"}
        exits["IO" if probe.cpl == 0 else "MMIO"] -= 1  # the done signal
        exits = {k: v for k, v in exits.items() if v}
        if probe.watch == "port":
            saw, addresses = g.pio.unclaimed - unclaimed0, sorted({p for p, _ in m.result.io} - {0xF4})
        else:
            saw = len(recorder.writes) + len(recorder.read_offsets)
            base = {"no-slot": NO_SLOT, "rom": ROM, "beyond": BEYOND}.get(probe.watch, 0)
            addresses = sorted({base + o for o, _, _ in recorder.writes} | {base + o for o, _ in recorder.read_offsets})
        if probe.watch == "rom":
            intact = g.mem.read(ROM, ROM_SIZE) == bytes([ROM_PATTERN]) * ROM_SIZE
            got = f"slot unchanged ({ROM_PATTERN:#x} bytes)" if intact else "SLOT CHANGED"
            if probe.access.startswith("movq (") and probe.cpl == 0:
                got = f"read {g.mem.read_u64(RESULT):#x}; " + got
        elif probe.access.startswith("movq (") and probe.cpl == 0:
            got = f"read {g.mem.read_u64(RESULT):#x} (the VMM's answer)"
        else:
            got = "-"
        return ProbeRun(exits, saw, addresses, got, m.result.kvm.get("exits"))


FETCH = f"""
    mov ${NO_SLOT:#x}, %rax
    jmp *%rax                   # execute from a GPA with no memory slot
"""

TRIPLE_FAULT = """
    lidt idtr                   # an empty IDT: the next exception cannot be delivered
    ud2                         # #UD -> no gate -> #GP -> no gate -> #DF -> no gate: triple fault
idtr:
    .word 0
    .quad 0
"""


def _run_fatal(kvm: Kvm, source: str) -> tuple[Exit, str, int]:
    """Run a guest whose end is an exit the VMM did not ask for; (that exit, what it says, RIP then)."""
    with tiny_guest(kvm, "64", source) as g:
        seen: list[Exit] = []

        def stop(e: Exit) -> bool:
            seen.append(e)
            return False

        g.make_loop({lib.KVM_EXIT_INTERNAL_ERROR: stop})  # recorded, not completed
        exit, _ = run_loop(g.loop)
        rip = g.vcpu.get_regs().rip
        if isinstance(exit, InternalErrorExit):
            return exit, exit.describe(), rip
        if isinstance(exit, ShutdownExit):
            return exit, "KVM_EXIT_SHUTDOWN (triple fault): the VM cannot continue", rip
        return exit, exit.name, rip


def run(kvm: Kvm, quick: bool = False) -> LabResult:
    backend = detect_backend()
    count = 50 if quick else 1000
    result = LabResult("isolation", "isolation: what a guest can and cannot reach", backend.value, quick)
    table = LabTable(f"a guest probes outside its memory, {count} accesses per probe",
                     ["probe", "CPL", "accesses", "exits to kvmpy", "exit reason", "VMM bus saw", "at", "guest side"])
    runs = {}
    for probe in PROBES:
        r = _run_probe(kvm, probe, count)
        runs[probe.name] = r
        table.add(probe.name, probe.cpl, count, sum(r.exits.values()), ", ".join(sorted(r.exits)) or "none",
                  r.vmm_saw, ", ".join(f"{a:#x}" for a in r.addresses) or "-", r.guest_got)
    result.tables.append(table)

    fatal = LabTable("guests that end themselves: the exit the VMM gets, and the VMM afterwards",
                     ["probe", "exit", "what KVM reports", "guest RIP at the exit"])
    outcomes = {}
    for name, source in (("execute code from a GPA with no slot", FETCH),
                         ("triple fault (empty IDT, then ud2)", TRIPLE_FAULT)):
        exit, what, rip = _run_fatal(kvm, source)
        outcomes[name] = exit.name
        fatal.add(name, exit.name, what, f"{rip:#x}")
    result.tables.append(fatal)
    result.notes.append("after each fatal exit kvmpy closed that VM and went on: a guest can end "
                        "itself, not the VMM.")
    result.notes.append("no probe reached memory outside the guest's slots: every access outside RAM "
                        "became an exit with a guest-physical address the VMM chose how to answer.")
    result.series = {"count": count, "probes": {n: {"exits": r.exits, "vmm_saw": r.vmm_saw} for n, r in runs.items()},
                     "fatal": outcomes}
    return result


def plot(result: LabResult, directory: Path) -> list[Path]:
    from .plots import bar_chart

    probes = result.series["probes"]
    names = list(probes)
    values = {"guest accesses": [result.series["count"]] * len(names),
              "exits to kvmpy": [sum(probes[n]["exits"].values()) for n in names],
              "accesses the VMM's bus saw": [probes[n]["vmm_saw"] for n in names]}
    return [bar_chart(directory / "isolation.png", names, values, ylabel="count",
                      title=f"lab isolation ({result.backend}): what left the guest, per probe")]

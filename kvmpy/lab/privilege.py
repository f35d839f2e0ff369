"""Lab 1, privilege and trap-and-emulate: which instructions leave the guest, at CPL0 and at CPL3.

Each probe is one instruction run N times in a loop by a tiny 64-bit guest,
once in the guest kernel (CPL0) and once in guest user mode (CPL3, entered
with `iretq`). kvmpy counts what reached it (userspace exits by reason),
KVM's stats fd says how many exits KVM itself handled (the `exits`
counter), and the guest kernel's #GP handler counts the privileged
instructions user mode may not run (it skips them and returns). The same
compute loop then runs at CPL3 and CPL0: on a VT-x/AMD-V host both run
natively; on a software backend (PVM) CPL0 code is emulated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .._kvm import lib
from ..kvm import Kvm
from ..platform import Backend, detect_backend
from ..stats.api import measure
from ..tiny import ENTRY
from ..x86.asm import assemble
from ..x86.msr_filter import MsrFilter
from .common import FAULTS, Sink, cpl_guest, kvm_counter, program, run_until_done, wire_done
from .report import LabResult, LabTable

SINK_PORT = 0x80
REPEATS = 3
FILTERED_MSR = 0xC000_0103  # IA32_TSC_AUX: harmless, and its accesses are sent to kvmpy by an MSR filter


@dataclass(frozen=True)
class Probe:
    """One instruction to run N times. `pre` runs once in the guest kernel (setting the registers
    `insn` uses), `body` runs before `insn` in every iteration."""

    name: str
    insn: str
    why: str  # what VT-x/AMD-V do with it (the literature side of the table)
    pre: str = ""
    body: str = ""


PROBES = (
    Probe("loop only (baseline)", "nop", "never exits"),
    Probe("cpuid", "cpuid", "VT-x: always exits (unconditional); AMD-V: CPUID intercept, KVM sets it",
          body="xor %eax, %eax"),
    Probe("rdtsc", "rdtsc", "no exit: the CPU adds the TSC offset (RDTSC exiting off in KVM)"),
    Probe("pause", "pause", "exits only in a long spin (pause-loop exiting / pause filter)"),
    Probe("hlt", "hlt", "HLT exiting: KVM halts the vCPU or returns to userspace (no in-kernel LAPIC)"),
    Probe("out (port 0x80)", f"out %al, ${SINK_PORT:#x}", "I/O bitmap: exits; no in-kernel device -> userspace"),
    Probe("in (port 0x80)", f"in ${SINK_PORT:#x}, %al", "I/O bitmap: exits; no in-kernel device -> userspace"),
    Probe("rdmsr IA32_APIC_BASE", "rdmsr", "MSR bitmap: exits, KVM answers in the kernel",
          pre="mov $0x1b, %ecx"),
    Probe("wrmsr (filtered MSR)", "wrmsr", "exits; KVM_X86_SET_MSR_FILTER sends it on to userspace",
          pre=f"mov ${FILTERED_MSR:#x}, %ecx\n xor %eax, %eax\n xor %edx, %edx"),
    Probe("mov to cr3", "mov %rax, %cr3", "exits with shadow paging; no exit with EPT/NPT",
          pre="mov %cr3, %rax"),
    Probe("invlpg", "invlpg (%rbx)", "exits with shadow paging; no exit with EPT/NPT", pre="mov $0x100000, %rbx"),
    Probe("cli", "cli", "no exit (IF is virtualized); at CPL3 with IOPL 0 a #GP"),
)


def _guest_source(probe: Probe, count: int, cpl: int) -> str:
    loop = f"""
    mov ${count}, %r8
1:  {probe.body}
    {probe.insn}
    dec %r8
    jnz 1b
"""
    return program(probe.pre, loop, cpl, len(assemble(probe.insn, "64", ENTRY)))


@dataclass
class ProbeRun:
    userspace_exits: dict[str, int]
    kvm_exits: int | None
    faults: int
    seconds: float


def _run_probe(kvm: Kvm, probe: Probe, count: int, cpl: int) -> ProbeRun:
    with cpl_guest(kvm, _guest_source(probe, count, cpl), cpl) as g:
        sink = Sink()
        g.pio.register(SINK_PORT, 1, sink, "sink")
        msrs = MsrFilter(g.vm)
        msrs.intercept(FILTERED_MSR, lambda v, e: e.complete(0), lambda v, e: e.complete())
        msrs.install()
        done = wire_done(g)
        loop = g.make_loop({lib.KVM_EXIT_HLT: lambda e: True})  # hlt, no in-kernel LAPIC: back to the guest
        msrs.attach(loop)
        with measure(g) as m:
            _, seconds = run_until_done(g, done)
        r = m.result
        exits = {k: v for k, v in r.exits.items() if k != "INTR"}
        # The done signal is one exit of its own; it is not the probe's.
        key = "IO" if cpl == 0 else "MMIO"
        exits[key] -= 1
        exits = {k: v for k, v in exits.items() if v}
        return ProbeRun(exits, kvm_counter(r.kvm, "exits"), g.mem.read_u64(FAULTS), seconds)


def _verdict(run: ProbeRun, count: int, cpl: int, backend: Backend) -> str:
    if run.faults >= count:
        return "#GP to the guest kernel"
    userspace = sum(run.userspace_exits.values())
    if userspace >= count:
        return "exits to kvmpy (" + ", ".join(sorted(run.userspace_exits)) + ")"
    if run.kvm_exits is not None and run.kvm_exits >= count:
        return "exits to KVM, handled in the kernel"
    if cpl == 0 and backend is Backend.PVM:
        return "emulated by KVM, no exit"
    return "stays in the guest"


COMPUTE = """
    mov ${n}, %r8
    mov $3, %r9
    xor %r10, %r10
1:  imul %r9, %r10
    add $7, %r10
    dec %r8
    jnz 1b
"""


def _compute_source(n: int, cpl: int) -> str:
    return program("", COMPUTE.format(n=n), cpl, 0)


def _run_compute(kvm: Kvm, n: int, cpl: int) -> float:
    """Seconds for `n` iterations of the compute loop at `cpl` (minus an empty run's set-up time)."""
    def once(iterations: int) -> float:
        with cpl_guest(kvm, _compute_source(iterations, cpl), cpl) as g:
            done = wire_done(g)
            g.make_loop()
            return run_until_done(g, done)[1]

    return max(min(once(n) for _ in range(REPEATS)) - min(once(1) for _ in range(REPEATS)), 1e-9)


BACKEND_TEXT = {
    Backend.PVM: "PVM, a software KVM backend: guest user code (CPL3) runs natively on the host CPU; "
                 "guest kernel code (CPL0) and real mode run in KVM's instruction emulator, so every "
                 "CPL0 instruction is trapped and emulated (the classic software VMM).",
    Backend.VMX: "Intel VT-x (kvm_intel): the guest runs in VMX non-root mode at its own CPL0 and CPL3; "
                 "only instructions the VMCS controls make exit leave it.",
    Backend.SVM: "AMD-V (kvm_amd): the guest runs in SVM guest mode; the VMCB's intercepts decide "
                 "which instructions exit.",
    Backend.UNKNOWN: "unknown KVM backend (no kvm_intel, kvm_amd or kvm_pvm module found).",
}


def run(kvm: Kvm, quick: bool = False) -> LabResult:
    backend = detect_backend()
    count = 100 if quick else 1000
    result = LabResult("privilege", "privilege levels and trap-and-emulate", backend.value, quick)
    table = LabTable(f"each instruction {count} times, in the guest kernel (CPL0) and in guest user mode (CPL3)",
                     ["instruction", "CPL", "executed", "exits to kvmpy", "KVM exits", "guest #GP",
                      "ns/iteration", "what happened", "on VT-x/AMD-V"])
    runs: dict[str, dict[int, ProbeRun]] = {}
    for probe in PROBES:
        for cpl in (0, 3):
            # Best of REPEATS: on a shared host one run can lose milliseconds to the scheduler; counts are exact.
            r = min((_run_probe(kvm, probe, count, cpl) for _ in range(REPEATS)), key=lambda x: x.seconds)
            runs.setdefault(probe.name, {})[cpl] = r
            table.add(probe.name, cpl, count, sum(r.userspace_exits.values()), r.kvm_exits, r.faults,
                      r.seconds * 1e9 / count, _verdict(r, count, cpl, backend), probe.why if cpl == 0 else "")
    result.tables.append(table)

    n3, n0 = (2_000_000, 5_000) if quick else (20_000_000, 50_000)
    t3, t0 = _run_compute(kvm, n3, 3), _run_compute(kvm, n0, 0)
    ns3, ns0 = t3 * 1e9 / n3, t0 * 1e9 / n0
    compute = LabTable("the same compute loop (imul, add, dec, jnz) at CPL3 and at CPL0",
                       ["where", "iterations", "seconds", "ns/iteration", "x CPL3"])
    compute.add("guest user mode (CPL3)", n3, t3, ns3, 1.0)
    compute.add("guest kernel (CPL0)", n0, t0, ns0, ns0 / ns3)
    result.tables.append(compute)
    result.notes.append(f"backend: {BACKEND_TEXT[backend]}")
    result.notes.append(f"CPL0 code runs {ns0 / ns3:.0f}x slower than CPL3 code here "
                        "(near 1x on VT-x/AMD-V, where both run natively).")
    result.series = {
        "count": count,
        "probes": {name: {str(cpl): {"userspace_exits": r.userspace_exits, "kvm_exits": r.kvm_exits,
                                     "faults": r.faults, "seconds": r.seconds} for cpl, r in by.items()}
                   for name, by in runs.items()},
        "compute": {"cpl3_ns": ns3, "cpl0_ns": ns0},
    }
    return result


def plot(result: LabResult, directory: Path) -> list[Path]:
    from .plots import bar_chart

    names = list(result.series["probes"])
    count = result.series["count"]
    values = {f"CPL{cpl}": [result.series["probes"][n][str(cpl)]["seconds"] * 1e9 / count for n in names]
              for cpl in (0, 3)}
    return [bar_chart(directory / "privilege.png", names, values, ylabel="ns per iteration (log)",
                      title=f"lab privilege ({result.backend}): cost of one instruction at CPL0 and CPL3",
                      log=True)]

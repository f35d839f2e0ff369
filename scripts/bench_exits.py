#!/usr/bin/env python3
"""Exit round-trip benchmark: kvmpy against a minimal C VMM, in the same run.

Three measurements, each through kvmpy (VcpuLoop) and through a C program
this script writes, compiles with gcc and runs doing the same ioctls:

  pio   a guest loop of N `out`s: time per PIO exit round trip
  mmio  a guest loop of N stores to an unbacked address: per MMIO exit
  vm    KVM_CREATE_VM -> memory slot -> one vCPU -> run a `hlt` guest -> destroy

All guests are real-mode code from kvmpy.x86.asm (the C program reads the
machine code from a file), so the C side needs no page tables. Runs
alternate kvmpy and C `--repeat` times (paired); the report gives the
median and the spread (min-max) of each side and of the kvmpy/C ratio.
`--no-accounting` adds a third series: VcpuLoop with exit accounting
replaced by `NullAccounting` (plain KVM_RUN), and reports accounting's overhead.
`--update-docs` writes the table into docs/performance.md.

    .venv/bin/python scripts/bench_exits.py [--iterations N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perfdoc import DOC, update_section

import kvmpy
from kvmpy.stats.accounting import ExitAccounting, NullAccounting
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble

ENTRY = 0x1000
MEM_SIZE = 0x10000  # one 64 KiB slot at GPA 0; 0x10000 and up is unbacked (MMIO)
PORT = 0x10
MMIO_ADDR = 0x10000
HEADING = "## Exit round trips (scripts/bench_exits.py)"

# The loop count comes in ECX (set through KVM_SET_REGS by both VMMs).
GUESTS = {
    "pio": """
        1: out %al, $0x10
           dec %ecx
           jnz 1b
           hlt
    """,
    "mmio": """
           mov $0x1000, %bx
           mov %bx, %ds          # DS base 0x10000: outside the memory slot
        1: movb %al, (0)
           dec %ecx
           jnz 1b
           hlt
    """,
    "vm": "hlt",
}

C_SOURCE = r"""
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define ENTRY 0x1000
#define MEM_SIZE 0x10000

static void die(const char *what) { perror(what); exit(1); }

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

struct vm { int fd, vcpu; struct kvm_run *run; size_t run_size; uint8_t *mem; };

static void vm_create(int kvm, struct vm *v, const uint8_t *code, size_t len, uint64_t rcx)
{
    if ((v->fd = ioctl(kvm, KVM_CREATE_VM, 0)) < 0) die("KVM_CREATE_VM");
    v->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (v->mem == MAP_FAILED) die("mmap guest memory");
    memcpy(v->mem + ENTRY, code, len);
    struct kvm_userspace_memory_region r = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)v->mem };
    if (ioctl(v->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION");
    if ((v->vcpu = ioctl(v->fd, KVM_CREATE_VCPU, 0)) < 0) die("KVM_CREATE_VCPU");
    v->run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    if (v->run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs s;
    if (ioctl(v->vcpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
    s.cs.base = 0; s.cs.selector = 0;
    s.ds.base = 0; s.ds.selector = 0; s.ss.base = 0; s.ss.selector = 0;
    if (ioctl(v->vcpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = ENTRY; regs.rflags = 2; regs.rsp = 0x7000; regs.rcx = rcx;
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
}

static void vm_destroy(struct vm *v)
{
    munmap(v->run, v->run_size);
    close(v->vcpu);
    close(v->fd);
    munmap(v->mem, MEM_SIZE);
}

/* KVM_RUN until HLT; returns the number of I/O and MMIO exits. */
static long run_to_hlt(struct vm *v)
{
    long exits = 0;
    for (;;) {
        if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR) continue;
            die("KVM_RUN");
        }
        switch (v->run->exit_reason) {
        case KVM_EXIT_IO: case KVM_EXIT_MMIO: exits++; continue;
        case KVM_EXIT_HLT: return exits;
        default: fprintf(stderr, "unexpected exit %u\n", v->run->exit_reason); exit(2);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 4) { fprintf(stderr, "usage: %s pio|mmio|vm CODE.bin COUNT\n", argv[0]); return 1; }
    long count = atol(argv[3]);
    uint8_t code[4096];
    FILE *f = fopen(argv[2], "rb");
    if (!f) die(argv[2]);
    size_t len = fread(code, 1, sizeof code, f);
    fclose(f);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    struct vm v;
    long long t0, t1;
    long exits = 0;
    if (strcmp(argv[1], "vm") == 0) {
        t0 = now_ns();
        for (long i = 0; i < count; i++) {
            vm_create(kvm, &v, code, len, 0);
            run_to_hlt(&v);
            vm_destroy(&v);
        }
        t1 = now_ns();
        exits = count;
    } else {
        vm_create(kvm, &v, code, len, count);
        t0 = now_ns();
        exits = run_to_hlt(&v);
        t1 = now_ns();
        vm_destroy(&v);
    }
    printf("ns=%lld count=%ld\n", t1 - t0, exits);
    return 0;
}
"""


class NullDevice:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def _kvmpy_guest(kvm: kvmpy.Kvm, code: bytes, count: int, accounting: ExitAccounting | None
                 ) -> tuple[kvmpy.Vm, kvmpy.GuestMemory, kvmpy.VcpuLoop]:
    vm = kvm.create_vm()
    mem = kvmpy.GuestMemory(MEM_SIZE)
    vm.add_memory(mem)
    mem.write(ENTRY, code)
    vcpu = vm.create_vcpu()
    modes.setup_real_mode(vcpu, ENTRY)
    if count:
        regs = vcpu.get_regs()
        regs.rcx = count
        vcpu.set_regs(regs)
    pio, mmio = kvmpy.pio_bus(), kvmpy.mmio_bus()
    pio.register(PORT, 1, NullDevice())
    mmio.register(MMIO_ADDR, 0x1000, NullDevice())
    loop = kvmpy.VcpuLoop(vcpu, pio, mmio, accounting=accounting if accounting is not None else ExitAccounting(vcpu.id))
    return vm, mem, loop


def run_kvmpy(kvm: kvmpy.Kvm, kind: str, code: bytes, count: int, *, accounting: bool = True) -> float:
    """Nanoseconds per exit (pio, mmio) or per VM lifecycle (vm)."""
    acct = None if accounting else NullAccounting()
    if kind == "vm":
        t0 = time.perf_counter_ns()
        for _ in range(count):
            vm, mem, loop = _kvmpy_guest(kvm, code, 0, acct)
            exit = loop.run()
            vm.close()
            mem.close()
        t1 = time.perf_counter_ns()
        if not isinstance(exit, kvmpy.HltExit):
            raise SystemExit(f"kvmpy vm run ended with {exit}")
        return (t1 - t0) / count
    vm, mem, loop = _kvmpy_guest(kvm, code, count, acct)
    try:
        t0 = time.perf_counter_ns()
        exit = loop.run()
        t1 = time.perf_counter_ns()
        if not isinstance(exit, kvmpy.HltExit):
            raise SystemExit(f"kvmpy {kind} run ended with {exit}")
        if accounting:
            reason = kvmpy.ExitReason.IO if kind == "pio" else kvmpy.ExitReason.MMIO
            if loop.accounting.exits[reason] != count:
                raise SystemExit(f"kvmpy {kind}: {loop.accounting.exits[reason]} exits, expected {count}")
    finally:
        vm.close()
        mem.close()
    return (t1 - t0) / count


def run_c(binary: Path, kind: str, code_file: Path, count: int) -> float:
    out = subprocess.run([str(binary), kind, str(code_file), str(count)], check=True,
                         capture_output=True, text=True).stdout
    fields = dict(f.split("=") for f in out.split())
    if int(fields["count"]) != count:
        raise SystemExit(f"C {kind}: {fields['count']} exits, expected {count}")
    return int(fields["ns"]) / count


def build_c(tmp: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("gcc not found: the C reference VMM cannot be built (apt-get install gcc)")
    src, binary = tmp / "bench_exits.c", tmp / "bench_exits"
    src.write_text(C_SOURCE)
    subprocess.run([gcc, "-O2", "-o", str(binary), str(src)], check=True)
    return binary


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def host_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    backend = "PVM software KVM (kvm_pvm)" if os.path.exists("/sys/module/kvm_pvm") else "hardware KVM"
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, {backend}, "
            f"Python {platform.python_version()}, load average {load:.2f} at start")


def measure(args: argparse.Namespace) -> dict:
    kvm = kvmpy.Kvm()
    counts = {"pio": args.iterations, "mmio": args.iterations, "vm": args.vm_iterations}
    results: dict = {"date": datetime.date.today().isoformat(), "host": host_description(),
                     "iterations": counts, "repeat": args.repeat, "benchmarks": {}}
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as tmp:
        tmpdir = Path(tmp)
        binary = build_c(tmpdir)
        for kind in args.only or ("pio", "mmio", "vm"):
            code = assemble(GUESTS[kind], "16", ENTRY)
            code_file = tmpdir / f"{kind}.bin"
            code_file.write_bytes(code)
            n = counts[kind]
            # One untimed warm-up of each side (page faults, caches, first compile of the asm).
            run_kvmpy(kvm, kind, code, max(n // 10, 1))
            run_c(binary, kind, code_file, max(n // 10, 1))
            series: dict[str, list[float]] = {"kvmpy": [], "c": [], "ratio": []}
            if args.no_accounting:
                series.update({"kvmpy_no_accounting": [], "accounting_overhead_pct": []})
            for i in range(args.repeat):
                # kvmpy with and without accounting back to back, in alternating order, so a
                # change of host load between the two halves of a pair averages out.
                if args.no_accounting and i % 2:
                    bare = run_kvmpy(kvm, kind, code, n, accounting=False)
                    py = run_kvmpy(kvm, kind, code, n)
                else:
                    py = run_kvmpy(kvm, kind, code, n)
                    bare = run_kvmpy(kvm, kind, code, n, accounting=False) if args.no_accounting else 0.0
                c = run_c(binary, kind, code_file, n)
                series["kvmpy"].append(py)
                series["c"].append(c)
                series["ratio"].append(py / c)
                if args.no_accounting:
                    series["kvmpy_no_accounting"].append(bare)
                    series["accounting_overhead_pct"].append(100 * (py - bare) / bare)
            results["benchmarks"][kind] = {name: summary(v) for name, v in series.items()}
    kvm.close()
    return results


LABELS = {"pio": "PIO exit round trip (`out`)", "mmio": "MMIO exit round trip (store)",
          "vm": "VM create + vCPU + run to HLT + destroy"}


def _us(s: dict[str, float]) -> str:
    return f"{s['median'] / 1000:.2f} ({s['min'] / 1000:.2f}-{s['max'] / 1000:.2f})"


def table(results: dict) -> str:
    acct = any("kvmpy_no_accounting" in b for b in results["benchmarks"].values())
    head = "| measurement | kvmpy us | C us | kvmpy/C |"
    rule = "| --- | --- | --- | --- |"
    if acct:
        head += " kvmpy, no accounting us | accounting overhead |"
        rule += " --- | --- |"
    lines = [head, rule]
    for kind, b in results["benchmarks"].items():
        r = b["ratio"]
        row = (f"| {LABELS[kind]} | {_us(b['kvmpy'])} | {_us(b['c'])} | "
               f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |")
        if acct:
            o = b["accounting_overhead_pct"]
            row += (f" {_us(b['kvmpy_no_accounting'])} | "
                    f"{o['median']:+.1f}% ({o['min']:+.1f}..{o['max']:+.1f}) |")
        lines.append(row)
    return "\n".join(lines)


def doc_section(results: dict) -> str:
    it = results["iterations"]
    return f"""{HEADING}

Measured {results['date']} on {results['host']}.
`scripts/bench_exits.py --repeat {results['repeat']} --iterations {it['pio']} --vm-iterations {it['vm']}
--no-accounting`: kvmpy's `VcpuLoop` and a minimal C VMM (written, compiled
and run by the script) do the same ioctls on the same real-mode guests from
`kvmpy.x86.asm`, alternating, {results['repeat']} pairs. Each cell: median (min-max)
of the pairs; times per exit (per VM for the last row).

{table(results)}

On this software backend the guest's `out`/store is itself emulated, so
the C column is mostly the backend's own cost; on VT-x/AMD-V the C round
trip is far shorter and the ratio larger. Accounting overhead compares
`VcpuLoop` with the default `ExitAccounting` against `NullAccounting`
(plain KVM_RUN), the two runs of a pair back to back in alternating order;
with a few pairs its spread is wide, and `scripts/bench_stats_overhead.py`
(many short pairs) gives the firmer figure below.
"""


def update_doc(results: dict) -> None:
    update_section(HEADING, doc_section(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=20000, help="exits per PIO/MMIO run (default 20000)")
    p.add_argument("--vm-iterations", type=int, default=50, help="VM lifecycles per run (default 50)")
    p.add_argument("--repeat", type=int, default=5, help="kvmpy/C pairs per measurement (default 5)")
    p.add_argument("--no-accounting", action="store_true",
                   help="also run VcpuLoop with NullAccounting (plain KVM_RUN) and report the overhead")
    p.add_argument("--only", nargs="+", choices=["pio", "mmio", "vm"], help="run only these")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--update-docs", action="store_true", help=f"write the table into {DOC}")
    args = p.parse_args(argv)
    reason = kvmpy.kvm_available()
    if reason is not None:
        print(f"cannot benchmark: {reason}", file=sys.stderr)
        return 1
    results = measure(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{results['date']}  {results['host']}")
        print(table(results))
    if args.update_docs:
        update_doc(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

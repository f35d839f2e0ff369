#!/usr/bin/env python3
"""Micro-VM benchmark: guest-function life cycle vs C, Linux restore vs boot, memory per idle VM.

1. lifecycle: create VM -> memory -> vCPU -> registers -> run a guest
   function to its result -> destroy, through `kvmpy.sandbox.GuestFunction`,
   against a C program this script writes and compiles that does the same
   ioctls on the same bytes (the low-memory tables, the image, the ABI block,
   the sregs/regs kvmpy loads, dumped by this script) and handles the same
   exits. Runs alternate (kvmpy batch, C batch) `--repeat` times; the report
   gives median and p99 per call of each side and the ratio of medians.
2. restore: boot the Linux guest once to its shell (the boot time), snapshot
   it, then restore `--restores` clones from the opened snapshot one after
   another (each closed before the next): median and p99 of the restore,
   and boot / restore.
3. memory: `--idle` clones restored from the snapshot at once, idling; the
   process's RSS and PSS (psutil) before and with them, per clone; the
   booted original's own RSS for comparison. Clones map the memory file
   MAP_PRIVATE, so PSS counts their shared page-cache pages once.

    .venv/bin/python scripts/bench_microvm.py [--calls 200] [--repeat 5] [--restores 10] [--idle 8] [--update-docs]
"""

from __future__ import annotations

import argparse
import datetime
import mmap
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perfdoc import update_section  # noqa: E402

from kvmpy import sandbox  # noqa: E402
from kvmpy._kvm import ffi, lib  # noqa: E402
from kvmpy.dirty import DirtyLogMode  # noqa: E402

HEADING = "## Micro-VMs (scripts/bench_microvm.py)"
WARM_HEADING = "## Warm reset of guest functions (scripts/bench_microvm.py)"
FUNCTION = "long guest_main(long a, long b) { return a * b + 1; }"

C_SOURCE = r"""
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

static void *slurp(const char *dir, const char *name, size_t *len) {
    char path[4096]; snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb"); if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END); *len = ftell(f); fseek(f, 0, SEEK_SET);
    void *p = malloc(*len ? *len : 1); if (fread(p, 1, *len, f) != *len) exit(2); fclose(f); return p;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static size_t n_low, n_img, n_tramp, n_prol, n_abi, n_sregs, n_regs, n_cpuid, n_layout;
static uint8_t *low, *img, *tramp, *prol, *abi, *sregs_bin, *regs_bin, *cpuid;
static uint64_t mem_size, img_addr, tramp_addr, abi_addr, prol_addr, doorbell, expect;

/* A VM as kvmpy's sandbox builds it: memory, one vCPU in its state, synced registers on. */
static void build(int kvm, int run_size, int *vm, int *vcpu, uint8_t **mem, struct kvm_run **run, uint32_t flags) {
    *vm = ioctl(kvm, KVM_CREATE_VM, 0);
    *mem = mmap(0, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    memcpy(*mem, low, 0x10000); memcpy(*mem + tramp_addr, tramp, n_tramp); memcpy(*mem + prol_addr, prol, n_prol);
    memcpy(*mem + img_addr, img, n_img); memcpy(*mem + abi_addr, abi, n_abi);
    memcpy(*mem + mem_size - 8, &tramp_addr, 8);
    struct kvm_userspace_memory_region r = { .slot = 0, .flags = flags, .guest_phys_addr = 0,
                                             .memory_size = mem_size, .userspace_addr = (uint64_t)*mem };
    ioctl(*vm, KVM_SET_USER_MEMORY_REGION, &r);
    *vcpu = ioctl(*vm, KVM_CREATE_VCPU, 0);
    *run = mmap(0, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, *vcpu, 0);
    ioctl(*vcpu, KVM_SET_CPUID2, cpuid);
    struct kvm_sregs sregs; ioctl(*vcpu, KVM_GET_SREGS, &sregs);
    memcpy(&sregs, sregs_bin, sizeof sregs); ioctl(*vcpu, KVM_SET_SREGS, &sregs);
    struct kvm_regs regs; ioctl(*vcpu, KVM_GET_REGS, &regs);
    memcpy(&regs, regs_bin, sizeof regs); ioctl(*vcpu, KVM_SET_REGS, &regs);
    (*run)->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
}

/* KVM_RUN until the doorbell says HC_RETURN; the result is rax in the synced registers. */
static int64_t call(int vcpu, struct kvm_run *run) {
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) { perror("KVM_RUN"); exit(1); }
        if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.phys_addr != doorbell || !run->mmio.is_write) {
            fprintf(stderr, "exit %d\n", run->exit_reason); exit(1);
        }
        if (run->mmio.data[0] == 0) return (int64_t)run->s.regs.regs.rax;
    }
}

int main(int argc, char **argv) {
    const char *dir = argv[1]; int calls = atoi(argv[2]); int warm = argc > 3 && !strcmp(argv[3], "warm");
    low = slurp(dir, "low.bin", &n_low); img = slurp(dir, "image.bin", &n_img);
    tramp = slurp(dir, "tramp.bin", &n_tramp); prol = slurp(dir, "prologue.bin", &n_prol);
    abi = slurp(dir, "abi.bin", &n_abi);
    sregs_bin = slurp(dir, "sregs.bin", &n_sregs); regs_bin = slurp(dir, "regs.bin", &n_regs);
    cpuid = slurp(dir, "cpuid.bin", &n_cpuid);
    uint64_t *layout = slurp(dir, "layout.bin", &n_layout);
    mem_size = layout[0]; img_addr = layout[1]; tramp_addr = layout[2]; abi_addr = layout[3];
    prol_addr = layout[4]; doorbell = layout[5]; expect = layout[6];
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    int vm, vcpu; uint8_t *mem; struct kvm_run *run;
    if (!warm) {
        for (int i = 0; i < calls; i++) {
            double t0 = now();
            build(kvm, run_size, &vm, &vcpu, &mem, &run, 0);
            int64_t result = call(vcpu, run);
            munmap(run, run_size); close(vcpu); close(vm); munmap(mem, mem_size);
            double t1 = now();
            if (result != (int64_t)expect) { fprintf(stderr, "result %ld\n", (long)result); return 1; }
            printf("%.9f\n", t1 - t0);
        }
        return 0;
    }
    /* Warm: one VM, a pristine copy of its memory and state; each call is ABI block + registers,
       KVM_RUN, then KVM_GET_DIRTY_LOG, the dirty (and host-written) pages copied back, KVM_SET_XSAVE. */
    build(kvm, run_size, &vm, &vcpu, &mem, &run, KVM_MEM_LOG_DIRTY_PAGES);
    uint8_t *pristine = malloc(mem_size); memcpy(pristine, mem, mem_size);
    size_t words = mem_size / 4096 / 64; uint64_t *bitmap = calloc(words, 8);
    struct kvm_dirty_log log = { .slot = 0, .dirty_bitmap = bitmap };
    ioctl(vm, KVM_GET_DIRTY_LOG, &log);
    struct kvm_regs regs0; ioctl(vcpu, KVM_GET_REGS, &regs0);
    struct kvm_vcpu_events ev0; ioctl(vcpu, KVM_GET_VCPU_EVENTS, &ev0);
    ev0.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    struct kvm_xsave *xs0 = malloc(sizeof *xs0); ioctl(vcpu, KVM_GET_XSAVE, xs0);
    struct kvm_regs *args = (struct kvm_regs *)regs_bin;  /* rdi, rsi of the call */
    for (int i = 0; i < calls; i++) {
        double t0 = now();
        memcpy(mem + abi_addr, abi, n_abi);
        run->s.regs.regs = regs0; run->s.regs.regs.rdi = args->rdi; run->s.regs.regs.rsi = args->rsi;
        run->s.regs.events = ev0;
        run->kvm_dirty_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_EVENTS;
        int64_t result = call(vcpu, run);
        ioctl(vm, KVM_GET_DIRTY_LOG, &log);
        bitmap[abi_addr / 4096 / 64] |= 1ull << (abi_addr / 4096 % 64);  /* the host's own write */
        for (size_t w = 0; w < words; w++)
            for (uint64_t b = bitmap[w]; b; b &= b - 1) {
                size_t page = w * 64 + __builtin_ctzll(b);
                memcpy(mem + page * 4096, pristine + page * 4096, 4096);
            }
        ioctl(vcpu, KVM_SET_XSAVE, xs0);
        double t1 = now();
        if (result != (int64_t)expect) { fprintf(stderr, "result %ld\n", (long)result); return 1; }
        printf("%.9f\n", t1 - t0);
    }
    return 0;
}
"""


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _dump_inputs(fn: sandbox.GuestFunction, workdir: Path, a: int, b: int) -> None:
    """The exact bytes and register values `sandbox` loads for fn(a, b)."""
    mem_size = fn.memory
    state = sandbox.initial_state(fn, a, b)
    (workdir / "low.bin").write_bytes(state.low)
    (workdir / "tramp.bin").write_bytes(state.trampoline)
    (workdir / "prologue.bin").write_bytes(state.prologue)
    seg = fn.image.segments[0]
    assert len(fn.image.segments) == 1 and seg.vaddr == sandbox.IMAGE_BASE
    (workdir / "image.bin").write_bytes(seg.data)
    (workdir / "abi.bin").write_bytes(state.abi)
    (workdir / "sregs.bin").write_bytes(state.sregs)
    (workdir / "regs.bin").write_bytes(state.regs)
    entries = state.cpuid
    c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for dst, src in zip(c.entries[0:len(entries)], entries):
        for f in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
            setattr(dst, f, getattr(src, f))
    (workdir / "cpuid.bin").write_bytes(bytes(ffi.buffer(c, ffi.sizeof("struct kvm_cpuid2")
                                                         + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))))
    layout = [mem_size, sandbox.IMAGE_BASE, sandbox.TRAMPOLINE_ADDR, sandbox.ABI_ADDR, sandbox.PROLOGUE_ADDR,
              sandbox.DOORBELL_ADDR, a * b + 1]
    (workdir / "layout.bin").write_bytes(struct.pack(f"<{len(layout)}Q", *layout))


def bench_lifecycle(calls: int, repeat: int) -> dict:
    """Alternating batches: kvmpy fresh, C fresh, kvmpy warm (ring, bitmap), C warm; seconds per call."""
    fn = sandbox.GuestFunction(FUNCTION, memory="16M", timeout=None)
    warm = {m: sandbox.GuestFunction(FUNCTION, memory="16M", timeout=None, warm=True, dirty_mode=m)
            for m in ("ring", "bitmap")}
    assert fn(6, 7) == 43 and all(w(6, 7) == 43 for w in warm.values())
    work = Path(tempfile.mkdtemp(prefix="kvmpy-bench-microvm-"))
    out: dict[str, list[float]] = {"py": [], "c": [], "warm_ring": [], "warm_bitmap": [], "c_warm": []}

    def c_batch(*mode: str) -> list[float]:
        p = subprocess.run([str(work / "life"), str(work), str(calls), *mode], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"C lifecycle program failed: {p.stderr}")
        return [float(x) for x in p.stdout.split()]

    try:
        _dump_inputs(fn, work, 6, 7)
        (work / "life.c").write_text(C_SOURCE)
        subprocess.run(["gcc", "-O2", "-o", str(work / "life"), str(work / "life.c")], check=True)
        for _ in range(repeat):
            for key, f in (("py", fn), ("warm_ring", warm["ring"]), ("warm_bitmap", warm["bitmap"])):
                for _ in range(calls):
                    t0 = time.perf_counter()
                    assert f(6, 7) == 43
                    out[key].append(time.perf_counter() - t0)
            out["c"] += c_batch()
            out["c_warm"] += c_batch("warm")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for w in warm.values():
            w.close()
    return out


WRITER = "long guest_main(long n) { volatile char *p = (char *)0x400000; " \
         "for (long i = 0; i < n; i++) p[i * 4096] = 1; return n; }"


def _median_us(fn, n: int = 300) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def bench_breakdown(pages: int = 16) -> dict:
    """Where a warm call's time goes, part by part, with a guest that writes `pages` heap pages."""
    res: dict[str, float] = {}
    for mode in (DirtyLogMode.RING, DirtyLogMode.BITMAP):
        _breakdown_mode(res, mode, pages)
    return res


def _breakdown_mode(res: dict, mode: DirtyLogMode, pages: int) -> None:
    """`bench_breakdown`'s parts for one dirty-tracking mode (a function: its closures are timed at once)."""
    with sandbox.GuestFunction(WRITER, memory="16M", timeout=None, warm=True, dirty_mode=mode) as f:
        assert f(pages) == pages
        res[f"call+reset, {mode.value}"] = _median_us(lambda: f(pages))
        w = f.warm_vms[0]
        cp, vcpu = w.checkpoint, w.vcpu
        region = cp.regions[0]
        run = vcpu.run_struct

        def kvm_run(reset: bool) -> float:
            if reset:
                cp.reset()  # copies back and write-protects what the last run wrote
            else:
                cp.vcpus[0].restore()  # registers only: the pages stay writable
            run.s.regs.regs.rdi = pages
            run.immediate_exit = 0
            t0 = time.perf_counter()
            assert vcpu.run_raw() == lib.KVM_EXIT_MMIO
            return time.perf_counter() - t0

        res[f"KVM_RUN of the call, {mode.value}"] = statistics.median(kvm_run(True) for _ in range(200)) * 1e6
        if mode is DirtyLogMode.RING:  # the same run with its pages left writable: the tracking's price
            kvm_run(False)
            res["KVM_RUN of the call, its pages not write-protected again"] = \
                statistics.median(kvm_run(False) for _ in range(200)) * 1e6
            cp.reset()

        def collect() -> None:
            kvm_run(True)
            t0 = time.perf_counter()
            cp.tracker.collect()
            res.setdefault(f"collect {pages} dirty pages, {mode.value}", []).append(time.perf_counter() - t0)
        for _ in range(200):
            collect()
        res[f"collect {pages} dirty pages, {mode.value}"] = \
            statistics.median(res[f"collect {pages} dirty pages, {mode.value}"]) * 1e6
        if mode is DirtyLogMode.RING:
            image, view = cp.image[0], region.view
            base = 0x400000

            def copy() -> None:
                for i in range(pages):
                    a = base + i * 4096
                    view[a:a + 4096] = image.page(a // 4096)
            res[f"copy back {pages} pages"] = _median_us(copy)
            st = cp.vcpus[0]
            # where the checkpoint's restore copies them: the synced registers in kvm_run
            dst_regs, dst_events = ffi.addressof(run.s.regs, "regs"), ffi.addressof(run.s.regs, "events")
            res["KVM_SET_XSAVE"] = _median_us(lambda: vcpu.set_xsave(st.fpu))
            res["registers and events through kvm_run (no ioctl)"] = _median_us(
                lambda: (ffi.memmove(dst_regs, st.regs, ffi.sizeof("struct kvm_regs")),
                         ffi.memmove(dst_events, st.events, ffi.sizeof("struct kvm_vcpu_events"))))
            # The memfd/MADV_DONTNEED alternative: these heap pages are pristine zero, so dropping them
            # restores them; the price is paid by the next run, which faults each one in again.
            mapping = region.mapping
            res[f"MADV_DONTNEED of {pages} pages"] = _median_us(
                lambda: mapping.madvise(mmap.MADV_DONTNEED, base, pages * 4096))

            def run_after_dontneed() -> float:
                kvm_run(True)
                mapping.madvise(mmap.MADV_DONTNEED, base, pages * 4096)  # zero = their pristine content
                cp.tracker.collect()  # and tracked again, as a memfd-backed reset would leave them
                return kvm_run(False)
            res["KVM_RUN of the call after MADV_DONTNEED"] = \
                statistics.median(run_after_dontneed() for _ in range(200)) * 1e6
            cp.reset()


def bench_restore(restores: int, idle: int) -> dict:
    from kvmpy.boot.initramfs import build_busybox_initramfs
    from kvmpy.guest.build import build_kernel
    from kvmpy.machine import DEFAULT_CMDLINE
    from kvmpy.microvm import MicroVM, MicroVMConfig
    from kvmpy.snapshot import Snapshot

    kernel, initrd = build_kernel(progress=False).vmlinux, build_busybox_initramfs()
    proc = psutil.Process()
    work = Path(tempfile.mkdtemp(prefix="kvmpy-bench-snap-"))
    try:
        base = proc.memory_full_info()
        t0 = time.monotonic()
        vm = MicroVM(MicroVMConfig(kernel=kernel, initrd=initrd, memory="128M",
                                   cmdline=DEFAULT_CMDLINE + " clocksource=refined-jiffies"))
        vm.start()
        vm.expect("# ", 900)
        boot = time.monotonic() - t0
        time.sleep(2)
        booted = proc.memory_full_info()
        t = time.perf_counter()
        vm.snapshot(work / "s")
        snap_seconds = time.perf_counter() - t
        vm.close()
        t = time.perf_counter()
        snap = Snapshot.open(work / "s")
        open_seconds = time.perf_counter() - t
        times = []
        for _ in range(restores):
            t = time.perf_counter()
            clone = MicroVM.restore(snap)
            times.append(time.perf_counter() - t)
            clone.close()
        check = MicroVM.restore(snap)
        answer = check.run("echo restored-$((40+2))", timeout=300).strip()
        check.close()
        before = proc.memory_full_info()
        clones = [MicroVM.restore(snap) for _ in range(idle)]
        time.sleep(5)
        with_clones = proc.memory_full_info()
        for c in clones:
            c.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"boot": boot, "snapshot": snap_seconds, "open": open_seconds, "restore": times, "answer": answer,
            "booted_rss": booted.rss - base.rss, "booted_pss": booted.pss - base.pss,
            "clone_rss": (with_clones.rss - before.rss) / idle, "clone_pss": (with_clones.pss - before.pss) / idle,
            "idle": idle}


def _warm_section(life: dict, parts: dict, args: argparse.Namespace, load: float) -> str:
    med = {k: statistics.median(v) for k, v in life.items()}
    p99 = {k: _pct(v, 99) for k, v in life.items()}
    rows = ["| per call | median | p99 | / kvmpy fresh VM | / C fresh VM | / C warm |",
            "| --- | --- | --- | --- | --- | --- |"]
    for key, name in (("warm_ring", "kvmpy warm VM, reset by the dirty ring"),
                      ("warm_bitmap", "kvmpy warm VM, reset by the dirty bitmap (+ hot pages left writable)"),
                      ("c_warm", "C warm VM (GET_DIRTY_LOG, copy back, SET_XSAVE)"),
                      ("py", "kvmpy fresh VM per call"), ("c", "C fresh VM per call")):
        rows.append(f"| {name} | {med[key] * 1e6:.0f} us | {p99[key] * 1e6:.0f} us | "
                    f"{med[key] / med['py']:.3f} | {med[key] / med['c']:.3f} | {med[key] / med['c_warm']:.2f} |")
    brk = ["| part (a warm call whose guest writes the same 16 heap pages each time) | median |",
           "| --- | --- |"]
    brk += [f"| {k} | {v:.1f} us |" for k, v in parts.items()]
    return "\n".join([
        WARM_HEADING, "",
        f"Measured {datetime.date.today()}, load average {load:.2f} at start, in the same run as the section "
        f"above: `{FUNCTION}` called {args.calls} times per batch, {args.repeat} alternating rounds of "
        "kvmpy fresh, kvmpy warm (ring), kvmpy warm (bitmap), C fresh, C warm. A warm call is the ABI block, "
        "KVM_RUN to the doorbell, and the reset to the checkpoint (dirty pages copied back, registers and "
        "events through kvm_run, KVM_SET_XSAVE).", "", *rows, "", *brk, "",
        "The KVM_RUN of a warm call includes a write fault for every page the previous call dirtied when the "
        "reset write-protects them again (KVM_RESET_DIRTY_RINGS, KVM_CLEAR_DIRTY_LOG): about 25 us a page "
        "on this shadow-paging backend. With the bitmap and manual protect, pages dirtied by two calls in a "
        "row are left writable and copied back at every reset instead (`Checkpoint.hot`, at most 256): the "
        "bitmap rows. Dropping pages with "
        "MADV_DONTNEED (a private mapping of a pristine memfd would restore that way) is cheaper on the host "
        "side but makes the next run fault each page in again, through the MMU notifier; copying back "
        "keeps KVM's mappings.",
    ]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="guest-function calls per batch")
    ap.add_argument("--repeat", type=int, default=5, help="alternating kvmpy/C batch pairs")
    ap.add_argument("--restores", type=int, default=10)
    ap.add_argument("--idle", type=int, default=8, help="clones alive at once for the memory figure")
    ap.add_argument("--no-linux", action="store_true", help="skip the boot/restore/memory part")
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    life = bench_lifecycle(args.calls, args.repeat)
    py_med, c_med = statistics.median(life["py"]), statistics.median(life["c"])
    rows = [
        "| measurement | kvmpy | C (same ioctls) | kvmpy/C |",
        "| --- | --- | --- | --- |",
        f"| guest function create -> run -> result -> destroy, median | {py_med * 1e3:.2f} ms | "
        f"{c_med * 1e3:.2f} ms | {py_med / c_med:.2f}x |",
        f"| same, p99 | {_pct(life['py'], 99) * 1e3:.2f} ms | {_pct(life['c'], 99) * 1e3:.2f} ms | "
        f"{_pct(life['py'], 99) / _pct(life['c'], 99):.2f}x |",
    ]
    parts = bench_breakdown()
    warm_section = _warm_section(life, parts, args, load)
    linux = None if args.no_linux else bench_restore(args.restores, args.idle)
    if linux:
        r_med = statistics.median(linux["restore"])
        rows2 = [
            "| measurement | value |",
            "| --- | --- |",
            f"| boot to the shell prompt | {linux['boot']:.1f} s |",
            f"| restore of that booted kernel (from an opened snapshot), median | {r_med * 1e3:.1f} ms |",
            f"| restore, p99 of {len(linux['restore'])} | {_pct(linux['restore'], 99) * 1e3:.1f} ms |",
            f"| boot time / restore time | {linux['boot'] / r_med:.0f}x |",
            f"| snapshot (pause, write 128 MiB + state, resume) | {linux['snapshot'] * 1e3:.0f} ms |",
            f"| Snapshot.open with SHA-256 of every file (once per snapshot) | {linux['open'] * 1e3:.0f} ms |",
            f"| a restored clone answers `echo` | {linux['answer']!r} |",
            f"| booted VM (128 MiB guest): RSS / PSS added to the process | "
            f"{linux['booted_rss'] / 2**20:.1f} / {linux['booted_pss'] / 2**20:.1f} MiB |",
            f"| idle restored clone ({linux['idle']} at once): RSS / PSS per clone | "
            f"{linux['clone_rss'] / 2**20:.1f} / {linux['clone_pss'] / 2**20:.1f} MiB |",
        ]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    backend = "PVM software KVM (kvm_pvm)" if os.path.isdir("/sys/module/kvm_pvm") else "hardware KVM"
    text = [HEADING, "",
            f"Measured {datetime.date.today()} on {cpu}, {os.cpu_count()} CPUs, {backend}, Python "
            f"{platform.python_version()}, load average {load:.2f} at start.",
            f"`scripts/bench_microvm.py --calls {args.calls} --repeat {args.repeat} --restores {args.restores} "
            f"--idle {args.idle}`.", "",
            "Guest-function life cycle: kvmpy's `GuestFunction` against a C program doing the same ioctls on "
            "the same bytes and handling the same exits (KVM_CREATE_VM, a 16 MiB MAP_NORESERVE slot, "
            "KVM_CREATE_VCPU, SET_CPUID2, GET/SET_SREGS, GET/SET_REGS, KVM_RUN to the result, close), "
            f"alternating batches of {args.calls}, {args.repeat} pairs; per call:", "", *rows, ""]
    if linux:
        text += ["Linux (`kvmpy.guest` kernel + busybox initramfs, 1 vCPU, 128 MiB, "
                 "`clocksource=refined-jiffies`), booted once; restores one after another, each clone closed "
                 "before the next; memory from psutil `memory_full_info()` deltas of this process:", "",
                 *rows2, "",
                 "On this backend the guest function's payload runs natively at CPL3, entered there "
                 "directly, and returns through the MMIO doorbell (one exit, no CPL0 code); most of the "
                 "rest is VM creation. Restore is a handful of ioctls plus mapping the "
                 "memory file MAP_PRIVATE: no byte of guest RAM is copied, and idle clones share the "
                 "snapshot's page-cache pages (PSS well below RSS)."]
    section = "\n".join(text) + "\n"
    print(section)
    print(warm_section)
    if args.update_docs:
        update_section(WARM_HEADING, warm_section)
        if linux:  # the Linux rows need the boot: a --no-linux run leaves that section as it was
            update_section(HEADING, section)


if __name__ == "__main__":
    main()

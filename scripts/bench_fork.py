#!/usr/bin/env python3
"""Fork, incremental snapshots and lazy restore of a booted Linux guest, each against its reference, same run.

One boot of the kvmpy guest (128 MiB, 1 vCPU) to its shell, then:

1. fork: the first fork (which copies the parent's present pages into the
   template memfd), then `MicroVM.fork(1)` per child (median of `--forks`, each child closed
   before the next) and `fork(10)` per child, against `MicroVM.restore` of a
   full snapshot file (median of `--forks`); one forked child answers a command.
2. memory: `--idle` children forked at once, idling for 5 s: the process's
   PSS (/proc/self/smaps_rollup) before and with them, per child.
3. snapshots: a full snapshot (tracking on) against an incremental one taken a
   second later (`parent=` the full one), median of `--snapshots` each.
4. lazy restore (if userfaultfd works here): first instruction after the
   restore of a `--lazy-mib` MiB tiny guest served by userfaultfd, against the
   MAP_PRIVATE restore of the same snapshot.

    .venv/bin/python scripts/bench_fork.py [--forks 10] [--idle 50] [--snapshots 5] [--update-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perfdoc import update_section  # noqa: E402

HEADING = "## Fork, incremental snapshots, lazy restore (scripts/bench_fork.py)"


def pss() -> int:
    """This process's proportional set size in bytes (/proc/self/smaps_rollup)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss line in /proc/self/smaps_rollup")


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def bench_linux(args: argparse.Namespace) -> dict:
    from kvmpy.boot.initramfs import build_busybox_initramfs
    from kvmpy.guest.build import build_kernel
    from kvmpy.machine import DEFAULT_CMDLINE
    from kvmpy.microvm import MicroVM, MicroVMConfig
    from kvmpy.snapshot import Snapshot

    kernel, initrd = build_kernel(progress=False).vmlinux, build_busybox_initramfs()
    work = Path(tempfile.mkdtemp(prefix="kvmpy-bench-fork-"))
    out: dict = {}
    try:
        t0 = time.monotonic()
        vm = MicroVM(MicroVMConfig(kernel=kernel, initrd=initrd, memory="128M",
                                   cmdline=DEFAULT_CMDLINE + " clocksource=refined-jiffies"))
        vm.start()
        vm.expect("# ", 900)
        out["boot"] = time.monotonic() - t0
        time.sleep(2)
        vm.pause()
        from kvmpy import cow
        out["present_mib"] = sum(int(((cow.pagemap(r) >> 63) & 1).sum()) for r in vm.machine.memory) * 4096 / 2**20
        t = time.perf_counter()
        (child,) = vm.fork(1, start=False)  # the first: the parent's present pages copied into the template
        out["first_fork"] = time.perf_counter() - t
        child.close()
        # references: a full snapshot written and restored from its file
        vm.snapshot(work / "full")
        snap = Snapshot.open(work / "full")
        restores = []
        for _ in range(args.forks):
            t = time.perf_counter()
            clone = MicroVM.restore(snap, start=False)
            restores.append(time.perf_counter() - t)
            clone.close()
        out["restore"] = restores
        forks = []
        for _ in range(args.forks):
            t = time.perf_counter()
            (child,) = vm.fork(1, start=False)
            forks.append(time.perf_counter() - t)
            child.close()
        out["fork1"] = forks
        t = time.perf_counter()
        ten = vm.fork(10, start=False)
        out["fork10"] = (time.perf_counter() - t) / 10
        for c in ten:
            c.close()
        (child,) = vm.fork(1)
        out["answer"] = child.run("echo forked-$((40+2))", timeout=300).strip()
        child.close()
        before = pss()
        idle = vm.fork(args.idle)
        time.sleep(5)
        out["child_pss"] = (pss() - before) / args.idle
        out["idle_answer"] = idle[-1].run("echo last-$((1+1))", timeout=300).strip()
        for c in idle:
            c.close()
        # snapshots: full (tracking from it on) against incremental
        vm.resume()
        full, inc = [], []
        for i in range(args.snapshots):
            time.sleep(1)
            t = time.perf_counter()
            vm.snapshot(work / f"f{i}")
            full.append(time.perf_counter() - t)
            time.sleep(1)
            t = time.perf_counter()
            vm.snapshot(work / f"i{i}", parent=work / f"f{i}")
            inc.append(time.perf_counter() - t)
            shutil.rmtree(work / f"f{i}", ignore_errors=True)
        out["snap_full"], out["snap_inc"] = full, inc
        out["inc_bytes"] = (work / f"i{args.snapshots - 1}" / "memory.bin").stat().st_size
        vm.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def bench_lazy(mib: int, repeat: int) -> dict | None:
    from kvmpy import lazy

    problem = lazy.unavailable()
    if problem:
        return {"unavailable": problem}
    return lazy.benchmark(mib, repeat)


def section(linux: dict, lazy_result: dict | None, args: argparse.Namespace) -> str:
    r, f1 = _median_ms(linux["restore"]), _median_ms(linux["fork1"])
    f10 = linux["fork10"] * 1e3
    sf, si = _median_ms(linux["snap_full"]), _median_ms(linux["snap_inc"])
    rows = [
        HEADING, "",
        f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} CPUs, PVM backend), "
        f"`scripts/bench_fork.py --forks {args.forks} --idle {args.idle} --snapshots {args.snapshots}`. "
        f"Linux guest (`kvmpy.guest` kernel, busybox, 128 MiB, 1 vCPU) booted once in {linux['boot']:.0f} s.", "",
        "| measure | value | reference (same run) | ratio |", "| --- | --- | --- | --- |",
        f"| fork(1), median per child | {f1:.1f} ms | restore from a snapshot file {r:.1f} ms | {f1 / r:.2f}x |",
        f"| fork(10), per child | {f10:.1f} ms | restore {r:.1f} ms | {f10 / r:.2f}x |",
        f"| first fork of the booted parent (template: its {linux['present_mib']:.0f} MiB of present pages copied) "
        f"| {linux['first_fork'] * 1e3:.0f} ms | restore {r:.1f} ms | {linux['first_fork'] * 1e3 / r:.1f}x |",
        f"| {args.idle} idle forked children: PSS per child | {linux['child_pss'] / 2**20:.2f} MiB | | |",
        f"| incremental snapshot, median | {si:.1f} ms ({linux['inc_bytes'] / 2**20:.2f} MiB of pages) "
        f"| full snapshot {sf:.0f} ms | {si / sf:.3f}x |",
    ]
    if lazy_result and "unavailable" not in lazy_result:
        lz, mp = _median_ms(lazy_result["lazy"]), _median_ms(lazy_result["private"])
        rows.append(f"| lazy restore of a {lazy_result['mib']} MiB guest to its first instruction "
                    "(a counter moves), median "
                    f"| {lz:.2f} ms ({lazy_result['served']} pages served) | MAP_PRIVATE restore {mp:.2f} ms "
                    f"| {lz / mp:.2f}x |")
    elif lazy_result:
        rows.append(f"| lazy restore | not measured: {lazy_result['unavailable']} | | |")
    rows += ["", f"Forked children answer commands: {linux['answer']!r}, {linux['idle_answer']!r}.", ""]
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forks", type=int, default=10)
    ap.add_argument("--idle", type=int, default=50)
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--lazy-mib", type=int, default=1024)
    ap.add_argument("--skip-linux", action="store_true", help="only the lazy-restore part")
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    lazy_result = bench_lazy(args.lazy_mib, args.forks)
    print("lazy:", {k: (v if not isinstance(v, list) else f"median {_median_ms(v):.2f} ms")
                    for k, v in (lazy_result or {}).items()}, flush=True)
    if args.skip_linux:
        return
    linux = bench_linux(args)
    text = section(linux, lazy_result, args)
    print(text)
    if args.update_docs:
        update_section(HEADING, text)


if __name__ == "__main__":
    main()

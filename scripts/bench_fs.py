#!/usr/bin/env python3
"""Reading a tree of small files in the guest: virtio-fs (virtiofsd) against virtio-blk (ext4), same boot.

One tree of `--files` files of `--size` bytes in ten directories is made on
the host; `mke2fs -d` copies it into a raw ext4 image attached as a
read-only virtio-blk disk, and the same directory is shared twice over
virtio-fs (`MicroVMConfig.shares`, two real virtiofsd): with cache=auto
(the default) and with cache=always. One boot of kvmpy's guest kernel then
rotates, `--repeat` times, through the three:

    mount (ext4 from /dev/vda, or virtiofs by tag)
    cold:  cat /mnt/X/d*/* | wc -c      first read after the mount
    warm:  cat /mnt/X/d*/* | wc -c      again, from the guest's page cache
    umount

Unmounting drops the guest's caches of that file system (and the last
close of /dev/vda its block-device cache), so every cold read starts from
nothing in the guest; the host's page cache holds the files and the image
throughout, so neither side waits for a disk. The time of each step is
taken on the host around the shell command (typed on the serial console);
the same round trip with `true` is measured as the console's share and
subtracted. The ratios are virtio-fs time over virtio-blk time (medians).
Beside the times: virtio-blk requests per file, and for virtio-fs the
interrupts per file (virtiofsd's call eventfd, one per batch of completed
FUSE requests: kvmpy does not see the requests themselves).

    .venv/bin/python scripts/bench_fs.py [--files 200] [--size 2048] [--repeat 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmpy.boot.initramfs import INIT_MARKER, build_busybox_initramfs  # noqa: E402
from kvmpy.disk import make_ext4_image  # noqa: E402
from kvmpy.guest.build import build_kernel  # noqa: E402
from kvmpy.microvm import DiskConfig, MicroVM, MicroVMConfig  # noqa: E402
from kvmpy.virtiofsd import CacheMode, ShareConfig, find_virtiofsd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perfdoc import update_section  # noqa: E402

HEADING = "## virtio-fs vs virtio-blk, small files (scripts/bench_fs.py)"
BOOT_TIMEOUT = 900
DIRS = 10


def make_tree(root: Path, files: int, size: int) -> int:
    """`files` files of `size` random bytes in d00..d09; returns the total bytes."""
    for i in range(files):
        d = root / f"d{i % DIRS:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04d}").write_bytes(os.urandom(size))
    return files * size


def timed(vm: MicroVM, command: str, timeout: float) -> tuple[float, str]:
    start = time.monotonic()
    out = vm.run(command, timeout=timeout)
    return time.monotonic() - start, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args()

    daemon = find_virtiofsd()
    kernel = build_kernel(progress=False)
    initrd = build_busybox_initramfs()
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-fs-") as work:
        tree = Path(work) / "tree"
        total = make_tree(tree, args.files, args.size)
        image = make_ext4_image(Path(work) / "tree.ext4", tree, size="64M", label="tree")
        config = MicroVMConfig(kernel=kernel.vmlinux, initrd=initrd, memory="256M",
                               disks=[DiskConfig(image, read_only=True)],
                               shares=[ShareConfig(tree, "auto"), ShareConfig(tree, "always", cache=CacheMode.ALWAYS)])
        kinds = ("fs", "fsalways", "blk")
        times: dict[str, list[float]] = {f"{k} {p}": [] for k in kinds for p in ("cold", "warm")}
        times["console"] = []
        events: dict[str, list[int]] = {k: [] for k in times if k != "console"}
        mounts = {"fs": "mount -t virtiofs auto /mnt/fs", "fsalways": "mount -t virtiofs always /mnt/fsalways",
                  "blk": "mount -t ext4 -o ro /dev/vda /mnt/blk"}
        read = "cat /mnt/{0}/d*/* | wc -c"
        with MicroVM(config) as vm:
            vm.start()
            vm.expect(INIT_MARKER, BOOT_TIMEOUT)
            vm.expect("# ", 120)
            vm.run("mkdir -p /mnt/fs /mnt/fsalways /mnt/blk", timeout=120)
            slots = vm.machine.virtio.slots  # blk, then the two shares, in config order
            counters = {"blk": lambda: slots[0].device.requests,  # requests the device served
                        "fs": lambda: slots[1].transport.interrupts,  # virtiofsd's calls that became interrupts
                        "fsalways": lambda: slots[2].transport.interrupts}
            for r in range(args.repeat):
                order = kinds[r % 3:] + kinds[:r % 3]  # each kind first once in three repeats
                for kind in order:
                    vm.run(mounts[kind], timeout=600)
                    for phase in ("cold", "warm"):
                        before = counters[kind]()
                        t, out = timed(vm, read.format(kind), 1800)
                        events[f"{kind} {phase}"].append(counters[kind]() - before)
                        if str(total) not in out.split():
                            raise SystemExit(f"{kind} {phase}: read {out.strip()!r} bytes, expected {total}")
                        times[f"{kind} {phase}"].append(t)
                    vm.run(f"umount /mnt/{kind}", timeout=600)
                    times["console"].append(timed(vm, "true", 120)[0])
                print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
            errors = [s.transport.last_error for s in vm.machine.virtio.slots if s.transport.last_error]
            vm.sendline("poweroff -f")
            vm.wait(120)
        if errors:
            raise SystemExit(f"device errors: {errors}")

    med = {k: statistics.median(v) for k, v in times.items()}
    net = {k: max(med[k] - med["console"], 1e-3) for k in med if k != "console"}
    rows = []
    for phase in ("cold", "warm"):
        fs, always, blk = net[f"fs {phase}"], net[f"fsalways {phase}"], net[f"blk {phase}"]
        rows.append(f"| {phase} read | {fs:.2f} s | {always:.2f} s | {blk:.2f} s | **{fs / blk:.2f}** | "
                    f"**{always / blk:.2f}** |")
    ev = {k: statistics.median(v) for k, v in events.items()}
    rows.append(f"| per file, cold / warm | {ev['fs cold'] / args.files:.1f} / {ev['fs warm'] / args.files:.1f} "
                f"interrupts | {ev['fsalways cold'] / args.files:.1f} / {ev['fsalways warm'] / args.files:.1f} "
                f"interrupts | {ev['blk cold'] / args.files:.2f} / {ev['blk warm'] / args.files:.2f} requests | | |")
    backend = "PVM (software KVM)" if os.path.exists("/sys/module/kvm_pvm") else "hardware KVM"
    section = "\n".join([
        HEADING, "",
        f"{datetime.date.today()}, {platform.node()}, {backend}, {os.cpu_count()} CPUs; "
        f"{daemon.version} ({daemon.path}); {args.files} files of {args.size} bytes in {DIRS} "
        f"directories, read with `cat /mnt/X/d*/* | wc -c`; median of {args.repeat} rotated repeats in one "
        f"boot; console round trip ({med['console']:.2f} s, a `true`) subtracted. Ratio: virtio-fs time / "
        "virtio-blk time.", "",
        "| step | virtio-fs cache=auto | virtio-fs cache=always | virtio-blk (ext4) | ratio auto/blk | "
        "ratio always/blk |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows, "",
        "`scripts/bench_fs.py --files {0} --size {1} --repeat {2}`. Each file costs virtio-fs several FUSE "
        "requests (LOOKUP, OPEN, READ, FLUSH, RELEASE), each a round trip through the request queue to "
        "virtiofsd and an interrupt back, where ext4 on virtio-blk reads directory and inode blocks for many "
        "files per request; the guest kernel code of every round trip runs emulated on this backend. With "
        "cache=auto virtiofsd opens files without FOPEN_KEEP_CACHE, so the guest drops a file's cached pages "
        "at each open and a warm read costs what a cold one does; cache=always keeps them.".format(
            args.files, args.size, args.repeat), ""])
    print(section)
    if args.write_docs:
        update_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Boot once, snapshot the running guest, restore two clones that both carry on.

Before the snapshot the guest's shell starts a counter that writes 1, 2, 3...
to /tmp/c every second. Each clone, restored in milliseconds from the same
memory file (mapped copy-on-write), shows the counter continuing from the
snapshot and answers its own commands.

    .venv/bin/python examples/snapshot_restore.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from kvmpy import MicroVM, MicroVMConfig
from kvmpy.boot.initramfs import build_busybox_initramfs
from kvmpy.guest.build import build_kernel
from kvmpy.machine import DEFAULT_CMDLINE
from kvmpy.snapshot import Snapshot

# A tick-based clocksource: on the PVM backend a restored guest's TSC jumps (see docs/scripting.md).
CMDLINE = DEFAULT_CMDLINE + " clocksource=refined-jiffies"


def main() -> None:
    config = MicroVMConfig(kernel=build_kernel(progress=False).vmlinux, initrd=build_busybox_initramfs(),
                           memory="128M", cmdline=CMDLINE)
    with tempfile.TemporaryDirectory(prefix="kvmpy-snap-") as tmp:
        snapdir = Path(tmp) / "shell"
        t0 = time.monotonic()
        with MicroVM(config) as vm:
            vm.start()
            vm.expect("# ", timeout=900)
            boot = time.monotonic() - t0
            vm.sendline("i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 1; done &")
            vm.expect("# ", timeout=300)
            time.sleep(3)
            print(f"booted in {boot:.1f} s; counter at snapshot:", vm.run("cat /tmp/c", timeout=300).strip())
            vm.snapshot(snapdir)
        snap = Snapshot.open(snapdir)  # verified once, cloned twice
        clones = [MicroVM.restore(snap) for _ in range(2)]
        try:
            for n, clone in enumerate(clones):
                print(f"clone {n} restored in {clone.restore_seconds * 1e3:.1f} ms")
            time.sleep(3)
            for n, clone in enumerate(clones):
                out = clone.run(f"echo clone {n}: counter $(cat /tmp/c)", timeout=300).strip()
                print(out)
        finally:
            for clone in clones:
                clone.close()


if __name__ == "__main__":
    main()

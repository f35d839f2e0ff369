"""Boot the Linux micro-VM, wait for its shell, run a command, print its output, stop.

Uses kvmpy's own guest kernel and busybox initramfs (built once and cached by
`kvmpy build-guest`). On the software KVM backend of this project's hosts the
boot takes one to a few minutes.

    .venv/bin/python examples/microvm_shell.py
"""

from __future__ import annotations

import time

from kvmpy import MicroVM, MicroVMConfig
from kvmpy.boot.initramfs import build_busybox_initramfs
from kvmpy.guest.build import build_kernel


def main() -> None:
    config = MicroVMConfig(kernel=build_kernel(progress=False).vmlinux, initrd=build_busybox_initramfs(),
                           memory="128M", vcpus=1)
    t0 = time.monotonic()
    with MicroVM(config) as vm:
        vm.start()
        vm.expect("# ", timeout=900)
        print(f"shell prompt after {time.monotonic() - t0:.1f} s")
        print("uname -sr:", vm.run("uname -sr", timeout=300).strip())
        print("outcome:", vm.stop().status.value)


if __name__ == "__main__":
    main()

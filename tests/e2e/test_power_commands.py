"""End to end: `poweroff` and `reboot` typed without -f in the default guest shell end the VM.

busybox's poweroff/reboot without -f only signal PID 1 (SIGUSR2 / SIGTERM);
the default /init hands PID 1 to busybox init, which shuts down and asks the
kernel to power off or reboot. One boot per command (a boot is a minute or
more on the software KVM backend), on kvmpy's `Machine` with the default
busybox initramfs.
"""

from __future__ import annotations

import pytest

from kvmpy.boot.initramfs import INIT_MARKER
from kvmpy.machine import MachineConfig, Status, build

pytestmark = [pytest.mark.e2e, pytest.mark.kvm]

BOOT_TIMEOUT = 600  # seconds to the shell; ~60-90 s on an idle PVM host, minutes when it is shared


@pytest.mark.parametrize(("command", "status", "said"), [
    ("poweroff", Status.POWEROFF, "Requesting system poweroff"),
    ("reboot", Status.REBOOT, "Requesting system reboot"),
])
def test_power_command_without_force_ends_the_vm(guest_artifacts, command, status, said):
    vmlinux, initrd = guest_artifacts
    machine = build(MachineConfig(kernel=vmlinux, initrd=initrd, memory="128M", vcpus=1))
    try:
        machine.start()
        con = machine.console
        at = con.wait_for(INIT_MARKER.encode(), BOOT_TIMEOUT)
        assert at >= 0, con.text()[-3000:]
        assert con.wait_for(b"# ", 120, at) >= 0, con.text()[-3000:]
        machine.send_input(f"{command}\n".encode())
        outcome = machine.wait(180)
    finally:
        machine.stop()
        machine.close()
    console = machine.console.text()
    assert outcome is not None and outcome.status is status, (outcome, console[-3000:])
    # busybox init did the shutdown (not a shell exit or a crash): it says so on the console.
    assert said in console, console[-3000:]

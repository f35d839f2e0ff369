"""How a guest ends, as Machine and `kvmpy run` report it, with tiny ELF "kernels".

Each kernel is a few instructions linked at 16 MiB like a vmlinux, so the
Linux loader takes it and the boot CPU enters it in 64-bit mode. It ends
the way a Linux guest can: printing the power-off line on COM1, pulsing the
i8042 reset line, triple faulting, or printing a panic.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.errors import BootError
from kvmpy.machine import MachineConfig, Status, build

PRINT = """
    lea msg(%rip), %rsi
1:  lodsb
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    out %al, %dx
    jmp 1b
2:
"""
KERNELS = {
    "poweroff": PRINT + "cli\nhlt\njmp 2b\nmsg: .asciz \"reboot: Power down\\n\"",
    "panic": PRINT + "mov $0x64, %dx\nmov $0xfe, %al\nout %al, %dx\n"
                     "msg: .asciz \"Kernel panic - not syncing: test\\n\"",
    "i8042": "mov $0xfe, %al\nout %al, $0x64\nhlt",
    "triple_fault": "lidt idt(%rip)\nud2\nidt: .word 0\n.quad 0",
    "spin": "jmp .",
}


def _elf(tmp_path: Path, name: str) -> Path:
    src, obj, elf = tmp_path / f"{name}.s", tmp_path / f"{name}.o", tmp_path / name
    src.write_text(".code64\n.text\n.globl _start\n_start:\n" + KERNELS[name] + "\n")
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", "0x1000000", "-e", "_start", "-o", str(elf), str(obj)],
                   check=True)
    return elf


def _outcome(tmp_path: Path, name: str, kvm, **config):
    with build(MachineConfig(kernel=_elf(tmp_path, name), memory="64M", **config), kvm=kvm) as m:
        m.start()
        outcome = m.wait(60)
        console = m.console.text()
    return outcome, console


def test_power_off_line_on_the_console_is_a_poweroff(tmp_path, kvm):
    outcome, console = _outcome(tmp_path, "poweroff", kvm)
    assert outcome.status is Status.POWEROFF and outcome.exit_code == 0
    assert "reboot: Power down" in console


def test_i8042_reset_is_a_reboot(tmp_path, kvm):
    outcome, _ = _outcome(tmp_path, "i8042", kvm)
    assert outcome.status is Status.REBOOT and outcome.detail == "i8042 reset" and outcome.exit_code == 3


def test_triple_fault_is_a_reboot(tmp_path, kvm):
    outcome, _ = _outcome(tmp_path, "triple_fault", kvm)
    assert outcome.status is Status.REBOOT and outcome.detail == "triple fault"


def test_panic_followed_by_reset_is_a_panic(tmp_path, kvm):
    outcome, _ = _outcome(tmp_path, "panic", kvm)
    assert outcome.status is Status.PANIC and outcome.exit_code == 4


def test_stop_ends_a_spinning_guest(tmp_path, kvm):
    with build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", vcpus=2), kvm=kvm) as m:
        m.start()
        assert m.wait(0.5) is None
        outcome = m.stop()
    assert outcome.status is Status.STOPPED and outcome.exit_code == 130


def test_kvmpy_run_exit_status_tells_how_the_guest_stopped(tmp_path):
    for name, code in (("poweroff", 0), ("i8042", 3), ("panic", 4)):
        p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "run", "--kernel", str(_elf(tmp_path, name)),
                            "--mem", "64M", "--timeout", "60"], stdin=subprocess.DEVNULL, capture_output=True)
        assert p.returncode == code, (name, p.stderr.decode())


def test_kvmpy_run_timeout_stops_the_guest_with_status_130(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "run", "--kernel", str(_elf(tmp_path, "spin")),
                        "--mem", "64M", "--timeout", "1"], stdin=subprocess.DEVNULL, capture_output=True)
    assert p.returncode == 130
    assert b"timeout after 1 s" in p.stderr


@pytest.mark.parametrize("problem, make", [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:200])),
    ("wrong magic", lambda p: p.write_bytes(b"MZ" + p.read_bytes()[2:])),
])
def test_a_bad_kernel_is_refused_before_any_vm_exists(tmp_path, kvm, problem, make):
    elf = _elf(tmp_path, "spin")
    make(elf)
    vms_before = len(list(Path("/proc/self/fd").iterdir()))
    with pytest.raises(BootError):
        build(MachineConfig(kernel=elf, memory="64M"), kvm=kvm)
    assert len(list(Path("/proc/self/fd").iterdir())) == vms_before  # no VM fd was opened or leaked


def test_impossible_memory_size_is_refused(tmp_path, kvm):
    with pytest.raises(BootError, match="more than this host has"):
        build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64T"), kvm=kvm)


def test_kvmpy_run_reports_a_missing_kernel_clearly(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "run", "--kernel", str(tmp_path / "nope")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert p.returncode == 1 and "no such file" in p.stderr


def test_kvmpy_run_attaches_virtio_devices_and_names_them_on_the_command_line(tmp_path, kvm):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "run", "--kernel", str(_elf(tmp_path, "poweroff")),
                        "--mem", "64M", "--disk", f"{image},ro", "--rng", "--timeout", "60"],
                       stdin=subprocess.DEVNULL, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    config = MachineConfig(kernel=_elf(tmp_path, "poweroff"), memory="64M", disks=[f"{image},ro"], rng=True)
    with build(config, kvm=kvm) as m:
        cmdline = m.memory.read(m.boot.cmdline_addr, 2048).split(b"\0")[0].decode()
    assert cmdline.count("virtio_mmio.device=4K@0x") == 2


@pytest.mark.parametrize("args, message", [
    (["--disk", "/nonexistent/disk.img"], "/nonexistent/disk.img"),
    (["--disk", "x.img,rw,oops"], "--disk"),
    (["--net", "vde=foo"], "--net"),
])
def test_kvmpy_run_refuses_bad_device_arguments_clearly(tmp_path, args, message):
    p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "run", "--kernel", str(_elf(tmp_path, "spin")),
                        "--mem", "64M", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert p.returncode == 1 and message in p.stderr, p.stderr


def _multiboot(tmp_path: Path, body: str) -> Path:
    src, obj, elf = tmp_path / "mb.s", tmp_path / "mb.o", tmp_path / "mb.elf"
    src.write_text(f""".code32
.text
.globl _start
.align 4
    .long 0x1BADB002, 0, -0x1BADB002       # multiboot header: magic, flags, checksum
_start:
{body}
""")
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-N", "-Ttext", "0x100000", "-e", "_start", "-o", str(elf), str(obj)],
                   check=True)
    return elf


def test_a_multiboot_kernel_ends_through_isa_debug_exit_with_qemus_status(tmp_path):
    kernel = _multiboot(tmp_path, "cmp $0x2BADB002, %eax\njne 1f\nmov $5, %eax\nout %eax, $0xf4\n1: hlt")
    p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "run", "--kernel", str(kernel), "--mem", "64M",
                        "--debug-exit", "--timeout", "60"], stdin=subprocess.DEVNULL, capture_output=True)
    assert p.returncode == (5 << 1) | 1, p.stderr.decode()


def test_isa_debug_exit_is_off_unless_asked_for(tmp_path):
    kernel = _multiboot(tmp_path, "mov $5, %eax\nout %eax, $0xf4\njmp .")
    p = subprocess.run([sys.executable, "-m", "kvmpy.cli", "run", "--kernel", str(kernel), "--mem", "64M",
                        "--timeout", "2"], stdin=subprocess.DEVNULL, capture_output=True)
    assert p.returncode == 130  # the write went to an unclaimed port; the guest spun until the timeout


def test_fw_cfg_answers_the_qemu_signature_when_switched_on(tmp_path, kvm):
    kernel = _multiboot(tmp_path, """
    xor %eax, %eax
    mov $0x510, %dx
    out %ax, %dx               # select key 0: the signature
    mov $0x511, %dx
    in %dx, %al
    mov $0x3f8, %dx
    out %al, %dx               # echo its first byte on COM1
    mov $0, %eax
    out %eax, $0xf4
    """)
    config = MachineConfig(kernel=kernel, memory="64M", test_devices=("fw-cfg", "debug-exit"))
    with build(config, kvm=kvm) as m:
        m.start()
        outcome = m.wait(60)
        assert outcome.status is Status.DEBUG_EXIT and outcome.exit_code == 1
        assert m.console.text() == "Q"


def test_unknown_test_device_is_refused(tmp_path, kvm):
    with pytest.raises(BootError, match="test_devices: unknown vga"):
        build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", test_devices=("vga",)), kvm=kvm)


# -- what a snapshot refuses, on real machines ------------------------------------------

def test_snapshot_refuses_a_device_without_the_protocol_naming_it(tmp_path, kvm):
    from kvmpy.errors import SnapshotError
    from kvmpy.snapshot import take_snapshot

    class Gadget:
        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            pass

    with build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M"), kvm=kvm) as m:
        m.mmio.register(0xD000_0000, 0x1000, Gadget(), "virtio-gadget")
        with pytest.raises(SnapshotError, match=r"mmio:0xd0000000:virtio-gadget have no snapshot_state"):
            take_snapshot(m, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_snapshot_refuses_a_running_machine(tmp_path, kvm):
    from kvmpy.errors import SnapshotError
    from kvmpy.snapshot import take_snapshot

    with build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M"), kvm=kvm) as m:
        m.start()
        with pytest.raises(SnapshotError, match="pause"):
            take_snapshot(m, tmp_path / "s")


@pytest.mark.parametrize("change, what", [({"pit": False}, "without a PIT"),
                                          ({"cpuid": lambda kvm, i, n: kvm.get_supported_cpuid()},
                                           "custom CPUID table")])
def test_snapshot_refuses_what_a_restore_could_not_rebuild(tmp_path, kvm, change, what):
    from kvmpy.errors import SnapshotError
    from kvmpy.snapshot import take_snapshot

    with build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", **change), kvm=kvm) as m:
        with pytest.raises(SnapshotError, match=what):
            take_snapshot(m, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_pause_parks_the_vcpu_threads_and_resume_continues_them(tmp_path, kvm):
    import threading

    with build(MachineConfig(kernel=_elf(tmp_path, "spin"), memory="64M", vcpus=2), kvm=kvm) as m:
        m.start()
        threads = {t.ident for t in threading.enumerate() if t.name.startswith("vcpu")}
        for _ in range(3):
            m.pause()
            assert m.state == "paused" and all(t.state in ("parked", "created") for t in m.threads)
            m.resume()
            assert m.state == "running"
        # the same threads all along: pausing parks them, it does not end and recreate them
        assert {t.ident for t in threading.enumerate() if t.name.startswith("vcpu")} == threads
        assert m.stop().status is Status.STOPPED
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu") and t.ident in threads]


def test_a_snapshot_onto_a_full_disk_is_a_clear_error_and_the_vm_runs_on(tmp_path, kvm):
    import os

    from kvmpy.errors import SnapshotError
    from kvmpy.snapshot import take_snapshot

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with build(MachineConfig(kernel=_elf(tmp_path, "poweroff"), memory="64M"), kvm=kvm) as m:
            with pytest.raises(SnapshotError, match=r"small/s: cannot write the snapshot \(No space left on device\)"):
                take_snapshot(m, mnt / "s")  # 64 MiB of RAM onto 8 MiB
            assert list(mnt.iterdir()) == []  # nothing half-written left there
            m.start()  # the machine is as it was: it boots and powers off
            assert m.wait(60).status is Status.POWEROFF
    finally:
        subprocess.run(["umount", str(mnt)])

"""The kvm-unit-tests runner on tiny kernels of our own (tests/kut_kernels.py).

The upstream suite is not available to CI; these kernels do what its tests
do at the edges the runner sees: multiboot ELF32 entry, COM1 output lines,
fw_cfg reads, the command line, and the isa-debug-exit status.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kut_kernels import build_kernel, build_tree
from kvmpy.errors import KvmError
from kvmpy.kut import KutMachine, _cpuid_table, run_kvm_unit_tests
from kvmpy.platform import Backend, detect_backend

PVM = detect_backend() is Backend.PVM
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "ld")), reason="needs binutils")


def _machine_output(flat: Path, **kw) -> tuple[int, str]:
    out = bytearray()
    m = KutMachine(flat, output=out.extend, **kw)
    try:
        status = m.run(20)
    finally:
        m.close()
    return status, out.decode(errors="replace")


def test_debug_exit_code_becomes_qemu_status(tmp_path):
    flat = build_kernel(tmp_path, "k", ["hello"], exit_code=1)
    status, out = _machine_output(flat)
    assert status == 3 and "hello" in out


def test_fw_cfg_gives_cpu_count_and_signature(tmp_path):
    flat = build_kernel(tmp_path, "k", [], exit_code=0, mode="fwcfg")
    status, out = _machine_output(flat, smp=3)
    assert status == 1
    assert out.splitlines()[0] == "3QEMU"


def test_command_line_is_kernel_path_then_arguments(tmp_path):
    flat = build_kernel(tmp_path, "k", [], exit_code=0, mode="args")
    status, out = _machine_output(flat, args=["cpuid", "x"])
    assert out.splitlines()[0] == f"{flat} cpuid x"


def test_pc_testdev_iomem_is_mapped(tmp_path):
    # A kernel that has no way to see it would be wrong here: check from the host side.
    flat = build_kernel(tmp_path, "k", [], exit_code=0)
    m = KutMachine(flat, output=lambda b: None)
    try:
        m.mmio.write(0xFF00_0000, 4, 0xCAFE)
        assert m.mmio.read(0xFF00_0000, 4) == 0xCAFE
        assert m.run(20) == 1
    finally:
        m.close()


def test_s3_sleep_resumes_at_the_facs_waking_vector_in_real_mode(tmp_path):
    flat = build_kernel(tmp_path, "k", ["sleeping"], exit_code=5, mode="s3")
    status, out = _machine_output(flat)
    assert out.splitlines() == ["sleeping", "woke"]
    assert status == (5 << 1) | 1


def test_qemu_cpu_params_shape_each_vcpus_cpuid(tmp_path):
    flat = build_kernel(tmp_path, "k", [], exit_code=0)
    m = KutMachine(flat, smp=2, params="-cpu qemu64,-popcnt,+x2apic", output=lambda b: None)
    try:
        for apic_id, vcpu in enumerate(m.machine.vcpus):
            table = _cpuid_table(m.machine.kvm, m.opts, apic_id, 2)  # what the machine gave KVM
            leaf1 = next(e for e in table if e.function == 1)
            assert leaf1.ebx >> 24 == apic_id and not leaf1.ecx & (1 << 23) and leaf1.ecx & (1 << 21)
            # KVM's copy: PVM reports the host's feature bits from KVM_GET_CPUID2 whatever was
            # set (docs/pvm.md), but keeps the topology; hardware hosts keep everything.
            got = next(e for e in vcpu.get_cpuid2() if e.function == 1)
            assert got.ebx >> 24 == apic_id
            if not PVM:
                assert (got.ecx, got.edx) == (leaf1.ecx, leaf1.edx)
    finally:
        m.close()


def test_machine_pit_off_has_no_in_kernel_pit(tmp_path):
    flat = build_kernel(tmp_path, "k", [], exit_code=0)
    for params, has_pit in (("", True), ("-machine pit=off", False)):
        m = KutMachine(flat, params=params, output=lambda b: None)
        try:
            if has_pit:
                m.machine.vm.get_pit2()
            else:
                with pytest.raises(KvmError):
                    m.machine.vm.get_pit2()
        finally:
            m.close()


def test_runner_verdicts_from_a_built_tree(tmp_path):
    root = build_tree(tmp_path / "kut")
    rows = {t.name: (k, q) for t, k, q in run_kvm_unit_tests(root, jobs=2)}
    verdicts = {name: k.verdict for name, (k, _) in rows.items()}
    assert verdicts == {"passing": "PASS", "failing": "FAIL", "skipping": "SKIP", "hanging": "TIMEOUT",
                        "only_i386": "SKIP", "manual": "SKIP", "missing": "SKIP"}
    assert rows["failing"][0].detail == "FAIL: b: went wrong"
    assert rows["hanging"][0].seconds < 15  # its cfg timeout is 3 s: killed, never a hang
    assert rows["only_i386"][0].detail == "arch i386 only"
    assert "not built" in rows["missing"][0].detail


def test_only_selects_tests_and_runs_nodefault_ones(tmp_path):
    root = build_tree(tmp_path / "kut")
    rows = run_kvm_unit_tests(root, only=["manual"])
    assert [(t.name, k.verdict) for t, k, _ in rows] == [("manual", "PASS")]

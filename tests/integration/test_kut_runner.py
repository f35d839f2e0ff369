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
from kvmpy.kut import KutMachine, run_kvm_unit_tests

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

"""kvmpy.kut without /dev/kvm: the unittests.cfg parser, QEMU parameters, verdicts, skips."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy.kut import (KutTest, format_table, parse_qemu_params, parse_unittests_cfg, pre_skip,
                       verdict_of, Result)

CFG = '''
##############################################################################
# comment
[x2apic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,+x2apic,+tsc-deadline
arch = x86_64
timeout = 30
groups = apic

[vmexit_cpuid]
file = vmexit.flat
test_args = 'cpuid'
groups = vmexit

[svm]
file = svm.flat
smp = 2
test_args = "-pause_filter_test -svm_unsupported_instruction_intercept_test"
qemu_params = -cpu max,+svm -m 4g
arch = x86_64
groups = svm

[pmu]
file = pmu.flat
extra_params = """-cpu max
  -machine pit=off"""
check = /sys/module/kvm/parameters/enable_pmu=Y /proc/sys/kernel/nmi_watchdog=0
accel = kvm
timeout = 2m
'''


def test_sections_and_fields_are_parsed():
    tests = {t.name: t for t in parse_unittests_cfg(CFG)}
    assert list(tests) == ["x2apic", "vmexit_cpuid", "svm", "pmu"]
    x = tests["x2apic"]
    assert (x.file, x.smp, x.arch, x.timeout, x.groups) == ("apic.flat", 2, "x86_64", 30.0, ["apic"])
    assert x.params == "-cpu qemu64,+x2apic,+tsc-deadline"


def test_test_args_are_shell_words():
    tests = {t.name: t for t in parse_unittests_cfg(CFG)}
    assert tests["vmexit_cpuid"].args == ["cpuid"]
    assert tests["svm"].append == "-pause_filter_test -svm_unsupported_instruction_intercept_test"


def test_triple_quoted_params_check_accel_and_minute_timeout():
    pmu = parse_unittests_cfg(CFG)[-1]
    assert pmu.params == "-cpu max -machine pit=off"
    assert pmu.check == ["/sys/module/kvm/parameters/enable_pmu=Y", "/proc/sys/kernel/nmi_watchdog=0"]
    assert (pmu.accel, pmu.timeout) == ("kvm", 120.0)


def test_defaults_are_one_cpu_and_no_timeout():
    (t,) = parse_unittests_cfg("[a]\nfile = a.flat\n")
    assert (t.smp, t.timeout, t.args, t.groups) == (1, None, [], [])


def test_qemu_params_memory_cpu_and_pit_are_honoured_the_rest_ignored():
    o = parse_qemu_params("-cpu max,+svm,-rdtscp,vendor=GenuineIntel -m 4g -machine pit=off "
                          "-device hyperv-testdev -overcommit cpu-pm=on")
    assert o.memory == 4 << 30 and o.cpu_model == "max" and not o.pit
    assert o.cpu_add == ["svm"] and o.cpu_remove == ["rdtscp"]
    assert "-cpu vendor=GenuineIntel" in o.ignored and "-device hyperv-testdev" in o.ignored
    assert "-overcommit cpu-pm=on" in o.ignored


def test_memory_without_unit_is_mebibytes_like_qemu():
    assert parse_qemu_params("-m 2048").memory == 2048 << 20


@pytest.mark.parametrize("status,verdict", [(1, "PASS"), (3, "FAIL"), (77, "SKIP"), (127, "FAIL"), (0, "FAIL")])
def test_verdict_from_debug_exit_status(status, verdict):
    assert verdict_of(status, "SUMMARY: 1 tests\n", False)[0] == verdict


def test_first_failing_line_is_reported():
    out = "PASS: a\nFAIL: b: broken\nFAIL: c\nSUMMARY: 3 tests, 2 unexpected failures\n"
    assert verdict_of(3, out, False) == ("FAIL", "FAIL: b: broken")


def test_timeout_wins_over_status():
    assert verdict_of(None, "started\n", True)[0] == "TIMEOUT"


def test_vmm_error_is_the_reason_of_a_failure():
    out = "hello\nkvmpy: vcpu 0: triple fault\n"
    assert verdict_of(0, out, False) == ("FAIL", "kvmpy: vcpu 0: triple fault")


def test_pre_skip_reasons(tmp_path: Path):
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "a.flat").write_bytes(b"")
    assert pre_skip(KutTest("t", "a.flat", arch="i386"), tmp_path, include_nodefault=False) == "arch i386 only"
    assert "nodefault" in pre_skip(KutTest("t", "a.flat", groups=["nodefault"]), tmp_path,
                                   include_nodefault=False)
    assert pre_skip(KutTest("t", "a.flat", groups=["nodefault"]), tmp_path, include_nodefault=True) is None
    assert "not built" in pre_skip(KutTest("t", "b.flat"), tmp_path, include_nodefault=False)
    check = tmp_path / "param"
    check.write_text("N\n")
    assert pre_skip(KutTest("t", "a.flat", check=[f"{check}=Y"]), tmp_path,
                    include_nodefault=False) == f"check {check}=N, needs Y"


def test_table_has_one_row_per_test_and_totals():
    t = KutTest("a", "a.flat")
    rows = [(t, Result("a", "PASS", 1.0, "SUMMARY: 1 tests"), Result("a", "TIMEOUT", 90.0, "x"))]
    text = format_table(rows)
    assert "a" in text and "PASS" in text and "TIMEOUT" in text
    assert "kvmpy: PASS 1" in text and "qemu: TIMEOUT 1" in text
    md = format_table(rows, markdown=True)
    assert md.startswith("| test | kvmpy |")


def test_qemu_error_with_status_one_is_not_a_pass():
    out = "qemu-system-x86_64: warning: host doesn't support X\nqemu-system-x86_64: Property 'y' not found\n"
    assert verdict_of(1, out, False) == ("FAIL", "qemu-system-x86_64: Property 'y' not found")
    assert verdict_of(1, "qemu-system-x86_64: warning: z\nSUMMARY: 1 tests\n", False)[0] == "PASS"


def test_abort_reports_the_unhandled_exception_not_a_pass_line():
    out = "PASS: no exception from smsw\nUnhandled exception 6 #UD(0) at ip 4002ee\n"
    assert verdict_of(127, out, False) == ("FAIL", "Unhandled exception 6 #UD(0) at ip 4002ee")

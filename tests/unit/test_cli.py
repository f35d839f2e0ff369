"""`kvmpy` turns every user error into one line and a non-zero status, before building anything. No /dev/kvm."""

from __future__ import annotations

import pytest

from kvmpy import cli


@pytest.fixture
def no_guest_build(monkeypatch):
    """Fail the test if `kvmpy run` would build (or even look up) its default guest kernel."""
    def refuse(*a, **k):
        raise AssertionError("the guest kernel was built before the arguments were checked")

    monkeypatch.setattr(cli, "default_guest", refuse)


@pytest.mark.parametrize("args, message", [
    (["--mem", "banana"], "kvmpy: --mem: not a memory size: 'banana'"),
    (["--mem", "16M"], "kvmpy: --mem: 16 MiB is too small"),
    (["--cpus", "0"], "kvmpy: --cpus: 0; must be an integer"),
    (["--disk", "/tmp"], "kvmpy: disks[0] '/tmp': is a directory"),
    (["--disk", "x.img,rw,oops"], "kvmpy: --disk 'x.img,rw,oops': expected IMG or IMG,ro"),
    (["--net", "vde=foo"], "kvmpy: --net 'vde=foo': only TAP networking exists"),
    (["--vsock", "two"], "kvmpy: --vsock 'two': expected CID"),
    (["--initrd", "/no/such/initrd"], "kvmpy: initrd '/no/such/initrd': no such file"),
    (["--module", ""], "kvmpy: --module '': expected FILE[,STRING]"),
])
def test_bad_run_arguments_are_one_line_before_any_build(args, message, capsys, no_guest_build):
    assert cli.main(["run", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_a_kernel_that_is_a_directory_is_one_line(capsys, tmp_path):
    assert cli.main(["run", "--kernel", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"kvmpy: kernel '{tmp_path}': is a directory, not a file\n"


def test_a_kernel_that_is_no_kernel_is_one_line(capsys, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel at all" * 100)
    assert cli.main(["run", "--kernel", str(junk), "--mem", "64M"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kvmpy: {junk}: not a kernel image") and err.count("\n") == 1, err


def test_kvm_unit_tests_on_a_missing_tree_is_one_line(capsys, tmp_path):
    assert cli.main(["kvm-unit-tests", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("kvmpy kvm-unit-tests: ") and "unittests.cfg: not found" in err and err.count("\n") == 1, err

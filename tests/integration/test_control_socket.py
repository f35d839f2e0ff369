"""The control socket: a VM process serves its statistics to other processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmpy import ExitReason
from kvmpy.errors import KvmError
from kvmpy.stats.api import MachineStats
from kvmpy.stats.control import ControlClient, ControlServer, list_sockets, query

OUTS = 50

CLIENT = """
import json, sys
from kvmpy.stats.control import list_sockets, query
(info,) = list_sockets(sys.argv[1])
snap = query(info.path)
print(json.dumps({"pid": info.pid, "name": info.name, "snap": snap}))
"""


class FixedSource:
    def __init__(self, data):
        self.data = data
        self.calls = 0

    def stats_snapshot(self):
        self.calls += 1
        return dict(self.data, calls=self.calls)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def outs_guest(guest):
    g = guest("64", f"mov ${OUTS}, %ecx\n1: out %al, $0x10\ndec %ecx\njnz 1b\nhlt")
    g.make_loop()
    return g


def test_a_second_process_reads_a_running_vms_counters(outs_guest, tmp_path):
    outs_guest.run()
    stats = MachineStats(outs_guest)
    with ControlServer(stats, name="tiny", directory=tmp_path) as server:
        assert server.path == tmp_path / f"{os.getpid()}-tiny.sock"
        out = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path)], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
    stats.close()
    assert got["pid"] == os.getpid() and got["name"] == "tiny"
    (vcpu,) = got["snap"]["vcpus"]
    assert vcpu["reasons"]["IO"]["count"] == OUTS
    assert vcpu["io"] == [{"port": 0x10, "direction": "out", "count": OUTS, "device": "recording port"}]
    assert vcpu["kvm"]["exits"] >= OUTS + 1


def test_one_connection_serves_many_requests(tmp_path):
    with ControlServer(FixedSource({"x": 1}), name="vm", directory=tmp_path) as server:
        with ControlClient(server.path) as c:
            assert [c.request()["calls"] for _ in range(3)] == [1, 2, 3]
            assert c.request("ping")["name"] == "vm"
        assert server.requests == 4


def test_unknown_command_is_an_error_reply(tmp_path):
    with ControlServer(FixedSource({}), directory=tmp_path) as server:
        with pytest.raises(KvmError, match="unknown command 'reboot'"):
            query(server.path, "reboot")


def test_a_failing_snapshot_is_reported_and_the_server_lives_on(tmp_path):
    class Broken:
        def stats_snapshot(self):
            raise RuntimeError("vcpu gone")

    with ControlServer(Broken(), directory=tmp_path) as server:
        with pytest.raises(KvmError, match="snapshot failed: RuntimeError: vcpu gone"):
            query(server.path)
        assert query(server.path, "ping")["pid"] == os.getpid()


def test_sockets_of_dead_processes_are_removed(tmp_path):
    stale = tmp_path / f"{dead_pid()}-old.sock"
    stale.touch()
    unrelated = tmp_path / "notes.txt"
    unrelated.touch()
    with ControlServer(FixedSource({}), name="new", directory=tmp_path):
        assert not stale.exists()
        stale.touch()
        assert [s.name for s in list_sockets(tmp_path)] == ["new"]
        assert not stale.exists()
    assert unrelated.exists()


def test_close_removes_the_socket_and_refuses_clients(tmp_path):
    server = ControlServer(FixedSource({}), name="gone", directory=tmp_path)
    path = server.path
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    server.close()
    assert not path.exists()
    assert list_sockets(tmp_path) == []
    with pytest.raises(KvmError, match="cannot connect"):
        query(path)


def test_names_are_made_safe_for_a_path(tmp_path):
    with ControlServer(FixedSource({}), name="my vm/../x", directory=tmp_path) as server:
        assert server.path.parent == tmp_path
        assert server.path.name == f"{os.getpid()}-my_vm_.._x.sock"


def run_stat(tmp_path, *args, columns: str | None = "150"):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run([sys.executable, "-m", "kvmpy.stats.stat_cli", "--dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def served(outs_guest, tmp_path):
    outs_guest.run()
    stats = MachineStats(outs_guest)
    server = ControlServer(stats, name="tiny", directory=tmp_path)
    yield outs_guest
    server.close()
    stats.close()


def test_stat_once_shows_the_exit_reasons(served, tmp_path):
    out = run_stat(tmp_path, "--once")
    assert out.returncode == 0, out.stderr
    assert f"tiny (pid {os.getpid()}): {OUTS + 1} exits" in out.stdout
    assert "IO" in out.stdout and "HLT" in out.stdout


def test_stat_json_is_the_snapshot(served, tmp_path):
    out = run_stat(tmp_path, "--json", str(os.getpid()))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (snap,) = doc["vms"]
    assert set(doc) == {"vms", "host"}
    assert snap["name"] == "tiny"
    assert snap["vcpus"][0]["reasons"]["IO"]["count"] == OUTS


def test_stat_csv_lists_the_ports_view(served, tmp_path):
    out = run_stat(tmp_path, "--csv", "--view", "ports", "tiny")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "pid,vm,port,direction,device,count,rate"
    assert lines[1].startswith(f"{os.getpid()},tiny,0x0010,out,recording port,{OUTS},")


def test_stat_kvm_view_lists_kernel_counters(served, tmp_path):
    out = run_stat(tmp_path, "--csv", "--view", "kvm", "--sort", "name")
    rows = {l.split(",")[2]: int(l.split(",")[3]) for l in out.stdout.splitlines()[1:]}
    assert rows["exits"] >= OUTS + 1
    assert "vm.mmu_cache_miss" in rows


def test_stat_without_a_matching_vm_fails_clearly(served, tmp_path):
    out = run_stat(tmp_path, "--once", "no-such-vm")
    assert out.returncode == 1
    assert "no running kvmpy VM matching 'no-such-vm'" in out.stderr


def test_stat_plot_samples_and_writes_a_png(served, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (the 'plot' extra)")
    png = tmp_path / "exits.png"
    out = run_stat(tmp_path, "--plot", str(png), "--duration", "0.5", "--interval", "0.1")
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The guest had halted before sampling began: an idle window, and stat says so.
    assert f"0 exits in the window, {OUTS + 1} since the VM started" in out.stderr
    assert "no exit reached kvmpy in these" in out.stderr


@pytest.mark.parametrize("columns", [None, "150"])
def test_stat_once_prints_its_header_on_one_line_without_a_terminal(served, tmp_path, columns):
    # The mmio view of this guest is an empty, narrow table: a title would wrap at its width.
    out = run_stat(tmp_path, "--once", "--view", "mmio", columns=columns)
    assert out.returncode == 0, out.stderr
    header = out.stdout.splitlines()[0]
    assert re.fullmatch(rf"tiny \(pid {os.getpid()}\): {OUTS + 1} exits in [\d.]+ s, 1 vCPU\(s\), VMM [\d.]+ s",
                        header), out.stdout


@pytest.fixture
def served_named(guest, tmp_path):
    """A VM whose first two hlts a handler consumed and named ("demo pause"); the third ends it."""
    g = guest("64", "hlt\nhlt\nout %al, $0x10\nhlt")
    calls = []

    def on_hlt(exit):
        calls.append(exit)
        if len(calls) < 3:
            exit.handled_as = "demo pause"
            return True
        return False

    g.run({ExitReason.HLT: on_hlt})
    stats = MachineStats(g)
    server = ControlServer(stats, name="named", directory=tmp_path)
    yield g
    server.close()
    stats.close()


def test_stat_names_exits_by_what_was_done_and_keeps_the_kvm_reason(served_named, tmp_path):
    table = run_stat(tmp_path, "--once")
    assert re.search(r"demo pause +│ +2 .*│ HLT", table.stdout), table.stdout
    lines = run_stat(tmp_path, "--csv", "--sort", "name").stdout.splitlines()
    assert lines[0] == "pid,vm,reason,count,rate,share,vmm_ms,vmm_us_per_exit,kvm_reason"
    rows = {l.split(",")[2]: l.split(",") for l in lines[1:]}
    assert (rows["demo pause"][3], rows["demo pause"][-1]) == ("2", "HLT")
    assert (rows["HLT"][3], rows["HLT"][-1]) == ("1", "HLT")
    (snap,) = json.loads(run_stat(tmp_path, "--json").stdout)["vms"]
    (vcpu,) = snap["vcpus"]
    assert vcpu["reasons"]["demo pause"]["kvm_reason"] == "HLT"
    assert vcpu["reasons"]["demo pause"]["handled_as"] == "demo pause"
    assert vcpu["reasons"]["IO"]["count"] == 1  # the fields of before are all still there
    assert vcpu["kvm_reasons"] == {"HLT": 3, "IO": 1}


def test_live_view_without_a_terminal_ends_when_its_vm_goes_away(outs_guest, tmp_path):
    outs_guest.run()
    stats = MachineStats(outs_guest)
    server = ControlServer(stats, name="tiny", directory=tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy.stats.stat_cli", "--dir", str(tmp_path), "--interval",
                             "0.1", str(os.getpid())], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        # Let it redraw a few times (no keys without a terminal), then take the VM away.
        while server.requests < 4 and proc.poll() is None:
            time.sleep(0.05)
        server.close()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stats.close()
    assert proc.returncode == 0, err
    assert server.requests >= 4
    assert "no running kvmpy VM answered" in out




def test_two_servers_of_one_name_in_one_process_both_answer(tmp_path):
    # Two Machines booting kernels with the same file name: neither may unlink the other's socket.
    with ControlServer(FixedSource({"vm": "first"}), name="bzImage", directory=tmp_path) as first, \
            ControlServer(FixedSource({"vm": "second"}), name="bzImage", directory=tmp_path) as second:
        assert first.path != second.path and first.path.exists() and second.path.exists()
        assert (query(first.path)["vm"], query(second.path)["vm"]) == ("first", "second")
        assert sorted(s.name for s in list_sockets(tmp_path)) == ["bzImage", "bzImage-2"]
        assert query(second.path)["name"] == "bzImage-2"  # the name the reply carries is the listed one
        out = run_stat(tmp_path, "--json", "bzImage-2")
        assert out.returncode == 0, out.stderr
        (snap,) = json.loads(out.stdout)["vms"]
        assert snap["name"] == "bzImage-2"
        first.close()
        assert second.path.exists() and query(second.path)["vm"] == "second"
        with ControlServer(FixedSource({"vm": "third"}), name="bzImage", directory=tmp_path) as third:
            assert third.name == "bzImage"  # the first's name is free again
            assert query(second.path)["vm"] == "second"

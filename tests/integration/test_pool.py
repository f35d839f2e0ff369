"""Many VMs from one process (kvmpy.pool): results, concurrency, and no leak over a few hundred VMs."""

from __future__ import annotations

import pytest

from kvmpy.pool import JobResult, Pool, ResourceSnapshot
from kvmpy.sandbox import BudgetExceeded, GuestFault, GuestFunction

SQUARE = GuestFunction("long guest_main(long x) { return x * x; }")
# ~10-50 ms of native CPL3 work: long enough for the workers' VMs to overlap.
SPIN = GuestFunction("long guest_main(long n) { volatile long s = 0; for (long i = 0; i < n; i++) s += i;"
                     " return s; }", timeout=30)


def test_pool_collects_every_result_in_order():
    with Pool(workers=8) as pool:
        assert pool.map(SQUARE, range(40)) == [i * i for i in range(40)]


def test_failed_jobs_are_results_with_their_exception():
    fault = GuestFunction("long guest_main(void) { return *(volatile long *)0; }")
    with Pool(workers=4) as pool:
        results = pool.run([(SQUARE, (3,)), (fault, ()), (SQUARE, (4,))])
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, GuestFault) and results[1].error.vector == 14
    assert results[0].value == 9 and results[2].value == 16
    assert isinstance(results[0], JobResult) and results[0].seconds > 0


def test_map_reraises_a_job_error():
    spin = GuestFunction("jmp .", lang="asm", timeout=0.1)
    with Pool(workers=2) as pool, pytest.raises(BudgetExceeded):
        pool.map(spin, [(), ()], star=True)


def test_dozens_of_vms_run_at_once():
    with Pool(workers=32) as pool:
        values = pool.map(SPIN, [3_000_000] * 64)
        peak = pool.peak_active
    assert values == [3_000_000 * 2_999_999 // 2] * 64
    assert peak >= 16, peak


def test_a_few_hundred_vms_leave_no_fds_threads_memory_or_interfaces_behind():
    fault = GuestFunction("long guest_main(void) { return *(volatile long *)0x10; }")
    SQUARE(1)  # the shared /dev/kvm handle and compiled image exist before the baseline
    with Pool(workers=24) as pool:  # warm up: worker threads, allocator arenas
        pool.run([(SQUARE if i % 5 else fault, (i,) if i % 5 else ()) for i in range(200)])
    before = ResourceSnapshot.take()
    rss = []
    with Pool(workers=24) as pool:
        for _batch in range(4):
            results = pool.run([(SQUARE if i % 5 else fault, (i,) if i % 5 else ()) for i in range(100)])
            assert sum(r.ok for r in results) == 80
            assert all(r.value == i * i for i, r in enumerate(results) if i % 5)
            rss.append(ResourceSnapshot.take().rss)
        assert pool.completed == 400
    after = ResourceSnapshot.take()
    # fds (VM and vCPU fds), kvm_run mappings and threads must be exactly back; address space
    # (where guest RAM shows) and RSS may move with allocator high-water marks but not with the
    # number of VMs (400 x 16 MiB of guest RAM).
    assert after.leaks_since(before, rss_slack=64 << 20) == []
    assert rss[-1] - rss[0] < 32 << 20, [r >> 20 for r in rss]


def test_resource_snapshot_reports_what_grew():
    import os

    from kvmpy.kvm import Kvm
    from kvmpy.memory import GuestMemory

    before = ResourceSnapshot.take()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert "open fds" in " ".join(ResourceSnapshot.take().leaks_since(before))
    finally:
        os.close(fd)
    # A VM's parts left open: its vCPU's kvm_run page and guest RAM the size of 32 sandboxes.
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0), GuestMemory("512M"):
        leaks = " ".join(ResourceSnapshot.take().leaks_since(before))
        assert "kvm_run mappings" in leaks and "address space grew by" in leaks, leaks
    assert ResourceSnapshot.take().leaks_since(before) == []

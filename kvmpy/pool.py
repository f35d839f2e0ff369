"""Many micro-VMs from one process: a thread pool of VM jobs.

    from kvmpy.pool import Pool
    from kvmpy.sandbox import GuestFunction

    square = GuestFunction("long guest_main(long x) { return x * x; }")
    with Pool(workers=32) as pool:
        results = pool.map(square, range(1000))        # 1000 VMs, up to 32 at once

A job is any callable; a `GuestFunction` creates, runs and destroys one VM
per call, so a pool of N workers drives up to N VMs at once. KVM_RUN
releases the GIL (cffi calls C without it), so guests at CPL3 run in
parallel on every host core while Python handles exits.

Each job owns its VM's resources and frees them when it returns (the
sandbox tears down in `finally`); the pool owns only its worker threads,
which end with `close()`. `ResourceSnapshot` records what a test compares
before and after: open fds, threads, kvm_run mappings, address space, RSS
and the host's network interfaces (TAP devices).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import psutil

DEFAULT_WORKERS = 16


@dataclass(frozen=True)
class JobResult:
    """The outcome of one job: `value`, or the exception it raised in `error`."""

    index: int
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class Pool:
    """Runs jobs on `workers` threads; each job typically is one whole VM life cycle.

    The workers are plain threads on a queue rather than a ThreadPoolExecutor:
    a failed job's exception keeps its traceback, and the executor's work
    item frame (reachable from that traceback) would refer back to the result,
    a cycle that holds every failed VM's Python objects until the next full
    garbage collection.
    """

    def __init__(self, workers: int = DEFAULT_WORKERS, *, name: str = "kvmpy-pool") -> None:
        if not 1 <= workers <= 1024:
            raise ValueError(f"workers {workers}: must be between 1 and 1024")
        self.workers = workers
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Future, int, Callable[..., Any], tuple] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self.active = 0  # jobs running now
        self.peak_active = 0  # the most jobs that ran at once
        self.completed = 0
        self.failed = 0

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, index, fn, args = item
            del item
            if future.set_running_or_notify_cancel():
                future.set_result(self._run(index, fn, args))
            del future, fn, args  # nothing of a finished job stays in this frame

    def _run(self, index: int, fn: Callable[..., Any], args: Sequence[Any]) -> JobResult:
        with self._lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        t0 = time.perf_counter()
        try:
            return JobResult(index, fn(*args), None, time.perf_counter() - t0)
        except Exception as e:  # a failed job is a result, not the pool's failure
            with self._lock:
                self.failed += 1
            return JobResult(index, None, e, time.perf_counter() - t0)
        finally:
            with self._lock:
                self.active -= 1
                self.completed += 1

    def _submit(self, index: int, fn: Callable[..., Any], args: tuple) -> Future[JobResult]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            if len(self._threads) < self.workers:
                t = threading.Thread(target=self._worker, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        future: Future[JobResult] = Future()
        self._queue.put((future, index, fn, args))
        return future

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[JobResult]:
        """Queue one job; its future resolves to a `JobResult` (never raises the job's error)."""
        return self._submit(-1, fn, args)

    def run(self, jobs: Iterable[tuple[Callable[..., Any], Sequence[Any]]]) -> list[JobResult]:
        """Run (callable, args) jobs; results in submission order."""
        futures = [self._submit(i, fn, tuple(args)) for i, (fn, args) in enumerate(jobs)]
        return [f.result() for f in futures]

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, star: bool = False) -> list[Any]:
        """`fn(item)` (or `fn(*item)` with star=True) for every item, in order; re-raises the first error."""
        results = self.run((fn, tuple(item) if star else (item,)) for item in items)
        for r in results:
            if r.error is not None:
                raise r.error
        return [r.value for r in results]

    def close(self, wait: bool = True) -> None:
        """Stop accepting jobs; queued jobs still run. With `wait`, join the worker threads."""
        with self._lock:
            if self._closed:
                threads = []
            else:
                self._closed = True
                threads = list(self._threads)
                for _ in threads:
                    self._queue.put(None)
        if wait:
            for t in threads:
                t.join()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ResourceSnapshot:
    """This process's open fds, threads and memory, and the host's network interfaces.

    Memory is checked two ways. `vcpu_pages` counts the kvm_run mappings
    (`anon_inode:kvm-vcpu` in /proc/self/maps) exactly: a vCPU left mapped
    shows at once. Guest RAM is anonymous memory like the allocator's, so it
    is caught by `address_space` (the process's virtual size): a leaked VM
    adds its whole RAM there, while Python's and glibc's own arenas and
    thread-stack caches move it by a few tens of MiB whatever the number of
    VMs. (Counting every line of /proc/self/maps, as an earlier version did,
    flags those arenas: 519 -> 545 lines over 400 VMs that leaked nothing.)
    """

    fds: int
    threads: int
    rss: int
    vcpu_pages: int
    address_space: int
    interfaces: frozenset[str]

    @classmethod
    def take(cls) -> ResourceSnapshot:
        p = psutil.Process()
        try:
            interfaces = frozenset(os.listdir("/sys/class/net"))
        except OSError:
            interfaces = frozenset()
        with open("/proc/self/maps") as f:
            vcpu_pages = sum("anon_inode:kvm-vcpu" in line for line in f)
        memory = p.memory_info()
        return cls(p.num_fds(), threading.active_count(), memory.rss, vcpu_pages, memory.vms, interfaces)

    def leaks_since(self, before: ResourceSnapshot, *, rss_slack: int = 64 << 20,
                    address_space_slack: int = 256 << 20) -> list[str]:
        """What grew since `before` (empty when nothing leaked).

        RSS may grow by `rss_slack` and the virtual size by
        `address_space_slack` (allocator high-water marks); fds, threads,
        kvm_run mappings and network interfaces must be exactly back.
        """
        problems = []
        if self.fds > before.fds:
            problems.append(f"open fds {before.fds} -> {self.fds}")
        if self.threads > before.threads:
            problems.append(f"threads {before.threads} -> {self.threads}")
        if self.vcpu_pages > before.vcpu_pages:
            problems.append(f"kvm_run mappings {before.vcpu_pages} -> {self.vcpu_pages}")
        if self.address_space - before.address_space > address_space_slack:
            problems.append(f"address space grew by {(self.address_space - before.address_space) >> 20} MiB"
                            f" (allowed {address_space_slack >> 20} MiB)")
        if self.rss - before.rss > rss_slack:
            problems.append(f"RSS grew by {(self.rss - before.rss) >> 20} MiB (allowed {rss_slack >> 20} MiB)")
        new = self.interfaces - before.interfaces
        if new:
            problems.append(f"network interfaces left behind: {sorted(new)}")
        return problems

__all__ = ["JobResult", "Pool", "ResourceSnapshot"]

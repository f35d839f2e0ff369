"""Many jobs, each in its own micro-VM, from one process: a pool of worker threads.

Counts the primes below 20,000 in 200 chunks; every chunk is a guest
function call, so 200 VMs are created, run and destroyed, up to 32 at once.
The process's fds, threads and memory mappings are the same afterwards.

    .venv/bin/python examples/pool.py
"""

from __future__ import annotations

import time

from kvmpy.pool import Pool, ResourceSnapshot
from kvmpy.sandbox import GuestFunction

COUNT_PRIMES = """
long guest_main(long start, long end) {
    long count = 0;
    for (long n = start < 2 ? 2 : start; n < end; n++) {
        long prime = 1;
        for (long d = 2; d * d <= n; d++)
            if (n % d == 0) { prime = 0; break; }
        count += prime;
    }
    return count;
}
"""

LIMIT, CHUNKS = 20_000, 200


def main() -> None:
    fn = GuestFunction(COUNT_PRIMES, memory="8M", timeout=10.0)
    step = LIMIT // CHUNKS
    with Pool(workers=32) as pool:  # warm-up: compiles, opens /dev/kvm, creates malloc arenas
        pool.map(fn, [(0, 10)] * 64, star=True)
    before = ResourceSnapshot.take()
    t0 = time.perf_counter()
    with Pool(workers=32) as pool:
        counts = pool.map(fn, [(i, i + step) for i in range(0, LIMIT, step)], star=True)
        peak = pool.peak_active
    elapsed = time.perf_counter() - t0
    expected = sum(1 for n in range(2, LIMIT) if all(n % d for d in range(2, int(n ** 0.5) + 1)))
    print(f"{CHUNKS} VMs, up to {peak} at once, in {elapsed:.2f} s")
    print(f"primes below {LIMIT}: guests {sum(counts)}, host {expected}")
    leaks = ResourceSnapshot.take().leaks_since(before)
    print("resources back to baseline" if not leaks else f"LEAK: {leaks}")


if __name__ == "__main__":
    main()

"""Fault injection: SIGKILL the VMM's devices at random points, many times, and count what was lost or left.

    scripts/faults.py [--blk 200] [--net 50] [--seed 1]

blk: a virtio-blk write burst (tests/fault_worker.py) killed after a random
0.2-1.5 s; afterwards every sector must hold the data of the last FLUSHed
round that wrote it, or of a later one (written, not yet flushed), never
older data or a torn mix. net: a UDP transfer from a virtio-net device over
a real TAP (with a vsock listener and a control socket), killed after a
random 0.3-1.2 s, then started again on the same TAP name and socket
paths. Prints the figures docs/reliability.md quotes; exit status 1 on any
problem.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fault_worker import SECTORS, blk_kill_trial, net_kill_trials  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blk", type=int, default=200, help="kills during a disk write burst")
    p.add_argument("--net", type=int, default=50, help="kills during a TAP transfer")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(args.seed)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        rounds = 0
        for i in range(args.blk):
            flushed, found = blk_kill_trial(Path(tmp) / "burst.img", rng.randrange(1 << 30), rng.uniform(0.2, 1.5))
            rounds += flushed
            problems += [f"blk kill {i}: {x}" for x in found]
        print(f"blk: {args.blk} SIGKILLs during write bursts, {rounds} flushed rounds "
              f"({args.blk * SECTORS} sectors checked), {sum(x.startswith('blk') for x in problems)} lost or torn "
              f"({time.monotonic() - t0:.0f} s)")
        if args.net and os.access("/dev/net/tun", os.R_OK | os.W_OK) and os.geteuid() == 0:
            t0 = time.monotonic()
            stats = net_kill_trials(args.net, rng, Path(tmp))
            problems += stats["problems"]
            print(f"net: {stats['kills']} SIGKILLs during TAP transfers ({stats['datagrams']} datagrams received), "
                  f"{stats['starts']} starts on the same TAP/socket names, "
                  f"{len(stats['problems'])} left-behind TAPs/sockets or failed starts "
                  f"({time.monotonic() - t0:.0f} s)")
        elif args.net:
            print("net: skipped (needs root and /dev/net/tun)")
    for x in problems[:20]:
        print(f"  {x}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

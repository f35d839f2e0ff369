"""`kvmpy stat`: exit statistics of running kvmpy VMs, like kvm_stat but per VM and with VMM cost.

    kvmpy stat                     live view of every running kvmpy VM (keys below; q quits)
    kvmpy stat 1234 | NAME         one VM, by process id or VM name
    kvmpy stat --view ports        reasons | ports | mmio | sites | kvm
    kvmpy stat --once [--json | --csv]   --json: {"vms": [snapshot, ...], "host": debugfs counters or null}
    kvmpy stat --plot exits.png --duration 30

Each VM process serves snapshots on its control socket (kvmpy.stats.control);
this command only reads them. Rates are per second over the refresh
interval (over the VM's whole run with --once). Exits that kvmpy consumed
are named by what it did with them ("syscall trap", "completion of int3":
both KVM_EXIT_INTERNAL_ERROR to KVM); the `kvm_reason` column keeps KVM's.
When debugfs exposes KVM (/sys/kernel/debug/kvm), the `kvm` view also lists
the host-wide per-VM kernel counters, VMs of other programs included.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from select import select as wait_readable
from typing import Any, Iterable

from ..errors import KvmError
from .control import ControlClient, SocketInfo, list_sockets
from .kvmstats import read_debugfs

VIEWS = ("reasons", "ports", "mmio", "sites", "kvm")
SORT_KEYS = ("count", "rate", "vmm", "name")
DEBUGFS = "/sys/kernel/debug/kvm"
# KVM counters worth a column of their own in the host-wide table.
HOST_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_injections", "pf_fixed",
                 "insn_emulation", "mmu_shadow_zapped")

EPILOG = """\
keys in the live view: 1-5 or v (Tab) choose the view, s the sort order,
q quits.

views: reasons (exits by what kvmpy did with them, else by KVM exit reason;
VMM time per exit), ports (port I/O by port, direction and device), mmio
(MMIO by page and device), sites (guest functions causing exits, when the
VM profiles its exits), kvm (KVM's own vCPU and VM counters; host-wide
per-VM debugfs counters when available).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `stat` to the `kvmpy` subcommands."""
    p = subparsers.add_parser("stat", help="VM-exit statistics of running kvmpy VMs (live, --once, --json, --plot)",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vm", nargs="?", help="process id or VM name (default: every running kvmpy VM)")
    p.add_argument("--view", choices=VIEWS, default="reasons", help="what to list (default: %(default)s)")
    p.add_argument("--sort", choices=SORT_KEYS, default="count", help="row order (default: %(default)s)")
    p.add_argument("--interval", type=float, default=1.0, help="refresh / sampling interval in s (default: 1)")
    p.add_argument("--top", type=int, default=25, help="rows per VM (default: %(default)s)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the snapshots as JSON and exit")
    out.add_argument("--csv", action="store_true", help="print the view's rows as CSV and exit")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="sample for --duration seconds, then draw exit rates and latency histograms")
    p.add_argument("--duration", type=float, default=10.0, help="sampling time for --plot (default: 10 s)")
    p.add_argument("--dir", type=Path, help="directory of the control sockets (default: the standard ones)")
    return p


# -- collecting -----------------------------------------------------------------


def select(sockets: list[SocketInfo], vm: str | None) -> list[SocketInfo]:
    """The sockets matching a pid or a VM name (all when `vm` is None)."""
    if vm is None:
        return sockets
    if vm.isdigit():
        return [s for s in sockets if s.pid == int(vm)]
    return [s for s in sockets if s.name == vm]


def _aggregate(snap: dict[str, Any]) -> dict[str, Any]:
    """One VM's snapshot summed over its vCPUs, keyed for the views."""
    reasons: dict[str, dict[str, Any]] = {}
    ports: dict[tuple[int, str, str], int] = {}
    mmio: dict[tuple[int, str], int] = {}
    kvm: dict[str, int] = {}
    sites: dict[str, dict[str, int]] = {}
    elapsed = 0
    for v in snap.get("vcpus", []):
        elapsed = max(elapsed, v.get("elapsed_ns", 0))
        for name, rec in v.get("reasons", {}).items():
            r = reasons.setdefault(name, {"count": 0, "vmm_ns": 0, "kvm_reason": rec.get("kvm_reason", name)})
            r["count"] += rec["count"]
            r["vmm_ns"] += rec["vmm_ns"]
        for p in v.get("io", []):
            key = (p["port"], p["direction"], p.get("device") or "-")
            ports[key] = ports.get(key, 0) + p["count"]
        for m in v.get("mmio", []):
            key = (m["addr"] & ~0xFFF, m.get("device") or "-")
            mmio[key] = mmio.get(key, 0) + m["count"]
        for name, value in v.get("kvm", {}).items():
            if isinstance(value, int):
                kvm[name] = kvm.get(name, 0) + value
        prof = v.get("profile") or {}
        for f in prof.get("functions", []):
            s = sites.setdefault(f["function"], {"count": 0, "vmm_ns": 0})
            s["count"] += f["count"]
            s["vmm_ns"] += f["vmm_ns"]
    for name, value in snap.get("vm", {}).get("kvm", {}).items():
        if isinstance(value, int):
            kvm[f"vm.{name}"] = value
    return {"reasons": reasons, "ports": ports, "mmio": mmio, "kvm": kvm, "sites": sites,
            "elapsed_s": elapsed / 1e9, "t": snap.get("monotonic_ns", 0) / 1e9}


def rows(snap: dict[str, Any], view: str, prev: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rows of `view` for one VM snapshot; rates against `prev` (or over the whole run)."""
    cur = _aggregate(snap)
    before = _aggregate(prev) if prev is not None else None
    dt = (cur["t"] - before["t"]) if before is not None else cur["elapsed_s"]

    def rate(now: int, then: int) -> float:
        # max: an exit caught mid-handling moves from KVM's reason to its label by the next snapshot
        return max(now - then, 0) / dt if dt > 0 else 0.0

    out: list[dict[str, Any]] = []
    if view == "reasons":
        total = sum(r["count"] for r in cur["reasons"].values()) or 1
        for name, r in cur["reasons"].items():
            b = before["reasons"].get(name, {"count": 0, "vmm_ns": 0}) if before else {"count": 0, "vmm_ns": 0}
            out.append({"reason": name, "count": r["count"], "rate": rate(r["count"], b["count"]),
                        "share": 100.0 * r["count"] / total, "vmm_ms": r["vmm_ns"] / 1e6,
                        "vmm_us_per_exit": r["vmm_ns"] / r["count"] / 1e3 if r["count"] else 0.0,
                        "kvm_reason": r["kvm_reason"]})
    elif view == "ports":
        for (port, direction, device), n in cur["ports"].items():
            b = before["ports"].get((port, direction, device), 0) if before else 0
            out.append({"port": f"{port:#06x}", "direction": direction, "device": device, "count": n,
                        "rate": rate(n, b)})
    elif view == "mmio":
        for (page, device), n in cur["mmio"].items():
            b = before["mmio"].get((page, device), 0) if before else 0
            out.append({"page": f"{page:#x}", "device": device, "count": n, "rate": rate(n, b)})
    elif view == "sites":
        for function, s in cur["sites"].items():
            b = before["sites"].get(function, {"count": 0})["count"] if before else 0
            out.append({"function": function, "count": s["count"], "rate": rate(s["count"], b),
                        "vmm_ms": s["vmm_ns"] / 1e6})
    elif view == "kvm":
        for name, value in cur["kvm"].items():
            b = before["kvm"].get(name, 0) if before else 0
            out.append({"counter": name, "count": value, "rate": rate(value, b)})
    else:
        raise ValueError(f"unknown view {view!r}")
    return out


def sort_rows(rs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    if key == "name":
        first = next(iter(rs[0])) if rs else ""
        return sorted(rs, key=lambda r: str(r[first]))
    field = {"count": "count", "rate": "rate", "vmm": "vmm_ms"}[key]
    return sorted(rs, key=lambda r: (r.get(field, r["count"]), r["count"]), reverse=True)


def _poll(clients: dict[Path, ControlClient], sockets: list[SocketInfo]) -> list[dict[str, Any]]:
    snaps = []
    for s in sockets:
        try:
            c = clients.get(s.path)
            if c is None:
                c = clients[s.path] = ControlClient(s.path)
            snaps.append(c.request("snapshot"))
        except KvmError:
            bad = clients.pop(s.path, None)
            if bad is not None:
                bad.close()
    return snaps


# -- output ---------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def header(snap: dict[str, Any]) -> str:
    """The line above a VM's table: name, pid, exits, run time, vCPUs, VMM time."""
    agg = _aggregate(snap)
    total = sum(r["count"] for r in agg["reasons"].values())
    vmm = sum(r["vmm_ns"] for r in agg["reasons"].values()) / 1e9
    ncpu = len([v for v in snap.get("vcpus", []) if "reasons" in v])
    return (f"{snap.get('name')} (pid {snap['pid']}): {total:,} exits in {agg['elapsed_s']:.1f} s, "
            f"{ncpu} vCPU(s), VMM {vmm:.2f} s")


def render(snaps: list[dict[str, Any]], prevs: dict[int, dict[str, Any]], args: argparse.Namespace,
           host: dict[str, dict[str, int]] | None = None) -> Any:
    """A rich renderable: per VM a header line and a table (and the host-wide debugfs table)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    for snap in snaps:
        rs = sort_rows(rows(snap, args.view, prevs.get(snap["pid"])), args.sort)[:args.top]
        # A line of its own: a table title wraps at the table's width, which is narrow.
        parts.append(Text(header(snap), style="bold", no_wrap=True, overflow="ignore"))
        t = Table(expand=False)
        cols = list(rs[0]) if rs else ["(nothing yet)"]
        for c in cols:
            t.add_column(c, justify="right" if c not in ("reason", "device", "function", "counter",
                                                          "direction", "kvm_reason") else "left")
        for r in rs:
            t.add_row(*(_fmt(r[c]) for c in cols))
        if args.view == "sites" and not rs:
            t.caption = "no exit-site profile in this VM (start it with profiling on)"
        parts.append(t)
    if host and args.view == "kvm":
        t = Table(title="host-wide KVM counters (debugfs), every VM of this host", title_justify="left")
        t.add_column("vm (pid-fd)")
        for c in HOST_COUNTERS:
            t.add_column(c, justify="right")
        for vm, counters in host.items():
            t.add_row(vm, *(_fmt(counters.get(c, "-")) for c in HOST_COUNTERS))
        parts.append(t)
    if not snaps:
        parts.append("no running kvmpy VM answered")
    return Group(*parts)


def to_csv(snaps: list[dict[str, Any]], args: argparse.Namespace) -> str:
    buf = io.StringIO()
    writer: csv.DictWriter | None = None
    for snap in snaps:
        for r in sort_rows(rows(snap, args.view), args.sort):
            line = {"pid": snap["pid"], "vm": snap.get("name"), **r}
            if writer is None:
                writer = csv.DictWriter(buf, fieldnames=list(line), lineterminator="\n")
                writer.writeheader()
            writer.writerow(line)
    return buf.getvalue()


def _host_counters() -> dict[str, dict[str, int]] | None:
    if not Path(DEBUGFS).is_dir():
        return None
    return read_debugfs(DEBUGFS) or None


# -- the command ----------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`kvmpy stat`; returns the process exit status."""
    sockets = select(list_sockets(args.dir), args.vm)
    if not sockets:
        where = f" matching {args.vm!r}" if args.vm else ""
        print(f"kvmpy stat: no running kvmpy VM{where} (no control socket"
              f"{' in ' + str(args.dir) if args.dir else ''})", file=sys.stderr)
        return 1
    clients: dict[Path, ControlClient] = {}
    try:
        if args.plot is not None:
            return _plot(clients, sockets, args)
        snaps = _poll(clients, sockets)
        if not snaps:
            print("kvmpy stat: no VM answered on its control socket", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"vms": snaps, "host": _host_counters()}, indent=1))
            return 0
        if args.csv:
            sys.stdout.write(to_csv(snaps, args))
            return 0
        from rich.console import Console

        # Not a terminal and no COLUMNS: nothing to fit, so do not wrap (rich would assume 80).
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        console = Console(width=4096 if wide else None)
        if args.once:
            console.print(render(snaps, {}, args, _host_counters()))
            return 0
        return _live(console, clients, sockets, snaps, args)
    finally:
        for c in clients.values():
            c.close()


class _Keys:
    """Single keystrokes from the terminal on stdin (cbreak mode while open); inactive without one."""

    def __init__(self, stream: Any) -> None:
        try:
            self.fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # None, closed, or not a file (io.StringIO)
            self.fd = -1
        self.active = self.fd >= 0 and os.isatty(self.fd)
        self._saved: Any = None

    def __enter__(self) -> _Keys:
        if self.active:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout: float) -> str:
        """The keys typed within `timeout` seconds ("" if none): returns at the first keystroke."""
        if not self.active:
            time.sleep(max(timeout, 0.0))
            return ""
        ready, _, _ = wait_readable([self.fd], [], [], max(timeout, 0.0))
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        if not data:  # the terminal went away
            self.active = False
            return "q"
        return data.decode(errors="replace")


def apply_key(args: argparse.Namespace, key: str) -> bool:
    """Change the view or sort order of the live view for one keystroke; True if something changed."""
    if key and key in "12345":
        view = VIEWS[int(key) - 1]
    elif key in ("v", "\t"):
        view = VIEWS[(VIEWS.index(args.view) + 1) % len(VIEWS)]
    elif key == "s":
        args.sort = SORT_KEYS[(SORT_KEYS.index(args.sort) + 1) % len(SORT_KEYS)]
        return True
    else:
        return False
    changed = view != args.view
    args.view = view
    return changed


def footer(args: argparse.Namespace) -> Any:
    """The live view's key line: the views and sort orders, the current ones highlighted."""
    from rich.text import Text

    t = Text(no_wrap=True, overflow="ellipsis")
    t.append("q quits   view (1-5, v): ")
    for i, v in enumerate(VIEWS, 1):
        t.append(f"{i} {v}", style="reverse" if v == args.view else "")
        t.append(" ")
    t.append("  sort (s): ")
    for k in SORT_KEYS:
        t.append(k, style="reverse" if k == args.sort else "")
        t.append(" ")
    return t


def _live(console: Any, clients: dict[Path, ControlClient], sockets: list[SocketInfo],
          snaps: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """The top-like view: redraws every --interval, and at once on a key (1-5/v/Tab view, s sort, q quit)."""
    from rich.console import Group
    from rich.live import Live

    prevs: dict[int, dict[str, Any]] = {}  # what the rates on screen are against
    host = _host_counters()

    def screen() -> Any:
        return Group(render(snaps, prevs, args, host), footer(args))

    keys = _Keys(sys.stdin)
    try:
        with keys, Live(screen(), console=console, auto_refresh=False, screen=keys.active and console.is_terminal,
                        vertical_overflow="crop") as live:
            next_poll = time.monotonic() + max(args.interval, 0.1)
            while True:
                typed = keys.read(next_poll - time.monotonic())
                if "q" in typed or "Q" in typed:
                    return 0
                if typed:
                    changed = [apply_key(args, k) for k in typed]  # every key, not up to the first change
                    if any(changed):
                        live.update(screen(), refresh=True)
                    continue
                next_poll = time.monotonic() + max(args.interval, 0.1)
                if args.vm is None:  # VMs come and go
                    sockets = list_sockets(args.dir)
                new = _poll(clients, sockets)
                prevs = {s["pid"]: s for s in snaps}
                snaps = new
                host = _host_counters()
                live.update(screen(), refresh=True)
                if not snaps and args.vm is not None:
                    return 0  # the VM we watched is gone
    except KeyboardInterrupt:
        return 0


def _plot(clients: dict[Path, ControlClient], sockets: list[SocketInfo], args: argparse.Namespace) -> int:
    from .plot import draw, idle_note, plot_series

    if len(sockets) > 1:
        names = ", ".join(f"{s.pid} ({s.name})" for s in sockets)
        print(f"kvmpy stat --plot: several VMs are running ({names}); name one", file=sys.stderr)
        return 1
    samples: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.duration
    try:
        while True:
            snaps = _poll(clients, sockets)
            if not snaps:
                break  # the VM ended: plot what was sampled
            samples.append(snaps[0])
            if time.monotonic() >= deadline:
                break
            time.sleep(max(args.interval, 0.05))
    except KeyboardInterrupt:
        pass
    if len(samples) < 2:
        print("kvmpy stat --plot: fewer than two snapshots sampled; nothing to plot", file=sys.stderr)
        return 1
    series = plot_series(samples)
    try:
        draw(series, args.plot)
    except RuntimeError as e:
        print(f"kvmpy stat: {e}", file=sys.stderr)
        return 1
    print(f"kvmpy stat: {len(samples)} snapshots over {series['window_s']:.3g} s, {series['window_exits']:,} "
          f"exits in the window, {series['total_exits']:,} since the VM started -> {args.plot}", file=sys.stderr)
    note = idle_note(series)
    if note is not None:
        print(f"kvmpy stat: {note.splitlines()[0]}", file=sys.stderr)
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m kvmpy.stats.stat_cli` (the same as `kvmpy stat`)."""
    parser = argparse.ArgumentParser(prog="kvmpy")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["stat", *(argv if argv is not None else sys.argv[1:])])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

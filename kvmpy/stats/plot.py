"""`kvmpy stat --plot`: exit rate over time by reason, and the latency histograms.

matplotlib is an optional extra (`pip install kvmpy[plot]`); it is imported
only when a plot is drawn. `plot_series(samples)` computes what is drawn
from a time series of snapshots (plain data, testable without matplotlib);
`draw(series, path)` renders it to a PNG and returns the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .accounting import NBUCKETS


def _reason_counts(snap: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in snap.get("vcpus", []):
        for name, rec in v.get("reasons", {}).items():
            counts[name] = counts.get(name, 0) + rec["count"]
    return counts


def _hist(snap: dict[str, Any], key: str) -> list[int]:
    total = [0] * NBUCKETS
    for v in snap.get("vcpus", []):
        for i, n in enumerate(v.get(key, [])[:NBUCKETS]):
            total[i] += n
    return total


def _kvm_exits(snap: dict[str, Any]) -> int | None:
    """KVM's own `exits` counter summed over vCPUs (exits handled in the kernel included), if served."""
    values = [v["kvm"]["exits"] for v in snap.get("vcpus", []) if isinstance(v.get("kvm", {}).get("exits"), int)]
    return sum(values) if values else None


def _elapsed_s(snap: dict[str, Any]) -> float:
    return max((v.get("elapsed_ns", 0) for v in snap.get("vcpus", [])), default=0) / 1e9


def plot_series(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """From snapshots of one VM taken over time (oldest first):

    - "time": seconds since the first sample, one per interval end
    - "rates": {reason: [exits per second in each interval]} (one series per reason seen in the window;
      reasons are the snapshot's names: KVM's, or what kvmpy handled the exit as)
    - "kvm_rates": KVM's own `exits` counter per second (in-kernel exits too), or None if not served
    - "guest_hist", "vmm_hist": log2-ns histograms of the exits in the window
    - "guest_hist_total", "vmm_hist_total": the same since the VM started (the last snapshot)
    - "window_s", "window_exits", "total_exits", "elapsed_s": the window, its exits, the VM's so far
    - "kvm_window_exits": KVM's `exits` over the window (None if not served)
    """
    if len(samples) < 2:
        raise ValueError("a plot needs at least two snapshots (an interval)")
    t0 = samples[0]["monotonic_ns"]
    counts = [_reason_counts(s) for s in samples]
    # Reasons that grew over the window. An exit a snapshot catches while its handler runs is
    # still under KVM's reason and moves to its label a moment later: counts can step back by one.
    reasons = sorted(r for r in counts[-1] if counts[-1][r] - counts[0].get(r, 0) > 0)
    kvm = [_kvm_exits(s) for s in samples]
    times, rates = [], {r: [] for r in reasons}
    kvm_rates: list[float] | None = [] if all(k is not None for k in kvm) else None
    for i, (prev, cur, s_prev, s_cur) in enumerate(zip(counts, counts[1:], samples, samples[1:])):
        dt = (s_cur["monotonic_ns"] - s_prev["monotonic_ns"]) / 1e9
        times.append((s_cur["monotonic_ns"] - t0) / 1e9)
        for r in reasons:
            rates[r].append(max(cur.get(r, 0) - prev.get(r, 0), 0) / dt if dt > 0 else 0.0)
        if kvm_rates is not None:
            kvm_rates.append((kvm[i + 1] - kvm[i]) / dt if dt > 0 else 0.0)  # type: ignore[operator]
    first, last = samples[0], samples[-1]
    guest_total, vmm_total = _hist(last, "guest_hist"), _hist(last, "vmm_hist")
    guest = [b - a for a, b in zip(_hist(first, "guest_hist"), guest_total)]
    vmm = [b - a for a, b in zip(_hist(first, "vmm_hist"), vmm_total)]
    return {"name": last.get("name"), "pid": last.get("pid"), "time": times, "rates": rates,
            "kvm_rates": kvm_rates, "guest_hist": guest, "vmm_hist": vmm,
            "guest_hist_total": guest_total, "vmm_hist_total": vmm_total,
            "window_s": (last["monotonic_ns"] - t0) / 1e9,
            "window_exits": sum(counts[-1].values()) - sum(counts[0].values()),
            "total_exits": sum(counts[-1].values()), "elapsed_s": _elapsed_s(last),
            "kvm_window_exits": kvm[-1] - kvm[0] if kvm_rates is not None else None}  # type: ignore[operator]


def _bucket_label(b: int) -> str:
    if b == 0:
        return "0"
    low = 1 << (b - 1)
    for unit, div in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if low >= div:
            return f"{low / div:.3g}{unit}"
    return f"{low}ns"


def idle_note(series: dict[str, Any]) -> str | None:
    """The sentence an exit-less window gets in the picture (None when the window had exits)."""
    if series["window_exits"]:
        return None
    since = (f"{series['total_exits']:,} exits since the VM started" if series["total_exits"]
             else "no exit since the VM started")
    in_kvm = series.get("kvm_window_exits")
    kvm = f" (KVM handled {in_kvm:,} exits itself)" if in_kvm else ""
    return (f"no exit reached kvmpy in these {series['window_s']:.3g} s: the guest was idle "
            f"or ran without exiting{kvm}\n{since}; the histograms below show them")


def draw(series: dict[str, Any], path: str | Path) -> Any:
    """Render `plot_series` output to a PNG at `path`; returns the matplotlib Figure.

    Axes 0: one line per exit reason (exits/s over time), KVM's own exit
    counter on a second axis, and a note when the window had no exit.
    Axes 1: the guest and VMM time histograms since the VM started (light)
    with the window's share of them (dark).
    """
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'kvmpy[plot]'") from e
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8), layout="constrained")
    rate_ax, hist_ax = fig.subplots(2, 1)
    times = series["time"]
    for reason, values in sorted(series["rates"].items()):
        rate_ax.plot(times, values, label=reason, marker=".")
    note = idle_note(series)
    if note is not None:
        rate_ax.plot(times, [0.0] * len(times), label="every reason", color="0.5", marker=".")
        rate_ax.set_ylim(-0.05, 1)
        rate_ax.text(0.5, 0.55, note, transform=rate_ax.transAxes, ha="center", va="center",
                     fontsize="medium", bbox={"boxstyle": "round", "facecolor": "lightyellow", "alpha": 0.9})
    title = f"kvmpy {series.get('name') or ''} (pid {series.get('pid')})".replace("  ", " ")
    rate_ax.set_title(f"{title}: VM exits to kvmpy per second, by what they were "
                      f"({series['window_exits']:,} in {series['window_s']:.3g} s)")
    rate_ax.set_xlabel("time (s)")
    rate_ax.set_ylabel("exits/s")
    if note is None:
        # Bursts (a boot's port I/O: thousands/s) and steady rates (syscalls: tens/s) in one picture.
        rate_ax.set_yscale("symlog", linthresh=10)
        rate_ax.set_ylabel("exits/s (log scale above 10)")
    handles, labels = rate_ax.get_legend_handles_labels()
    if series.get("kvm_rates") is not None:
        kvm_ax = rate_ax.twinx()
        (line,) = kvm_ax.plot(times, series["kvm_rates"], color="0.6", linestyle="--",
                              label="all exits KVM counted (KVM `exits`, right axis)")
        if note is None:
            kvm_ax.set_yscale("symlog", linthresh=10)
        kvm_ax.set_ylabel("KVM exits/s")
        kvm_ax.set_ylim(bottom=0)
        handles, labels = handles + [line], labels + [line.get_label()]
    rate_ax.legend(handles, labels, loc="upper right", fontsize="small")
    rate_ax.grid(True, alpha=0.3)

    g_total, v_total = series["guest_hist_total"], series["vmm_hist_total"]
    used = [b for b in range(NBUCKETS) if g_total[b] or v_total[b] or series["guest_hist"][b]
            or series["vmm_hist"][b]]
    lo, hi = (min(used), max(used) + 1) if used else (0, 1)
    xs = list(range(lo, hi))
    width = 0.4
    g_x = [x - width / 2 for x in xs]
    v_x = [x + width / 2 for x in xs]
    hist_ax.bar(g_x, g_total[lo:hi], width, color="tab:blue", alpha=0.3,
                label="in the guest before the exit, since start")
    hist_ax.bar(v_x, v_total[lo:hi], width, color="tab:orange", alpha=0.3,
                label="in the VMM handling it, since start")
    hist_ax.bar(g_x, series["guest_hist"][lo:hi], width, color="tab:blue", label="... in the window")
    hist_ax.bar(v_x, series["vmm_hist"][lo:hi], width, color="tab:orange", label="... in the window")
    hist_ax.set_xticks(xs, [_bucket_label(b) for b in xs], rotation=45, fontsize="small")
    hist_ax.set_yscale("symlog")
    hist_ax.set_xlabel("time per exit (log2 buckets, lower bound)")
    hist_ax.set_ylabel("exits")
    window = (f"{series['window_exits']:,} in the window" if series["window_exits"]
              else "none in the window")
    hist_ax.set_title(f"latency histograms: {series['total_exits']:,} exits since the VM started "
                      f"({series['elapsed_s']:.1f} s of run), {window}")
    if not used:
        hist_ax.text(0.5, 0.5, "no exit since the VM started", transform=hist_ax.transAxes,
                     ha="center", va="center")
    hist_ax.legend(fontsize="small", ncols=2)
    fig.savefig(str(path), format="png", dpi=100)
    return fig

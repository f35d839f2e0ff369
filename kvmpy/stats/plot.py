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


def plot_series(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """From snapshots of one VM taken over time (oldest first):

    - "time": seconds since the first sample, one per interval end
    - "rates": {reason: [exits per second in each interval]} (one series per reason seen)
    - "guest_hist", "vmm_hist": log2-ns histograms of the exits in the whole window
    """
    if len(samples) < 2:
        raise ValueError("a plot needs at least two snapshots (an interval)")
    t0 = samples[0]["monotonic_ns"]
    counts = [_reason_counts(s) for s in samples]
    reasons = sorted({r for c in counts for r in c if c.get(r, 0) - counts[0].get(r, 0) > 0})
    times, rates = [], {r: [] for r in reasons}
    for prev, cur, s_prev, s_cur in zip(counts, counts[1:], samples, samples[1:]):
        dt = (s_cur["monotonic_ns"] - s_prev["monotonic_ns"]) / 1e9
        times.append((s_cur["monotonic_ns"] - t0) / 1e9)
        for r in reasons:
            rates[r].append((cur.get(r, 0) - prev.get(r, 0)) / dt if dt > 0 else 0.0)
    first, last = samples[0], samples[-1]
    guest = [b - a for a, b in zip(_hist(first, "guest_hist"), _hist(last, "guest_hist"))]
    vmm = [b - a for a, b in zip(_hist(first, "vmm_hist"), _hist(last, "vmm_hist"))]
    return {"name": last.get("name"), "pid": last.get("pid"), "time": times, "rates": rates,
            "guest_hist": guest, "vmm_hist": vmm}


def _bucket_label(b: int) -> str:
    if b == 0:
        return "0"
    low = 1 << (b - 1)
    for unit, div in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if low >= div:
            return f"{low / div:.3g}{unit}"
    return f"{low}ns"


def draw(series: dict[str, Any], path: str | Path) -> Any:
    """Render `plot_series` output to a PNG at `path`; returns the matplotlib Figure.

    Axes 0: one line per exit reason (exits/s over time). Axes 1: the guest
    and VMM time histograms over the window.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'kvmpy[plot]'") from e
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8), layout="constrained")
    rate_ax, hist_ax = fig.subplots(2, 1)
    for reason, values in sorted(series["rates"].items()):
        rate_ax.plot(series["time"], values, label=reason, marker=".")
    title = f"kvmpy {series.get('name') or ''} (pid {series.get('pid')})".replace("  ", " ")
    rate_ax.set_title(f"{title}: VM exits per second by reason")
    rate_ax.set_xlabel("time (s)")
    rate_ax.set_ylabel("exits/s")
    if series["rates"]:
        rate_ax.legend(loc="upper right", fontsize="small")
    rate_ax.grid(True, alpha=0.3)

    used = [b for b in range(NBUCKETS) if series["guest_hist"][b] or series["vmm_hist"][b]]
    lo, hi = (min(used), max(used) + 1) if used else (0, 1)
    xs = list(range(lo, hi))
    width = 0.4
    hist_ax.bar([x - width / 2 for x in xs], series["guest_hist"][lo:hi], width, label="in the guest before the exit")
    hist_ax.bar([x + width / 2 for x in xs], series["vmm_hist"][lo:hi], width, label="in the VMM handling it")
    hist_ax.set_xticks(xs, [_bucket_label(b) for b in xs], rotation=45, fontsize="small")
    hist_ax.set_yscale("symlog")
    hist_ax.set_xlabel("time per exit (log2 buckets, lower bound)")
    hist_ax.set_ylabel("exits")
    hist_ax.set_title("latency histograms")
    hist_ax.legend(fontsize="small")
    fig.savefig(str(path), format="png", dpi=100)
    return fig

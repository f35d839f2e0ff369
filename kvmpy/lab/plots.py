"""matplotlib figures for the labs (matplotlib is the optional `plot` extra, imported when drawing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def _figure(size: tuple[float, float] = (10, 5.5)) -> Any:
    try:
        import matplotlib
    except ImportError as e:
        from .common import LabError

        raise LabError("--plot needs matplotlib: pip install 'kvmpy[plot]'") from e
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def bar_chart(path: Path, labels: Sequence[str], values: Mapping[str, Sequence[float]], *, ylabel: str,
              title: str, log: bool = False) -> Path:
    """Grouped bars: one group per label, one bar per series in `values`."""
    fig = _figure()
    ax = fig.subplots()
    width = 0.8 / max(len(values), 1)
    for i, (series, ys) in enumerate(values.items()):
        xs = [x + (i - (len(values) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, [max(y, 1e-3) for y in ys], width, label=series)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.25)  # headroom above the tallest bar for the legend
    ax.legend(loc="upper center", ncol=len(values))
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(str(path), format="png", dpi=100)
    return path


def line_chart(path: Path, xs: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str,
               ylabel: str, title: str, logx: bool = False) -> Path:
    fig = _figure()
    ax = fig.subplots()
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs), [f"{x:g}" for x in xs])  # ticks where the measurements are
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.savefig(str(path), format="png", dpi=100)
    return path


def histograms(path: Path, samples: Mapping[str, Sequence[float]], *, xlabel: str, title: str) -> Path:
    """One histogram panel per series (log-spaced bins), sharing the x axis."""
    import math

    fig = _figure((10, 2.2 * max(len(samples), 1) + 1))
    axes = fig.subplots(len(samples), 1, sharex=True, squeeze=False)[:, 0]
    every = sorted(v for vs in samples.values() for v in vs if v > 0)
    # The axis ends at the 99.5th percentile: a rare scheduling hiccup (ms on a shared host) would squash the rest.
    lo, hi = (every[0], every[min(len(every) - 1, int(0.995 * len(every)))]) if every else (1.0, 10.0)
    step = 0.05  # 20 bins a decade: adjacent bins differ by 12%
    lo_e, hi_e = math.floor(math.log10(lo) / step) * step, math.ceil(math.log10(hi) / step) * step + step
    bins = [10 ** (lo_e + i * step) for i in range(round((hi_e - lo_e) / step) + 1)]
    for ax, (name, vs) in zip(axes, samples.items()):
        ax.hist([v for v in vs if 0 < v <= bins[-1]], bins=bins)
        ax.set_xscale("log")
        ax.set_yscale("symlog")
        ax.set_ylabel("count")
        beyond = sum(1 for v in vs if v > bins[-1])
        ax.set_title(name + (f"  ({beyond} slower, beyond the axis)" if beyond else ""), fontsize="medium", loc="left")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    fig.suptitle(title)
    fig.savefig(str(path), format="png", dpi=100)
    return path

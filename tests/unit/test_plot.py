"""`kvmpy stat --plot`: the series computed from snapshots and the PNG drawn from them."""

from __future__ import annotations

import pytest

from kvmpy.stats.accounting import NBUCKETS
from kvmpy.stats.plot import draw, plot_series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def snapshot(t_s: float, counts: dict[str, int], guest_bucket: int = 14, vmm_bucket: int = 12) -> dict:
    total = sum(counts.values())
    hist_g = [0] * NBUCKETS
    hist_v = [0] * NBUCKETS
    hist_g[guest_bucket] = total
    hist_v[vmm_bucket] = total
    return {"name": "demo", "pid": 1, "monotonic_ns": int(t_s * 1e9),
            "vcpus": [{"reasons": {r: {"count": n} for r, n in counts.items()},
                       "guest_hist": hist_g, "vmm_hist": hist_v}]}


SAMPLES = [
    snapshot(0.0, {"IO": 0, "HLT": 0, "MMIO": 5}),
    snapshot(1.0, {"IO": 100, "HLT": 1, "MMIO": 5}),
    snapshot(2.0, {"IO": 300, "HLT": 3, "MMIO": 5}),
    snapshot(2.5, {"IO": 400, "HLT": 3, "MMIO": 5, "INTR": 2}),
]


def test_series_has_a_rate_per_reason_and_interval():
    s = plot_series(SAMPLES)
    assert s["time"] == [1.0, 2.0, 2.5]
    assert s["rates"] == {"HLT": [1.0, 2.0, 0.0], "INTR": [0.0, 0.0, 4.0], "IO": [100.0, 200.0, 200.0]}
    # MMIO did not change in the window: no series for it.
    assert s["guest_hist"][14] == 410 - 5 and sum(s["vmm_hist"]) == 410 - 5


def test_one_snapshot_is_not_enough():
    with pytest.raises(ValueError, match="two snapshots"):
        plot_series(SAMPLES[:1])


def test_plot_is_a_png_with_one_line_per_exit_reason(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (the 'plot' extra): cannot draw")
    out = tmp_path / "exits.png"
    series = plot_series(SAMPLES)
    fig = draw(series, out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR" and int.from_bytes(data[16:20], "big") == 1000  # 10 in x 100 dpi
    rate_ax, hist_ax = fig.axes
    assert sorted(line.get_label() for line in rate_ax.get_lines()) == ["HLT", "INTR", "IO"]
    for line in rate_ax.get_lines():
        assert list(line.get_ydata()) == series["rates"][line.get_label()]
    assert len(hist_ax.patches) == 2 * 3  # guest and VMM bars over buckets 12..14

"""`kvmpy stat --plot`: the series computed from snapshots and the PNG drawn from them."""

from __future__ import annotations

import pytest

from kvmpy.stats.accounting import NBUCKETS
from kvmpy.stats.plot import draw, idle_note, plot_series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def snapshot(t_s: float, counts: dict[str, int], guest_bucket: int = 14, vmm_bucket: int = 12,
             kvm_exits: int | None = None) -> dict:
    total = sum(counts.values())
    hist_g = [0] * NBUCKETS
    hist_v = [0] * NBUCKETS
    hist_g[guest_bucket] = total
    hist_v[vmm_bucket] = total
    vcpu = {"reasons": {r: {"count": n} for r, n in counts.items()}, "elapsed_ns": int(t_s * 1e9) + 5 * 10**9,
            "guest_hist": hist_g, "vmm_hist": hist_v}
    if kvm_exits is not None:
        vcpu["kvm"] = {"exits": kvm_exits}
    return {"name": "demo", "pid": 1, "monotonic_ns": int(t_s * 1e9), "vcpus": [vcpu]}


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
    # Since the VM started: the last snapshot's histograms, all 410 exits.
    assert s["guest_hist_total"][14] == 410 and s["vmm_hist_total"][12] == 410
    assert (s["window_exits"], s["total_exits"], s["window_s"]) == (405, 410, 2.5)
    assert s["kvm_rates"] is None  # the snapshots carry no KVM counters


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
    # Buckets 12..14, for guest and VMM, since start and in the window.
    heights = [p.get_height() for p in hist_ax.patches]
    assert len(heights) == 4 * 3
    assert heights[:3] == [0, 0, 410] and heights[3:6] == [410, 0, 0]  # since start
    assert heights[6:9] == [0, 0, 405] and heights[9:] == [405, 0, 0]  # the window
    assert not [t for t in rate_ax.texts if "no exit" in t.get_text()]


IDLE = [snapshot(0.0, {"IO": 16_000, "syscall trap": 815}), snapshot(5.0, {"IO": 16_000, "syscall trap": 815})]


def test_an_idle_window_is_named_and_the_histograms_show_the_exits_since_start(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (the 'plot' extra): cannot draw")
    series = plot_series(IDLE)
    assert series["rates"] == {} and series["window_exits"] == 0
    fig = draw(series, tmp_path / "idle.png")
    rate_ax, hist_ax = fig.axes
    (note,) = [t.get_text() for t in rate_ax.texts]
    assert "no exit reached kvmpy in these 5 s" in note and "16,815 exits since the VM started" in note
    assert [line.get_label() for line in rate_ax.get_lines()] == ["every reason"]
    assert list(rate_ax.get_lines()[0].get_xdata()) == [5.0]
    heights = [p.get_height() for p in hist_ax.patches]
    assert sum(heights) == 2 * 16_815  # guest and VMM bars since start; the window's are all 0
    assert "16,815 exits since the VM started" in hist_ax.get_title()
    assert "none in the window" in hist_ax.get_title()


def test_kvms_own_exit_counter_is_drawn_on_a_second_axis(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (the 'plot' extra): cannot draw")
    samples = [snapshot(0.0, {"IO": 10}, kvm_exits=1000), snapshot(1.0, {"IO": 10}, kvm_exits=1400),
               snapshot(3.0, {"IO": 10}, kvm_exits=2400)]
    series = plot_series(samples)
    assert series["kvm_rates"] == [400.0, 500.0]
    assert "KVM handled 1,400 exits itself" in idle_note(series)
    fig = draw(series, tmp_path / "kvm.png")
    kvm_ax = fig.axes[2]
    (line,) = kvm_ax.get_lines()
    assert list(line.get_ydata()) == [400.0, 500.0]
    assert "KVM" in kvm_ax.get_ylabel()


def test_an_exit_caught_before_its_handler_named_it_is_no_series_and_no_negative_rate():
    # At 1 s the snapshot caught a syscall trap still under KVM's reason; by 2 s it had its label.
    samples = [snapshot(0.0, {"syscall trap": 10}), snapshot(1.0, {"syscall trap": 10, "INTERNAL_ERROR": 1}),
               snapshot(2.0, {"syscall trap": 12, "INTERNAL_ERROR": 0})]
    s = plot_series(samples)
    assert s["rates"] == {"syscall trap": [0.0, 2.0]}

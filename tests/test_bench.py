import argparse

import pytest

from rsvheat.apps.bench import _fit_exponent, gmacs, run_case, write_report


def test_a_case_measures_time_and_memory():
    row = run_case("rsvheat_tiny", 64, "train", batch=2, repeats=2, warmup=1, device="cpu", long_seconds=60)
    assert row["median_s"] > 0 and row["repeats"] == 2 and row["activation_mb"] >= 0
    assert row["throughput_img_s"] == pytest.approx(2 / row["median_s"], rel=1e-2)


def test_folded_rsvheat_does_the_official_work_and_no_more():
    assert gmacs("rsvheat_tiny", 224) == pytest.approx(gmacs("official_tiny", 224), rel=1e-9)
    assert gmacs("vit_small", 448) / gmacs("vit_small", 224) > 4  # attention: faster than linear in pixels


def test_growth_exponent_fit():
    assert _fit_exponent([(s, 2.0 * (s * s) ** 1.5) for s in (64, 128, 256)]) == pytest.approx(1.5)
    assert _fit_exponent([(64, 1.0)]) is None


def test_report_states_targets(tmp_path):
    def row(model, size, mode, median, mem):
        return dict(model=model, size=size, mode=mode, batch=1, median_s=median, activation_mb=mem, error="")

    rows = [
        row("rsvheat_base", 1024, "infer", 4.0, 100),
        row("official_base", 1024, "infer", 8.0, 100),
        row("swin_base", 1024, "infer", 3.0, 100),
        row("rsvheat_base", 1024, "train", 20.0, 1000),
        row("swin_base", 1024, "train", 20.0, 4000),
        row("vit_base", 1024, "train", 20.0, 1500),
    ]
    args = argparse.Namespace(device="cpu", argv=["--test"], batch=1, train_batch=2, warmup=1, long_seconds=60.0)
    text = write_report(rows, args, tmp_path, {("rsvheat_base", 1024): 336.7})
    assert "RS-vHeat-B inference at 1024², s: 4.00 (target ≤ 4.5) — MET" in text
    assert "speed-up over official_base at 1024²: 2.00 (target ≥ 1.6) — MET" in text
    assert "speed-up over swin_base at 1024²: 0.75 (target ≥ 1.0) — MISSED" in text
    assert "rsvheat_base / vit_base: 0.67 (target ≤ 0.5) — MISSED" in text
    assert (tmp_path / "efficiency.md").read_text() == text

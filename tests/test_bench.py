import argparse
import subprocess
import sys

import pytest
import torch

from rsvheat.apps.bench import _fit_exponent, gmacs, run_case, write_report


def test_a_case_measures_time_and_memory():
    row = run_case("rsvheat_tiny", 64, "train", batch=2, repeats=2, warmup=1, device="cpu", long_seconds=60)
    assert row["median_s"] > 0 and row["repeats"] == 2 and row["activation_mb"] > 0 and row["memory_growth_mb"] >= 0
    # the memory-saving setting keeps fewer activations: its first two blocks keep only their inputs
    saving = run_case("rsvheat_tiny_gc2", 64, "train", batch=2, repeats=1, warmup=0, device="cpu", long_seconds=60)
    assert 0 < saving["activation_mb"] < row["activation_mb"]
    assert row["throughput_img_s"] == pytest.approx(2 / row["median_s"], rel=1e-2)


def test_compiled_case_compiles_rsvheat_as_one_graph_outside_the_timing(monkeypatch):
    """``--compile``: rsvheat models go through ``torch.compile(fullgraph=True)`` (here with the ``aot_eager``
    backend, to stay fast), and the compiling call is a warm-up even when no warm-up was asked for."""
    calls = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        calls.append(kwargs)
        return real_compile(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    row = run_case("rsvheat_tiny", 32, "infer", 1, repeats=2, warmup=0, device="cpu", long_seconds=0.0, compile=True)
    torch._dynamo.reset()
    assert [call["fullgraph"] for call in calls] == [True]
    assert row["repeats"] == 2  # the compiling run was neither timed nor taken for a slow case's only run


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
    args = argparse.Namespace(
        device="cpu", compile=False, argv=["--test"], batch=1, train_batch=2, warmup=1, long_seconds=60.0
    )
    text = write_report(rows, args, tmp_path, {("rsvheat_base", 1024): 336.7})
    assert "RS-vHeat-B inference at 1024², s: 4.00 (target ≤ 4.5) — MET" in text
    assert "speed-up over official_base at 1024²: 2.00 (target ≥ 1.6) — MET" in text
    assert "speed-up over swin_base at 1024²: 0.75 (target ≥ 1.0) — MISSED" in text
    assert "rsvheat_base / vit_base: 0.67 (target ≤ 0.5) — MISSED" in text
    assert (tmp_path / "efficiency.md").read_text() == text


FAKE_OFFICIAL = '''
import torch
from torch import nn


class vHeat(nn.Module):
    """Stands in for the official vHeat: records its arguments; infer_init() must be called before inference."""

    def __init__(self, depths, dims, post_norm, layer_scale, img_size, infer_mode, drop_path_rate, num_classes=1000):
        super().__init__()
        self.args = dict(depths=depths, dims=dims, post_norm=post_norm, layer_scale=layer_scale, img_size=img_size)
        self.infer_mode, self.folded = infer_mode, False
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(3, num_classes))

    def infer_init(self):
        self.folded = True

    def forward(self, x):
        assert self.infer_mode and self.folded
        return self.classifier(x)
'''


def test_official_source_models_are_built_from_the_user_s_file_and_folded(tmp_path):
    from rsvheat.apps.bench import build

    source = tmp_path / "vHeat.py"
    source.write_text(FAKE_OFFICIAL)
    model = build("vheat_official_base", 96, infer=True, official_source=source)
    assert model.folded and not model.training
    assert model.args == dict(depths=[2, 2, 18, 2], dims=128, post_norm=True, layer_scale=1e-5, img_size=96)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)  # the classifier's Linear removed: pooled features
    row = run_case(
        "vheat_official_tiny", 64, "infer", 1, 1, 0, "cpu", 60, precision="bf16", official_source=str(source)
    )
    assert row["median_s"] > 0 and row["precision"] == "bf16" and row["rel_err_vs_fp32"] >= 0
    with pytest.raises(ValueError, match="--official-source"):
        build("vheat_official_tiny", 64, infer=True)


def test_official_source_with_a_missing_module_names_it(tmp_path, capsys):
    from rsvheat.cli import main

    source = tmp_path / "vHeat.py"
    source.write_text("import einops_not_installed_here\n" + FAKE_OFFICIAL)
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--official-source", str(source), "--out-dir", str(tmp_path / "out")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "imports the module 'einops_not_installed_here', which is not installed" in err
    assert not (tmp_path / "out").exists()  # refused before any case ran
    with pytest.raises(SystemExit):
        main(["bench", "--models", "vheat_official_tiny", "--out-dir", str(tmp_path / "out")])
    assert "pass --official-source" in capsys.readouterr().err


def test_report_has_bf16_rows_ratios_and_issue_f_targets(tmp_path):
    def row(model, size, mode, median, mem, precision="fp32", err=""):
        name = model if precision == "fp32" else f"{model} ({precision})"
        return dict(
            model=name, size=size, mode=mode, precision=precision, batch=1, median_s=median, activation_mb=mem,
            rel_err_vs_fp32=err, error="",
        )  # fmt: skip

    rows = [
        row("rsvheat_base", 1024, "infer", 5.0, 100),
        row("rsvheat_base", 1024, "infer", 2.5, 60, "bf16", 0.004),
        row("vheat_official_base", 1024, "infer", 8.5, 100),
        row("rsvheat_base", 1024, "train", 30.0, 4000),
        row("rsvheat_base_gc8", 1024, "train", 33.0, 1800),
        row("swin_base", 1024, "train", 30.0, 4000),
    ]
    args = argparse.Namespace(
        device="cpu", compile=False, argv=["--test"], batch=1, train_batch=2, warmup=1, long_seconds=60.0
    )
    text = write_report(rows, args, tmp_path, {})
    assert "| rsvheat_base | 1024² | infer | bf16 | 5.000 | 2.500 | 2.00 | 4.00e-03 |" in text
    assert "| rsvheat_base (bf16) | " in text  # its own row in the latency table
    assert "speed-up over the official vHeat-B code at 1024²: 1.70 (target ≥ 1.5) — MET" in text
    assert "RS-vHeat-B inference at 1024², bf16, s: 2.50 (target ≤ 3.5) — MET" in text
    assert "RS-vHeat-B bf16 output at 1024², relative error vs fp32: 0.004 (target ≤ 0.01) — MET" in text
    assert "train activation memory at 1024², rsvheat_base / swin_base: 1.00 (target ≤ 0.8) — MISSED" in text
    assert "train activation memory at 1024², rsvheat_base_gc8 / swin_base: 0.45 (target ≤ 0.5) — MET" in text
    assert "train step at 1024², time of rsvheat_base_gc8 / rsvheat_base: 1.10 (target ≤ 1.15) — MET" in text
    assert "GPU figures are not measured" in text


def test_peak_memory_of_a_child_is_its_own():
    """A case runs in a child of the benchmark; its peak must not include the parent's (Linux's maxrss would)."""
    ballast = bytearray(2 << 30)
    ballast[:: 1 << 12] = b"\1" * len(ballast[:: 1 << 12])  # touch every page: 2 GiB resident in this process
    script = "from rsvheat.apps.bench import peak_rss_mb; print(peak_rss_mb())"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    del ballast
    assert 1 < float(done.stdout) < 1536  # importing torch is ~0.7 GiB; the inherited figure would be > 2 GiB


def test_machine_description_names_the_cpu_and_its_isa(tmp_path, monkeypatch):
    import builtins

    from rsvheat.apps import bench

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 popcnt\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
    assert bench.machine_description("cpu").startswith("AMD EPYC 9B14 (AVX-512-BF16, AVX-512, AVX2), ")
    # a virtual CPU that names no model: its family and model numbers tell it
    cpuinfo.write_text("cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n")
    assert bench.machine_description("cpu").startswith("AMD EPYC family 25 model 1 (AVX2), ")


def test_results_round_trip_as_csv_and_markdown(tmp_path):
    import csv

    from rsvheat.apps.bench import write_results

    rows = [dict(model="a", seconds=1.5), dict(model="b", seconds=2.0)]
    write_results(tmp_path / "out", "case", rows, ["# Case", "", "| model |"])
    with open(tmp_path / "out" / "case.csv", newline="") as f:
        assert [dict(r) for r in csv.DictReader(f)] == [dict(model="a", seconds="1.5"), dict(model="b", seconds="2.0")]
    assert (tmp_path / "out" / "case.md").read_text() == "# Case\n\n| model |\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case.csv", "case.md"]  # no temporaries left

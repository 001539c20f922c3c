"""Progress on long work: bars (tqdm, with ETA) and step headers on stderr when it is a terminal, none when it is not
(logs, pipes, CI) or when ``progress=False`` is passed; each long command's own bar is checked on a fake terminal."""

import io
import sys
import time

import numpy as np
import pytest
import torch

from rsvheat.apps.demo import DEMO_STEPS, Demo
from rsvheat.data.stats import band_stats
from rsvheat.export import export_model
from rsvheat.inference.scene import class_legend, dense_strips, write_dense
from rsvheat.progress import Steps, bar, shown, step_header
from tests.conftest import micro_model
from tests.rasters import ramp, write
from tests.test_scene import identity, scene_of


class Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was written."""

    def isatty(self) -> bool:
        return True


def fake_terminal(monkeypatch) -> Terminal:
    """Make stderr a :class:`Terminal`, from inside the test: pytest puts its own capture back on sys.stderr after
    the fixtures have run."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_progress_is_off_unless_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not shown()
    with bar(range(3), desc="x", unit="it") as b:
        list(b)
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert shown() and not shown(progress=False)


def test_steps_and_step_header(monkeypatch):
    terminal = fake_terminal(monkeypatch)
    with Steps(2, "export m.onnx") as steps:
        steps.next("trace")
        steps.next("check")
    text = terminal.getvalue()
    assert "export m.onnx: 2/2" in text and "check" in text
    step_header(3, 6, "fine-tuning", time.perf_counter() - 61, "[demo]")
    assert "[demo] step 3/6: fine-tuning (0:01:01 elapsed)" in terminal.getvalue()


def test_demo_prints_a_header_before_each_step(monkeypatch, tmp_path):
    terminal = fake_terminal(monkeypatch)
    demo = Demo(tmp_path, tmp_path / "s.tif", "rsvheat_tiny", None, 64, None, None, 1, 1)
    demo.timed("data", lambda: None)
    demo.timed("pre-training", lambda: None)
    assert f"[demo] step 2/{DEMO_STEPS}: pre-training (0:00:00 elapsed)" in terminal.getvalue()
    demo.progress = False
    demo.timed("fine-tuning", lambda: None)
    assert "fine-tuning" not in terminal.getvalue()


def test_statistics_show_a_bar_over_the_images_read(tmp_path, monkeypatch):
    terminal = fake_terminal(monkeypatch)
    monkeypatch.setenv("RSVHEAT_CACHE", str(tmp_path))

    def read(i: int) -> dict:
        return {"optical": np.full((3, 8, 8), i, np.float32)}

    band_stats(read, 5, {"optical": 3}, "first", progress=False)
    assert terminal.getvalue() == ""
    band_stats(read, 5, {"optical": 3}, "second")
    assert "normalisation statistics" in terminal.getvalue() and "5/5" in terminal.getvalue()


def test_cog_conversion_shows_a_bar_weighted_by_pixels(monkeypatch, tmp_path):
    terminal = fake_terminal(monkeypatch)
    path = write(tmp_path / "s.tif", ramp(3, 96, 80, np.uint8))
    targets = [
        (
            tmp_path / "map.tif",
            lambda v: (v[:1] > 0.5).astype(np.uint8),
            1,
            "uint8",
            255,
            None,
            class_legend(["a", "b"]),
        ),
        (tmp_path / "probs.tif", lambda v: v, 3, "float32", -1.0, ["r", "g", "b"], None),
    ]
    with scene_of(path) as scene:
        write_dense(scene, dense_strips(scene, identity, 3, 64, 16, progress=False), targets)
    text = terminal.getvalue()
    if "COG" not in text:
        pytest.skip("GDAL without the COG driver: no conversion")
    # 96 x 80 pixels x (1 + 3) bands; the class map (1 band) is a quarter of the work
    assert "7.68k/30.7k" in text and "30.7k/30.7k" in text
    assert "probs.tif" in text


def test_export_shows_its_steps(monkeypatch, tmp_path):
    terminal = fake_terminal(monkeypatch)
    export_model(micro_model(num_classes=0), tmp_path / "b.pt2", [torch.randn(1, 3, 64, 64)])
    text = terminal.getvalue()
    assert "export b.pt2: 4/4" in text and "reload and check" in text
    terminal.seek(0)
    terminal.truncate()
    export_model(micro_model(num_classes=0), tmp_path / "c.pt2", [torch.randn(1, 3, 64, 64)], progress=False)
    assert terminal.getvalue() == ""

"""``pip install rsvheat`` is the backbone alone (torch, timm, safetensors): it works with every optional package
absent, and a command that needs one names the extra that installs it. The optional packages are hidden from a
subprocess, as if they were not installed."""

import subprocess
import sys
import textwrap

import pytest

from rsvheat.arguments import EXTRA_OF

HIDE = textwrap.dedent(
    """
    import sys
    HIDDEN = set(sys.argv[1].split(","))
    for name in HIDDEN:  # what Python does for a package that is not installed: find_spec None, import fails
        sys.modules[name] = None
    """
)


def _run(code: str, hidden, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(HIDE + textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script), ",".join(hidden)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )


@pytest.mark.smoke
def test_the_backbone_needs_no_extra(tmp_path):
    result = _run(
        """
        import sys, torch, timm, rsvheat
        from rsvheat.models.counting import count

        model = timm.create_model("rsvheat_tiny", num_classes=5).eval()
        x = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            assert model(x).shape == (1, 5)
        features = timm.create_model("rsvheat_tiny", features_only=True, out_indices=(1, 3))
        assert [f.shape[1] for f in features(x)] == [192, 768]
        rsvheat.save_pretrained(model, "saved")
        again = timm.create_model("local-dir:saved", pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(again(x), model(x))
        assert count(model, 64).params_train > 0
        loaded = [m for m, module in sys.modules.items() if m.split(".")[0] in HIDDEN and module is not None]
        assert not loaded, loaded
        print("ok")
        """,
        EXTRA_OF,
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_a_command_names_the_extra_it_needs(tmp_path):
    result = _run(
        """
        from rsvheat.cli import main
        main(["fit", "--help"])
        """,
        ["lightning"],
        tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        """rsvheat fit: error: this needs lightning, from the extra 'train': pip install "rsvheat[train]\""""
    )

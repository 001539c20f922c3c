"""The house rules CI checks: the package keeps its layering (``lint-imports`` checks the contracts of pyproject.toml
``[tool.importlinter]``: lower layers never import higher ones, lazy imports included; no import cycles inside a
package), the code passes ``ruff check`` and ``ruff format --check``, and ``mypy`` finds no type error in the modules
pyproject.toml's ``[tool.mypy]`` checks."""

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")  # the venv's, next to its python
    # --no-cache: no cache folder written into the shared work tree
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_ruff_lint_and_format():
    ruff = Path(sys.executable).with_name("ruff")
    paths = ["src", "tests", "benchmarks", "scripts", "docs/hooks"]
    for args in (["check", "--no-cache", *paths], ["format", "--check", "--no-cache", *paths]):
        result = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr


def test_type_check():
    mypy = Path(sys.executable).with_name("mypy")
    # the cache goes to a temporary folder: nothing written into the shared work tree
    with tempfile.TemporaryDirectory() as cache:
        result = subprocess.run(
            [str(mypy), "--cache-dir", cache], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
    assert result.returncode == 0, result.stdout + result.stderr

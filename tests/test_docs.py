"""The documentation site builds without a warning, and its command table names every command."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rsvheat.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def test_every_command_is_in_the_command_table():
    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = set(subcommands.choices)
    table = (REPO / "docs/command-line.md").read_text().split("\n\n")[1]
    documented = {
        c for row in table.splitlines()[2:] for c in re.findall(r"`(?:rsvheat )?([a-z-]+)`", row.split("|")[1])
    }
    assert documented == commands


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "create_model" in (tmp_path / "api/models/index.html").read_text()  # the API reference was generated
    assert (tmp_path / "results/transfer/index.html").is_file()  # the committed measurements are pages

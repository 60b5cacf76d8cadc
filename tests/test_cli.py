"""The `seqguard` command line itself (each command has its own test module)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import seqguard
from seqguard.cli import main


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"seqguard {seqguard.__version__}\n"
    assert seqguard.__version__ == "0.1.0"


def test_version_flag_from_the_installed_command():
    command = Path(sys.executable).parent / "seqguard"          # the console script pip installed
    if not command.exists():
        pytest.skip(f"no installed `seqguard` command next to {sys.executable}")
    out = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout == "seqguard 0.1.0\n"

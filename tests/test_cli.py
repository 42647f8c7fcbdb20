"""CLI shell: instant help (no heavy imports), every command's help, and error exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skyfall.cli import COMMANDS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skyfall", *args], capture_output=True, text=True, timeout=120
    )


def test_command_modules_do_not_import_heavy_libraries():
    # `skyfall --help` must answer in well under a second: importing every command module (what tyro
    # needs to build the help) must not pull in torch, numpy-heavy stacks or diffusers.
    code = (
        "import sys; import skyfall.cli as c; c._command_types(); "
        "heavy = [m for m in ('torch', 'gsplat', 'diffusers', 'transformers', 'scipy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"heavy modules imported by the CLI: {out.stdout.strip()}"


def test_top_level_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help(name: str):
    out = _run(*name.split(), "--help")
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_unknown_command_is_a_usage_error():
    out = _run("no-such-command")
    assert out.returncode == 2

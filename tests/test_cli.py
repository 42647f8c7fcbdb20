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
        "import sys; import skyfall.cli as c; c.command_union(['train', 'stage1', '--preset', 'demo']); "
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


def _command_names() -> list[str]:
    names = []
    for name, entry in COMMANDS.items():
        names += [f"{name} {sub}" for sub in entry[1]] if isinstance(entry[1], dict) else [name]
    return names


@pytest.mark.parametrize("name", _command_names())
def test_each_command_help(name: str):
    out = _run(*name.split(), "--help")
    assert out.returncode == 0, out.stderr
    # one-command groups (`path orbit`) show the group's usage line
    assert f"usage: skyfall {name}" in out.stdout.lower() or name == "path orbit" and "--radius" in out.stdout


def test_group_without_subcommand_lists_its_subcommands():
    out = _run("train", "--help")
    assert out.returncode == 0 and all(sub in out.stdout for sub in ("stage1", "stage2", "all"))


def _default_of(help_text: str, option: str) -> str:
    import re

    flat = " ".join(help_text.split())
    m = re.search(re.escape(option) + r" [A-Z{].*?\(default: ([^)]*)\)", flat)
    assert m, f"{option} not in the help"
    return m.group(1)


def test_preset_help_shows_the_preset_values():
    paper = _run("train", "stage1", "--help").stdout
    demo = _run("train", "stage1", "--preset", "demo", "--help").stdout
    assert _default_of(paper, "--stage1.steps") == "30000" and _default_of(demo, "--stage1.steps") == "1500"
    assert _default_of(demo, "--stage1.pseudo.estimator") == "ground-truth"
    s2 = _run("train", "stage2", "--preset", "demo", "--help").stdout
    assert (
        _default_of(s2, "--stage2.refiner") == "ideal" and _default_of(s2, "--stage2.episode-steps") == "400"
    )
    # the demo command's own default preset is 'demo'
    assert _default_of(_run("demo", "--help").stdout, "--stage1.steps") == "1500"


def test_user_config_layers_on_the_preset_and_flags_win(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("stage1:\n  steps: 77\n  densify:\n    grad_threshold: 3.0e-4\n")
    out = _run("train", "all", "--preset", "demo", "--config", str(cfg), "--help").stdout
    assert _default_of(out, "--stage1.steps") == "77"
    assert _default_of(out, "--stage1.densify.grad-threshold") == "0.0003"
    assert _default_of(out, "--stage1.resolution") == "2"  # from the preset
    assert _default_of(out, "--stage2.refiner") == "ideal"  # sections absent from the file keep the preset's


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stage1:\n  stepz: 3\n", "unknown key 'stage1.stepz'"),
        ("stage1:\n  densify:\n    grad_treshold: 1.0\n", "unknown key 'stage1.densify.grad_treshold'"),
        ("stage1:\n  steps: many\n", "stage1.steps = 'many' is not a valid int"),
        ("stage1:\n  pseudo:\n    estimator: midas\n", "stage1.pseudo.estimator = 'midas'"),
        ("stage3: {}\n", "unknown key 'stage3'"),
        ("- 1\n- 2\n", "must hold a mapping"),
    ],
)
def test_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, text: str, message: str):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    out = _run("train", "stage1", "--data", "x", "--out", "y", "--config", str(cfg))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and message in lines[0], out.stderr


def test_preset_options_of_other_commands_are_theirs(tmp_path):
    # `synth --preset` names a synthetic-city preset, not a training preset
    out = _run("synth", str(tmp_path / "t"), "--preset", "default", "--help")
    assert out.returncode == 0, out.stderr


def test_unknown_preset_is_a_usage_error():
    out = _run("train", "stage1", "--data", "x", "--out", "y", "--preset", "paper-mars")
    assert out.returncode == 2 and "paper-mars" in out.stderr


def test_path_orbit_writes_a_camera_path(tmp_path):
    import json

    out = _run("path", "orbit", "--radius", "150", "--frames", "12", "--out", str(tmp_path / "o.json"))
    assert out.returncode == 0, out.stderr
    assert len(json.loads((tmp_path / "o.json").read_text())["camera_path"]) == 12


def test_unknown_command_is_a_usage_error():
    out = _run("no-such-command")
    assert out.returncode == 2

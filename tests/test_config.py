"""Presets as YAML data, user config files, strict merging, and the presets shipping in the wheel."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skyfall.config import Stage1Config, Stage2Config, from_dict, load_config, merge, preset_names, to_dict
from skyfall.config.presets import preset_description, presets_dir
from skyfall.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _diff(a: dict, b: dict, prefix: str = "") -> dict:
    """Dotted keys whose values differ between two to_dict() trees."""
    out = {}
    for k in a:
        if isinstance(a[k], dict):
            out.update(_diff(a[k], b[k], f"{prefix}{k}."))
        elif a[k] != b[k]:
            out[f"{prefix}{k}"] = b[k]
    return out


def test_presets_are_the_yaml_files_in_configs():
    assert presets_dir() == REPO / "configs" or (presets_dir() / "demo.yaml").exists()
    assert set(preset_names()) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert preset_names()[:2] == ("paper-jax", "paper-nyc")
    for name in preset_names():
        assert preset_description(name), f"configs/{name}.yaml has no description"


def test_paper_presets_are_the_reference_values():
    jax = load_config("paper-jax")
    assert jax.stage1 == Stage1Config() and jax.stage2 == Stage2Config()
    nyc = load_config("paper-nyc")
    assert _diff(to_dict(Stage1Config()), to_dict(nyc.stage1)) == {
        "densify.grad_threshold": 2e-4,
        "densify.opacity_reset_interval": 4000,
        "pseudo.target_std": 32.0,
    }
    assert _diff(to_dict(Stage2Config()), to_dict(nyc.stage2)) == {
        "curriculum": "nyc_v1",
        "grid_size": 4,
        "lambda_opacity": 10.0,
        "pseudo_weight": 0.0,
    }


def test_cpu_presets_run_with_the_oracles_and_demo_takes_the_gpu_when_there_is_one():
    # tests pin the CPU (tiny); the demo runs wherever the user is, on the GPU when there is one
    assert load_config("tiny").stage1.device == "cpu" and load_config("demo").stage1.device == "auto"
    for name in ("demo", "tiny"):
        cfg = load_config(name)
        assert cfg.stage1.pseudo.estimator == "ground-truth"
        assert cfg.stage1.optim.means_lr_max_steps == cfg.stage1.steps
        assert isinstance(cfg.stage1.densify.grad_threshold, float)
    assert load_config("demo").stage2.refiner == "ideal" and load_config("tiny").stage2.refiner == "identity"


def test_user_file_layers_on_the_preset(tmp_path: Path):
    f = tmp_path / "my.yaml"
    f.write_text("stage1:\n  steps: 10\n  pseudo:\n    model:\n      moge_version: 2\nstage2:\n  fov: 30\n")
    cfg = load_config("demo", f)
    assert cfg.stage1.steps == 10 and cfg.stage1.resolution == 2  # file over preset, preset kept elsewhere
    assert cfg.stage1.pseudo.model.moge_version == 2 and cfg.stage1.pseudo.estimator == "ground-truth"
    assert cfg.stage2.fov == 30.0 and isinstance(cfg.stage2.fov, float) and cfg.stage2.refiner == "ideal"
    assert load_config(None, f).stage1.resolution == 1  # no preset: the dataclass defaults


def test_a_run_config_is_a_valid_config_file(tiny_run: Path, tiny_config):
    cfg = load_config("paper-jax", tiny_run / "config.yml")
    assert cfg.stage1 == tiny_config.stage1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": "10"}, "x.yaml: steps = '10' is not a valid int"),
        ({"lambda_opacity": True}, "lambda_opacity = True is not a valid float"),
        ({"pseudo": {"render_depth": "median"}}, "pseudo.render_depth = 'median' is not a valid choice"),
        ({"pseudo": 3}, "pseudo must be a mapping"),
        ({"densify": {"untill": 5}}, "unknown key 'densify.untill'"),
    ],
)
def test_merge_rejects_unknown_keys_and_wrong_types(data: dict, message: str):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        merge(Stage1Config(), data, where="x.yaml")


def test_from_dict_round_trips_and_fills_new_fields():
    cfg = dataclasses.replace(Stage1Config(), steps=7)
    assert from_dict(Stage1Config, to_dict(cfg)) == cfg
    old = to_dict(cfg)
    del old["pseudo"]["model"]  # a checkpoint written before the field existed
    assert from_dict(Stage1Config, old) == cfg


def test_the_wheel_ships_the_presets(tmp_path: Path):
    """An installed (non-editable) package finds configs/*.yaml as skyfall.configs."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            *map(str, wheels.glob("*.whl")),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import skyfall.config.presets as p, skyfall; "
        "print(skyfall.__file__); print(p.presets_dir()); print(','.join(p.preset_names())); "
        "print(p.load_config('demo').stage1.steps)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    installed, configs, names, steps = out.stdout.split()
    assert installed.startswith(str(target)) and configs.startswith(str(target))
    assert set(names.split(",")) == set(preset_names()) and steps == "1500"

"""First-use guards of the CLI: bad options are one line and exit code 2 with nothing created, long
phases show progress bars, and every printed metric names its protocol.

Subprocess tests (``python -m skyfall ...``) on the session's tiny tile and tiny run; a test that lets
a command write into a run works on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from skyfall.config.priors import FlowEditConfig, SDEditConfig
from skyfall.config.training import Stage2Config
from skyfall.errors import ConfigError

FITTED = "appearance fitted on the left half, scored on the right"
MEAN_WHOLE = "mean embedding, whole image"
DSM_SUMMARY = "median depth seen straight down, unregistered"
REGISTERED = "NCC shift + mean vertical offset registered"


def _run(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "skyfall", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """The single ``skyfall: error:`` line of a failed command (exit code 2, no traceback)."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("skyfall: error: "), out.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def _n_train(tile: Path) -> int:
    return len(json.loads((tile / "transforms_train.json").read_text())["frames"])


def _run_copy(tiny_run: Path, dest: Path, *, tile: Path | None, relative: str | None = None) -> Path:
    """A copy of the tiny run whose config.yml names ``tile`` (None: a folder that does not exist)."""
    shutil.copytree(tiny_run, dest)
    cfg = yaml.safe_load((dest / "config.yml").read_text())
    cfg["data"] = str(tile.resolve()) if tile is not None else str(dest.parent / "no_such_tile")
    cfg["data_relative"] = relative if relative is not None else "../no_such_tile"
    (dest / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


# ------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("value", ["-1", "99", "abc"])
def test_export_embedding_outside_the_run_is_one_line(
    tiny_run: Path, tiny_tile: Path, tmp_path: Path, value: str
):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = _listing(run)
    n = _n_train(tiny_tile)
    line = _one_line_error(
        _run("export", run, f"--embedding={value}"), f"--embedding {value}", f"0..{n - 1}", "'mean'"
    )
    assert "must be 'mean' or an image index" in line
    assert _listing(run) == before


def test_export_embedding_in_range_is_used_and_dsm_refuses_one(tiny_run: Path, tmp_path: Path):
    out = _run("export", tiny_run, "--embedding", "0", "--out", tmp_path / "e.ply")
    assert out.returncode == 0, out.stderr
    assert "embedding=0" in out.stdout and (tmp_path / "e.ply").is_file()
    _one_line_error(
        _run("export", tiny_run, "--format", "dsm", "--embedding", "0", "--out", tmp_path / "d.tif"),
        "--embedding does not apply to --format dsm",
    )
    assert not (tmp_path / "d.tif").exists()


# ------------------------------------------------------------------------------------- synth


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seed", "-3"], "--seed must be an integer >= 0, got -3"),
        (["--rpc-views", "0"], "--rpc-views must be 1..6"),
        (["--rpc-views", "7"], "--rpc-views must be 1..6"),
        (["--rpc-bias-px", "-1"], "--rpc-bias-px must be a finite number >= 0"),
        (["--rpc-bias-px", "nan"], "--rpc-bias-px must be a finite number >= 0"),
        (["--style", "gotham"], "gotham"),
    ],
)
def test_synth_bad_option_creates_nothing(tmp_path: Path, args: list[str], fragment: str):
    out = tmp_path / "deep" / "tile"
    _one_line_error(_run("synth", out, "--preset", "tiny", *args), fragment)
    assert not (tmp_path / "deep").exists()


# ------------------------------------------------------------------------------------ render


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--num-frames", "-1"], "--num-frames must be >= 0"),
        (["--orbit.frames", "0"], "--orbit.frames must be >= 1, got 0"),
        (["--orbit.fps", "0"], "--orbit.fps must be >= 1, got 0"),
        (["--orbit.fov", "180"], "--orbit.fov must be in (0, 180)"),
        (["--embedding", "99"], "--embedding 99: must be 'mean' or an image index 0.."),
    ],
)
def test_render_bad_option_creates_nothing(tiny_run: Path, tmp_path: Path, args: list[str], fragment: str):
    out = tmp_path / "video"
    _one_line_error(_run("render", tiny_run, "--out", out, *args), fragment)
    assert not out.exists()


def test_render_shows_progress_per_frame_and_encoding(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "video"
    res = _run(
        "render", tiny_run, "--out", out, "--orbit.frames", "3", "--orbit.width", "32", "--orbit.height", "32"
    )
    assert res.returncode == 0, res.stderr
    # tqdm bars (stderr) with counts and the elapsed<remaining ETA, for the frames and each mp4
    assert "render: 100%" in res.stderr and "3/3 [" in res.stderr and "<" in res.stderr
    assert "encode orbit.mp4" in res.stderr and "encode orbit_depth.mp4" in res.stderr
    assert sorted(p.name for p in (out / "orbit").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert (out / "orbit.mp4").is_file() and (out / "orbit_depth.mp4").is_file()


# -------------------------------------------------------------------------------------- eval


def test_eval_without_a_tile_fails_loudly_and_writes_nothing(tiny_run: Path, tmp_path: Path):
    run = _run_copy(tiny_run, tmp_path / "run", tile=None)
    before = _listing(run)
    _one_line_error(
        _run("eval", run, "--no-clip", "--no-lpips"),
        "nothing to evaluate in",
        "config.yml [data]: tile folder",
        "not found",
        "--data TILE",
    )
    assert _listing(run) == before and not (run / "eval").exists()


def test_eval_unknown_view_set_is_one_line(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "eval"
    _one_line_error(
        _run("eval", tiny_run, "--out", out, "--sets", "nope", "--no-clip", "--no-lpips"),
        "--sets nope: no such view set",
        "street",
    )
    assert not out.exists()


def test_eval_finds_a_moved_tile_and_labels_every_protocol(tiny_run: Path, tiny_tile: Path, tmp_path: Path):
    # run and tile moved together: the absolute path is stale, the relative one still works
    tile = shutil.copytree(tiny_tile, tmp_path / "moved" / "tile")
    run = _run_copy(tiny_run, tmp_path / "moved" / "run", tile=None, relative="../tile")
    res = _run("eval", run, "--no-clip", "--no-lpips", "--max-views", "1", "--geometry-views", "0")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert f"| {MEAN_WHOLE} (valid pixels) |" in text and f"| {MEAN_WHOLE} |" in text
    assert f"median depth seen straight down, {REGISTERED} |" in text
    assert f"the training summary's psnr_test: {FITTED}" in text
    assert f"'{DSM_SUMMARY}'" in text and "dsm_mae_unregistered_m" in text
    assert Path(json.loads((run / "eval" / "eval.json").read_text())["data"]).resolve() == tile.resolve()
    header = (run / "eval" / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[-1] == "protocol"
    assert REGISTERED in (run / "eval" / "summary.csv").read_text()
    assert FITTED in (run / "eval" / "report.html").read_text()
    # the DSM read-outs show their progress
    assert "DSM (median depth)" in res.stderr and "DSM opaque share" in res.stderr


# ------------------------------------------------------------------------------------ stage 2


def test_stage2_check_names_the_cli_flag():
    if not __import__("torch").cuda.is_available():
        # the default refiner (FLUX FlowEdit) on a CUDA device, on a machine without one
        with pytest.raises(ConfigError, match=r"^--stage2\.flowedit\.device cuda: "):
            Stage2Config().check()
    ok = Stage2Config(refiner="ideal")
    ok.check()  # the unused flowedit section's CUDA device is not checked
    Stage2Config(flowedit=FlowEditConfig(device="cpu")).check()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"episode_steps": 0}, "--stage2.episode-steps must be a positive number of steps, got 0"),
        ({"idu_ratio": 1.5}, "--stage2.idu-ratio must be a probability in [0, 1], got 1.5"),
        ({"grid_width": float("nan")}, "--stage2.grid-width must be a positive width"),
        ({"pseudo_size": 0}, "--stage2.pseudo-size must be a positive size"),
        ({"max_episodes": 0}, "--stage2.max-episodes must be at least 1"),
        ({"curriculum": "85:300,oops"}, "--stage2.curriculum '85:300,oops': curriculum entry 'oops'"),
        ({"curriculum": "95:300"}, "--stage2.curriculum '95:300': "),
        ({"scale": "big"}, "--stage2.scale must be a number > 0 or 'auto', got 'big'"),
        ({"scale": "0"}, "--stage2.scale must be a number > 0 or 'auto'"),
        ({"fov": 0.0}, "--stage2.fov must be in (0, 180)"),
        ({"pseudo_elevation_end": 0.0}, "--stage2.pseudo-elevation-end must be in (0, 90]"),
        ({"refiner": "flowedit", "flowedit": FlowEditConfig(device="tpu")}, "--stage2.flowedit.device must be auto"),
        ({"refiner": "flowedit", "flowedit": FlowEditConfig(device="cpu", n_min=5, n_max=3)}, "--stage2.flowedit.n-min"),
        ({"refiner": "flowedit", "flowedit": FlowEditConfig(device="cpu", T_steps=0)}, "--stage2.flowedit.T-steps"),
        ({"refiner": "flowedit", "flowedit": FlowEditConfig(device="cpu"), "render_size": 100}, "--stage2.render-size must be a multiple of 16"),
        ({"refiner": "sdedit", "sdedit": SDEditConfig(device="cpu", n_steps=40)}, "--stage2.sdedit.n-steps"),
    ],
)  # fmt: skip
def test_stage2_check_rules(changes: dict, message: str):
    cfg = Stage2Config(**{"refiner": "ideal", **changes})
    with pytest.raises(ConfigError) as e:
        cfg.check()
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("preset", ["demo", "tiny"])
def test_stage2_check_accepts_the_cpu_presets(preset: str):
    from skyfall.config import load_config

    load_config(preset).stage2.check()


# -------------------------------------------------------------------------------------- demo


def test_demo_bad_seed_creates_nothing(tmp_path: Path):
    _one_line_error(
        _run("demo", "--out", tmp_path / "demo", "--seed", "-1"), "--seed must be an integer >= 0"
    )
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("again", [("--resume",), ()], ids=["resume", "run-again"])
def test_demo_resume_of_a_finished_run_trains_nothing_and_says_so(
    tiny_run: Path, tiny_tile: Path, tmp_path: Path, again: tuple[str, ...]
):
    out = tmp_path / "demo"
    shutil.copytree(tiny_tile, out / "tile")
    _run_copy(tiny_run, out / "run", tile=out / "tile", relative="../tile")
    summary = (out / "run" / "summary.json").read_bytes()
    ckpts = _listing(out / "run" / "ckpts")
    res = _run("demo", "--out", out, *again, "--preset", "tiny")
    assert res.returncode == 0, res.stderr
    assert ("continuing the run in" in res.stdout) == (not again)
    s1 = json.loads(summary)["stage1"]
    assert f"nothing trained (it took {s1['wall_s']:.0f} s when it ran)" in res.stdout
    assert "Stage 1 steps" not in res.stdout
    assert f"({FITTED}; " in res.stdout and f"dB with the {MEAN_WHOLE})" in res.stdout
    assert f"({DSM_SUMMARY}; " in res.stdout
    assert (out / "run" / "summary.json").read_bytes() == summary
    assert _listing(out / "run" / "ckpts") == ckpts

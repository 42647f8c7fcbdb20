"""Stage 1 trainer: end-to-end tiny run, exact resume after SIGKILL, guards, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import nan_colours_at

from skyfall.gaussians.densify import CollapseError
from skyfall.train.loop import NonFiniteLossError, Trainer
from skyfall.train.stage1 import stage1_phase, train_stage1


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "skyfall", *args]


def test_tiny_run_writes_run_dir_and_learns(tiny_run: Path, tiny_config):
    cfg = tiny_config.stage1
    summary = json.loads((tiny_run / "summary.json").read_text())
    s1 = summary["stage1"]
    assert s1["steps"] == summary["steps"] == cfg.steps
    # The run is deterministic: these are the figures the code produces on the tiny tile (tolerances
    # cover floating-point differences between CPUs, not behaviour changes).
    assert s1["num_gaussians"] == summary["num_gaussians"] == pytest.approx(1575, rel=0.02)
    assert s1["psnr_test"] == pytest.approx(19.963, abs=0.1)  # embedding fitted on the left half
    assert s1["psnr_test_novel_embedding"] == pytest.approx(20.155, abs=0.1)
    assert s1["dsm_mae_m"] == pytest.approx(6.849, abs=0.1)
    assert s1["dsm_completeness"] > 0.999
    # pseudo depth is due every 5 steps in (5, 50): 8 views, all used with the exact prior
    assert (s1["pseudo_used"], s1["pseudo_skipped"], s1["pseudo_would_skip_reference"]) == (8, 0, 0)
    run = tiny_run
    assert (run / "config.yml").exists() and (run / "ckpts" / f"ckpt_{cfg.steps:06d}.pt").exists()
    # keep_checkpoints = 2: only the last two step checkpoints remain
    assert sorted(p.name for p in (run / "ckpts").glob("ckpt_*.pt")) == ["ckpt_000050.pt", "ckpt_000060.pt"]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "l_rgb" in r]
    assert [r["step"] for r in train_rows] == list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
    # The photometric loss falls over the run (averaged over logs: single steps see different views).
    first = sum(r["l_rgb"] for r in train_rows[:3]) / 3
    last = sum(r["l_rgb"] for r in train_rows[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    # evaluations at eval_every (30) and at the end
    assert [r["step"] for r in rows if "psnr_test" in r] == [30, 60]
    ckpt = torch.load(run / "ckpts" / f"ckpt_{cfg.steps:06d}.pt", weights_only=True)
    assert ckpt["step"] == cfg.steps and "filter_3d" in ckpt["model"] and ckpt["appearance"] is not None


def _train_args(tile: Path, out: Path, steps: int) -> list[str]:
    return _cli(
        "train", "stage1", "--data", str(tile), "--out", str(out), "--preset", "tiny", "--no-export",
        "--stage1.steps", str(steps), "--stage1.checkpoint-every", "10", "--stage1.keep-checkpoints", "100",
        "--stage1.densify.opacity-reset-interval", "30",  # the kill lands inside the post-reset cool-down
    )  # fmt: skip


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_tile: Path, tmp_path: Path):
    steps = 120
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(
        _train_args(tiny_tile, tmp_path / "ref", steps), env=env, capture_output=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr.decode()[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_args(tiny_tile, out, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = out / "ckpts" / "ckpt_000050.pt"
    t0 = time.time()
    while not target.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "ckpts" / f"ckpt_{steps:06d}.pt").exists()

    res = subprocess.run(
        _train_args(tiny_tile, out, steps) + ["--resume"], env=env, capture_output=True, timeout=300
    )
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    a = torch.load(tmp_path / "ref" / "ckpts" / f"ckpt_{steps:06d}.pt", weights_only=True)
    b = torch.load(out / "ckpts" / f"ckpt_{steps:06d}.pt", weights_only=True)
    for key, value in a["model"]["params"].items():
        assert torch.equal(value, b["model"]["params"][key]), key
    assert torch.equal(a["model"]["filter_3d"], b["model"]["filter_3d"])
    for key, value in a["appearance"].items():
        assert torch.equal(value, b["appearance"][key]), key

    # metrics.jsonl after the resume equals the uninterrupted run's, line for line (wall time aside):
    # no step logged twice, none missing, the same losses
    def rows(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k != "wall_s"} for ln in lines]

    assert rows(out) == rows(tmp_path / "ref")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_tile: Path, tmp_path: Path, tiny_config):
    with nan_colours_at(35):
        with pytest.raises(NonFiniteLossError, match="step 35"):
            train_stage1(tiny_config.stage1, tiny_tile, tmp_path / "run", progress=False)
    ckpts = sorted((tmp_path / "run" / "ckpts").glob("ckpt_*.pt"))
    assert ckpts and ckpts[-1].name == "ckpt_000030.pt"
    state = torch.load(ckpts[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"]["params"].values())


def test_collapse_guard_stops_the_run(tiny_tile: Path, tmp_path: Path, tiny_config):
    import dataclasses

    cfg = dataclasses.replace(tiny_config.stage1, min_gaussians=10**7)
    # the first densification (step 15) is where the guard looks
    with pytest.raises(CollapseError, match="after densification at step 15, below the floor of 10000000"):
        train_stage1(cfg, tiny_tile, tmp_path / "run", progress=False)


def test_cli_bad_tile_exits_2_with_one_line(tmp_path: Path):
    (tmp_path / "tile").mkdir()
    out = subprocess.run(
        _train_args(tmp_path / "tile", tmp_path / "run", 5), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "transforms_train.json" in lines[0] and "Traceback" not in out.stderr


def test_resume_of_a_folder_without_a_run_is_a_clear_error(tiny_tile: Path, tmp_path: Path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    out = subprocess.run(
        _train_args(tiny_tile, tmp_path / "run", 5) + ["--resume"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "holds no skyfall run (no config.yml)" in out.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


def test_tensorboard_logging_or_a_clear_missing_dependency_error(
    tiny_tile: Path, tmp_path: Path, tiny_config
):
    import dataclasses

    from skyfall.errors import MissingDependencyError

    cfg = dataclasses.replace(tiny_config.stage1, tensorboard=True, steps=10)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pip install tensorboard"):
            train_stage1(cfg, tiny_tile, tmp_path / "run", progress=False)
        return
    train_stage1(cfg, tiny_tile, tmp_path / "run", progress=False)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("render_depth", ["accumulated", "expected"])
def test_pseudo_depth_correlates_the_configured_rendered_depth(
    tiny_tile: Path, tmp_path: Path, render_depth, tiny_config
):
    """A prior equal to the render's own expected depth gives zero loss only with 'expected'."""
    import dataclasses

    from skyfall.priors.depth import DepthPrediction

    cfg = tiny_config.stage1
    cfg = dataclasses.replace(cfg, pseudo=dataclasses.replace(cfg.pseudo, render_depth=render_depth))
    trainer = Trainer(cfg, tiny_tile, tmp_path / "run", progress=False)

    class SelfDepth:
        needs_pose = True

        def __call__(self, images, fov_x_deg, cameras=None):
            with torch.no_grad():
                d = trainer.scene.render(cameras, None, absgrad=False).expected_depths[..., 0]
            return DepthPrediction(depth=d, valid=torch.ones_like(d, dtype=torch.bool))

    trainer._depth_estimator = SelfDepth()
    trainer.init_from_points()
    trainer.appearance = None  # colours do not matter here; keep the render and the prior identical
    with torch.no_grad():  # semi-transparent Gaussians: D = alpha * expected depth differs from it
        trainer.model.params["opacities"].fill_(-0.5)
    schedule = stage1_phase(trainer).pseudo
    loss = trainer.pseudo_loss(cfg.pseudo.start + cfg.pseudo.ramp + 1, schedule, 60.0, 300.0)
    assert loss is not None
    value = float(loss.detach())
    if render_depth == "expected":
        assert value < 1e-4
    else:
        assert value > 1e-3


def test_demo_command_end_to_end_on_an_existing_tile(tiny_tile: Path, tmp_path: Path):
    """`skyfall demo --out DIR` reuses DIR/tile, trains, exports and reports; summary.json in DIR/run."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(tiny_tile, out / "tile")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        _cli("demo", "--out", str(out), "--stage1.steps", "4"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "using the existing synthetic tile" in proc.stdout
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["num_gaussians"] > 0
    s1 = summary["stage1"]
    assert (
        0.0 < s1["dsm_completeness"] <= 1.0 and s1["dsm_mae_m"] > 0.0 and s1["dsm_mae_expected_depth_m"] > 0.0
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("[demo] held-out"))
    assert f"PSNR {s1['psnr_test']:.2f} dB" in line and f"DSM MAE {s1['dsm_mae_m']:.2f} m" in line
    ply = out / "run" / "ply" / "export.ply"
    assert ply.exists() and ply.stat().st_size > 1000


def test_a_prior_that_cannot_load_stops_the_run_before_training(tiny_tile: Path, tmp_path: Path):
    """A real tile with the tiny preset's 'ground-truth' depth: one line at start, nothing trained."""
    import shutil

    tile = tmp_path / "real_tile"
    shutil.copytree(tiny_tile, tile)
    (tile / "synth.json").unlink()  # no longer a synthetic tile: its exact depth is unknown
    out = subprocess.run(_train_args(tile, tmp_path / "run", 60), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "'ground-truth' depth estimator needs a synthetic tile" in lines[0]
    assert "--stage1.pseudo.estimator moge|depth-anything" in lines[0]
    assert not list((tmp_path / "run" / "ckpts").glob("ckpt_*.pt"))
    assert "stage1:" not in out.stdout  # no progress bar was started


def test_real_preset_needs_no_download_and_no_synthetic_truth(tiny_tile: Path, tmp_path: Path):
    """`--preset real` trains a tile that is not synthetic, with no model weights anywhere."""
    import shutil

    tile = tmp_path / "real_tile"
    shutil.copytree(tiny_tile, tile)
    (tile / "synth.json").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["train", "stage1", "--data", str(tile), "--out", str(tmp_path / "run"), "--preset", "real"]
    out = subprocess.run(
        _cli(*args, "--stage1.steps", "20", "--stage1.eval-every", "20", "--stage1.multiview.start", "10", "--stage1.log-every", "1"),
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    s1 = json.loads((tmp_path / "run" / "summary.json").read_text())["stage1"]
    from skyfall.data.tile import load_tile
    from skyfall.gaussians.init import height_field_points

    pts = load_tile(tile).points
    grid = len(height_field_points(pts, torch.zeros(len(pts), 3, dtype=torch.uint8), 2.0)[0])
    assert grid > len(pts)  # the height-field start
    assert (
        s1["steps"] == 20 and s1["pseudo_used"] == 0 and s1["num_gaussians"] == len(pts) + grid
    )  # no densification
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in logged if "loss" in r}
    # No multi-view term (it pulled the dense start's alleys back to roof height): from the step it
    # would join (10), the loss is still the photometric term plus the small opacity term.
    rest = {k: by_step[k]["loss"] - by_step[k]["l_rgb"] for k in (8, 9, 10, 11)}
    assert max(rest.values()) - min(rest.values()) < 0.01


def test_a_crop_is_the_same_camera_with_a_moved_principal_point(tiny_tile: Path, tmp_path: Path, tiny_config):
    """Random crops (``--stage1.crop``) render exactly the matching window of the whole view."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config.stage1, crop=40)
    tr = Trainer(cfg, tiny_tile, tmp_path / "run", progress=False)
    tr.init_from_points()
    full_cams = tr.cameras
    torch.manual_seed(3)
    seen = set()
    for _ in range(4):
        v = tr.satellite_view()
        j = int(v.embedding) if v.embedding is not None else 0
        assert v.camera.width == 40 and v.camera.height == 40 and v.image.shape == (3, 40, 40)
        kc = v.camera.Ks.reshape(-1, 3, 3)[0]
        dx = float(full_cams.Ks[j][0, 2] - kc[0, 2])
        dy = float(full_cams.Ks[j][1, 2] - kc[1, 2])
        x0, y0 = round(dx), round(dy)
        assert (dx, dy) == (x0, y0) and 0 <= x0 <= full_cams.width - 40 and 0 <= y0 <= full_cams.height - 40
        torch.testing.assert_close(v.image, tr.images[j][:, y0 : y0 + 40, x0 : x0 + 40])
        whole = tr.scene.render(full_cams[j], j, absgrad=False).colors[0]
        crop = tr.scene.render(v.camera, j, absgrad=False).colors[0]
        torch.testing.assert_close(crop, whole[y0 : y0 + 40, x0 : x0 + 40], atol=2e-5, rtol=0)
        seen.add((x0, y0))
    assert len(seen) > 1  # the window moves


def test_opacity_regulariser_ramp(tiny_config):
    """lambda_opacity_end ramps the entropy weight linearly from opacity_ramp_start to the last step."""
    import dataclasses

    from skyfall.train.stage1 import opacity_schedule

    base = dataclasses.replace(tiny_config.stage1, steps=1000, lambda_opacity=0.1)
    assert opacity_schedule(base) == 0.1  # constant, as the reference
    w = opacity_schedule(dataclasses.replace(base, lambda_opacity_end=2.1, opacity_ramp_start=600))
    assert [round(w(s), 6) for s in (0, 600, 800, 1000, 1200)] == [0.1, 0.1, 1.1, 2.1, 2.1]


def test_initial_scale_cap_never_goes_below_the_3d_filter(tiny_tile: Path, tmp_path: Path, tiny_config):
    """A cap smaller than the Mip-Splatting filter would start every Gaussian transparent: the floor
    is each point's own filter size (the tiny tile's pixels are ~10 m at half resolution)."""
    import dataclasses

    from skyfall.gaussians.init import knn_mean_sq_dist

    for cap in (0.01, 1e6):
        cfg = dataclasses.replace(tiny_config.stage1, init_max_scale=cap)
        tr = Trainer(cfg, tiny_tile, tmp_path / f"run{cap}", progress=False)
        tr.init_from_points()
        s = tr.model.params["scales"].detach().exp()[:, 0].double()
        knn = torch.from_numpy(knn_mean_sq_dist(tr.tile.points.double().numpy())).clamp_min(1e-7).sqrt()
        want = torch.minimum(knn, tr.model.filter_3d.double().clamp_min(cap)) if cap < 1 else knn
        torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-6)
    assert float(tr.model.filter_3d.min()) > 1.0  # the floor did bind for cap 0.01


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--stage1.keep-checkpoints", "0", "--stage1.keep-checkpoints must be at least 1"),
        ("--stage1.checkpoint-every", "0", "--stage1.checkpoint-every must be a positive number of steps"),
        ("--stage1.eval-every", "0", "--stage1.eval-every must be a positive number of steps"),
        ("--stage1.optim.means-lr-init", "-1.0", "--stage1.optim.means-lr-init must be a learning rate >= 0"),
        ("--stage1.device", "tpu", "--stage1.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_options_no_run_could_use_stop_before_anything_is_written(
    tiny_tile: Path, tmp_path: Path, option: str, value: str, says: str
):
    run = tmp_path / "run"
    out = subprocess.run(
        _cli("train", "stage1", "--data", str(tiny_tile), "--out", str(run), "--preset", "tiny", option, value),
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-1500:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0]
    assert not run.exists() or not any(run.iterdir())


def test_multiview_term_reaches_the_geometry_from_its_start_on_satellite_views(
    tiny_tile: Path, tiny_config, tmp_path
):
    import dataclasses

    from skyfall.config.training import MultiViewConfig

    mv = MultiViewConfig(weight=0.5, start=5, sources=2, min_std=0.0)
    cfg = dataclasses.replace(tiny_config.stage1, multiview=mv)
    tr = Trainer(cfg, tiny_tile, tmp_path / "run", progress=False)
    tr.init_from_points()
    view = tr.satellite_view()
    out = tr.scene.render(view.camera, view.embedding)
    assert tr.multiview_loss(4, view, out) is None  # before its start
    assert tr.multiview_loss(5, dataclasses.replace(view, index=None), out) is None  # not a satellite view
    loss = tr.multiview_loss(5, view, out)
    assert loss is not None and 0.0 < float(loss.detach()) <= 0.5 * 2
    assert all(len(s) == 2 and i not in s for i, s in enumerate(tr.mv_sources))
    loss.backward()
    assert float(tr.model.params["means"].grad.abs().sum()) > 0


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("patch", 6, "--stage1.multiview.patch must be odd"),
        ("weight", -0.1, "--stage1.multiview.weight must be >= 0"),
        ("sources", 0, "--stage1.multiview.sources must be at least one other view"),
    ],
)
def test_multiview_options_no_run_could_use(tiny_config, field: str, value: float, says: str):
    import dataclasses

    from skyfall.errors import ConfigError

    mv = dataclasses.replace(tiny_config.stage1.multiview, **{field: value})
    with pytest.raises(ConfigError, match=says):
        dataclasses.replace(tiny_config.stage1, multiview=mv).check()

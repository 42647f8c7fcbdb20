"""`skyfall eval` end to end on a tiny Stage 1 run: per-view/set/band metrics, geometry, outputs, CLI errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from skyfall.eval.runner import SATELLITE_BAND, EvalOptions, band_label, evaluate_run, load_scene


def test_band_labels():
    edges = (0.0, 10.0, 50.0, 350.0)
    assert band_label(1.7, edges) == "0-10m"
    assert band_label(10.0, edges) == "10-50m"
    assert band_label(298.9, edges) == "50-350m"
    assert band_label(350.0, edges) == band_label(7e5, edges) == ">=350m"  # the ladder's top rung


def test_load_scene_renders_like_the_trainer(tiny_run: Path, tiny_tile: Path):
    from skyfall.data.tile import load_tile
    from skyfall.storage.checkpoints import latest_checkpoint

    scene, st = load_scene(latest_checkpoint(tiny_run / "ckpts"))
    assert st["stage"] == "stage1" and scene.appearance is not None
    cam = load_tile(tiny_tile).test.cameras[0]
    out = scene.render(cam, scene.novel_embedding("mean"), absgrad=False)
    assert out.alphas.max() > 0.5  # the rebuilt scene covers the held-out view


def test_eval_writes_reports_with_tiny_encoders(tiny_run: Path, tiny_tile: Path, tmp_path: Path, tiny_clip):
    from skyfall.eval.distribution import ClipEmbedder

    model = tiny_clip(num_hidden_layers=1, projection_dim=8)
    embedders = {
        "clip_fid": ClipEmbedder.from_model(model, "clip_fid"),
        "cmmd": ClipEmbedder.from_model(model, "cmmd"),
    }
    out = tmp_path / "eval"
    opts = EvalOptions(run=tiny_run, out=out, embedders=embedders, lpips_backbone=tmp_path / "none.pth",
                       geometry_views=2)  # fmt: skip
    doc = evaluate_run(opts, progress=False)
    for name in ("eval.json", "summary.csv", "views.csv", "report.html"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("grid_") for p in out.iterdir())
    ck = doc["checkpoints"][0]
    n_gt = len(json.loads((tiny_tile / "synth.json").read_text())["gt_views"])
    assert set(ck["by_set"]) == {"sat_test"} | {
        f"orbit_e{e}_r{r}" for e, r in ((85, 300), (75, 275), (65, 275), (55, 250), (45, 250))
    } | {"street"}
    assert len(ck["by_set"]) == n_gt + 1
    # Street views (eye 1.7 m) land in the lowest band, the 85 deg orbit (299 m) in 250-300 m.
    assert ck["by_set"]["street"]["altitude_m"] == pytest.approx(1.7, abs=1e-6)
    assert "0-10m" in ck["by_band"] and "250-300m" in ck["by_band"] and SATELLITE_BAND in ck["by_band"]
    for g in ck["by_set"].values():
        assert -1 <= g["ssim"] <= 1 and g["cmmd"] >= -1e-9 and "clip_fid" in g
    # The evaluation agrees with the trainer's summary where both measure the same thing (held-out
    # satellite views with the mean embedding; the unregistered nadir DSM), and its 45-degree orbit
    # PSNR is the tiny run's (deterministic; the tolerance covers other CPUs).
    s1 = json.loads((tiny_run / "summary.json").read_text())["stage1"]
    assert ck["by_set"]["sat_test"]["psnr"] == pytest.approx(s1["psnr_test_novel_embedding"], abs=1e-6)
    assert ck["geometry"]["nadir"]["dsm_mae_unregistered_m"] == pytest.approx(s1["dsm_mae_m"], abs=1e-6)
    assert ck["by_set"]["orbit_e45_r250"]["psnr"] == pytest.approx(15.726, abs=0.1)
    # street level is far outside what satellite views constrain: much worse than the orbits
    assert ck["by_set"]["street"]["psnr"] < ck["by_set"]["orbit_e45_r250"]["psnr"] - 3
    assert "lpips" in doc["unavailable"] and "none.pth" in doc["unavailable"]["lpips"]
    assert set(ck["geometry"]) == {"nadir", "nadir_expected", "views"}
    # the blended (expected-depth) read-out and the opaque share agree with the trainer's summary
    assert ck["geometry"]["nadir_expected"]["dsm_mae_unregistered_m"] == pytest.approx(
        s1["dsm_mae_expected_depth_m"], abs=1e-6
    )
    assert ck["geometry"]["nadir"]["opaque_weight_share"] == pytest.approx(
        s1["opaque_weight_share"], abs=1e-9
    )
    assert 0.0 < s1["opaque_weight_share"] < 1.0
    assert (
        np.isfinite(ck["geometry"]["nadir"]["dsm_mae_m"])
        and 0 < ck["geometry"]["nadir"]["dsm_completeness"] <= 1
    )
    with open(out / "views.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(g["n_views"] for g in ck["by_set"].values())
    saved = json.loads((out / "eval.json").read_text())
    assert saved["checkpoints"][0]["by_band"].keys() == ck["by_band"].keys()
    assert "PSNR per altitude band" in (out / "report.html").read_text()


def test_cli_eval_and_errors(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from skyfall.cli import entrypoint

    out = tmp_path / "cli_eval"
    entrypoint(["eval", str(tiny_run), "--out", str(out), "--sets", "street", "--no-satellite",
                "--no-geometry", "--no-clip", "--no-lpips"])  # fmt: skip
    text = capsys.readouterr().out
    assert "| set | street |" in text
    doc = json.loads((out / "eval.json").read_text())
    assert list(doc["checkpoints"][0]["by_set"]) == ["street"]
    with pytest.raises(SystemExit) as e:
        entrypoint(["eval", str(tmp_path / "no_run")])
    assert e.value.code == 2
    assert "no_run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        entrypoint(["eval", str(tiny_run), "--ckpt", str(tmp_path / "missing.pt")])
    assert e.value.code == 2

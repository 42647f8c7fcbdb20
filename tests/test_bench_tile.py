"""scripts/bench_tile.py: the reduced CPU run end to end, and the projection formula."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_tile.py"


def _module():  # noqa: ANN202 - scripts/ is not a package
    spec = importlib.util.spec_from_file_location("bench_tile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite_pos(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _expected_projection(phases: dict, tile: dict) -> dict:
    """The projection formula written out independently of the script."""
    s1, s2, dep = phases["stage1"], phases["stage2"], phases["depth"]
    times = [1 / s1["its"]] + ([1 / s1["final"]["its"]] if "its" in s1.get("final", {}) else [])
    stage1_s = tile["stage1_steps"] * sum(times) / len(times)
    out = {}
    for mode, r in phases["refiner"].items():
        if r["status"] != "ok":
            continue
        stage2_s = tile["episodes"] * (
            tile["refinements_per_episode"] * r["seconds"] + tile["episode_steps"] / s2["its"]
        )
        peaks = [p["peak_mem_mb"] for p in (s1, s2, r, dep) if p["status"] == "ok"]
        out[mode] = {
            "stage1_s": stage1_s,
            "stage2_s": stage2_s,
            "total_s": stage1_s + stage2_s,
            "peak": max(peaks),
        }
    return out


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, dict]:
    tmp = tmp_path_factory.mktemp("bench_tile")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--reduced", "--device", "cpu", "--budget-s", "80",
         "--refiner-modes", "gpu,fp8", "--json", str(tmp / "bench.json")],
        capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return doc, out.stdout, json.loads((tmp / "bench.json").read_text())


def test_reduced_run_reports_every_phase(reduced_run: tuple[dict, str, dict]) -> None:
    doc, _, from_file = reduced_run
    assert doc == from_file
    assert doc["reduced"] is True and doc["device"] == "cpu"
    ph = doc["phases"]
    assert set(ph) == {"stage1", "stage1_2048", "stage2", "refiner", "depth"}
    assert set(ph["refiner"]) == {"gpu", "fp8"}
    rows = [ph["stage1"], ph["stage1_2048"], ph["stage2"], ph["depth"], *ph["refiner"].values()]
    for r in rows:
        if r["status"] == "ok":
            assert _finite_pos(r.get("its", r.get("seconds"))), r
            assert _finite_pos(r["peak_mem_mb"]), r
        else:  # a phase that did not measure says why
            assert isinstance(r.get("error"), str) and r["error"], r
    # On this CPU every phase but fp8 (torchao may be absent) must actually measure.
    for r in (ph["stage1"], ph["stage1_2048"], ph["stage2"], ph["depth"], ph["refiner"]["gpu"]):
        assert r["status"] == "ok", r
    s1, s2 = ph["stage1"], ph["stage2"]
    assert s1["steps"] >= 1 and s1["window"][0] == 1001 + 2  # after 2 warm-up steps from step 1000
    assert s1["gaussians_start"] > 0 and s1["view_px"] == 64
    assert _finite_pos(s1["final"]["its"]) and s1["final"]["gaussians_start"] == 2000
    assert s1["final"]["window"][0] > 21_000  # late Stage 1: after densification
    assert ph["stage1_2048"]["view_px"] == 4 * s1["view_px"]
    assert s2["refined_views"] == 108 and s2["gaussians_start"] == 2000 and s2["view_px"] == 64
    assert _finite_pos(ph["depth"]["seconds"]) and _finite_pos(ph["refiner"]["gpu"]["seconds"])


def test_reduced_projection_is_the_formula(reduced_run: tuple[dict, str, dict]) -> None:
    doc, _, _ = reduced_run
    proj = doc["projection"]
    tile = proj["config"]
    assert tile == {
        "stage1_steps": 30_000,
        "episodes": 5,
        "refinements_per_episode": 108,
        "episode_steps": 10_000,
    }
    expected = _expected_projection(doc["phases"], tile)
    assert set(proj["modes"]) == set(expected) and "gpu" in expected
    assert proj["stage1_s"] == pytest.approx(expected["gpu"]["stage1_s"], rel=1e-9)
    for mode, e in expected.items():
        m = proj["modes"][mode]
        assert m["stage2_s"] == pytest.approx(e["stage2_s"], rel=1e-9)
        assert m["total_s"] == pytest.approx(e["total_s"], rel=1e-9)
        assert m["peak_sequential_mb"] == pytest.approx(e["peak"])
        assert m["peak_kept_loaded_mb"] is None  # needs CUDA resident figures
    assert proj["mode"] == "gpu" and proj["total_s"] == proj["modes"]["gpu"]["total_s"]


def test_reduced_run_prints_the_table(reduced_run: tuple[dict, str, dict]) -> None:
    doc, stdout, _ = reduced_run
    for text in ("| phase | measured |", "| stage1 |", "| stage2 |", "| refiner gpu |", "| depth |",
                 "Projected JAX-configuration tile", "| reference (RTX A6000 48 GB) |", "REDUCED"):  # fmt: skip
        assert text in stdout, text
    assert stdout.strip().splitlines()[-1].startswith("{")


def test_projection_with_resident_memory_and_failures() -> None:
    bt = _module()
    ok = {"status": "ok"}
    phases = {
        "stage1": {**ok, "its": 25.0, "final": {"its": 10.0}, "peak_mem_mb": 8000.0},
        "stage2": {**ok, "its": 20.0, "peak_mem_mb": 12000.0, "resident_mb": 5000.0},
        "depth": {**ok, "seconds": 0.013, "peak_mem_mb": 1500.0},
        "refiner": {
            "gpu": {**ok, "seconds": 3.0, "peak_mem_mb": 25000.0, "resident_mb": 23000.0},
            "fp8": {"status": "skipped", "error": "torchao not installed"},
            "cpu-offload": {**ok, "seconds": 5.0, "peak_mem_mb": 25000.0, "resident_mb": 100.0},
        },
    }
    p = bt.project(phases)
    t1 = (1 / 25 + 1 / 10) / 2
    assert p["stage1_s"] == pytest.approx(30_000 * t1)
    gpu = p["modes"]["gpu"]
    assert gpu["stage2_s"] == pytest.approx(5 * (108 * 3.0 + 10_000 / 20))
    assert gpu["total_s"] == pytest.approx(30_000 * t1 + 5 * (108 * 3.0 + 500))
    assert gpu["peak_sequential_mb"] == 25000.0
    assert gpu["peak_kept_loaded_mb"] == max(8000.0, 25000.0 + 5000.0, 23000.0 + 12000.0)
    off = p["modes"]["cpu-offload"]
    assert off["peak_kept_loaded_mb"] == max(8000.0, 25000.0 + 5000.0, 100.0 + 12000.0)
    assert "fp8" not in p["modes"] and p["mode"] == "gpu"
    # Stage 2 failed: no tile time, but the per-episode refinement cost is still there.
    broken = {**phases, "stage2": {"status": "timeout", "error": "killed"}}
    q = bt.project(broken)
    assert q["modes"]["gpu"]["total_s"] is None and q["modes"]["gpu"]["refine_per_episode_s"] == 324.0
    assert (
        q["modes"]["gpu"]["peak_sequential_mb"] == 25000.0
        and q["modes"]["gpu"]["peak_kept_loaded_mb"] is None
    )


def test_jax_tile_constants_match_the_paper_jax_preset() -> None:
    from skyfall.config.presets import load_config
    from skyfall.config.training import parse_curriculum

    bt = _module()
    cfg = load_config("paper-jax")
    s2 = cfg.stage2
    assert bt.JAX_TILE == {
        "stage1_steps": cfg.stage1.steps,
        "episodes": len(parse_curriculum(s2.curriculum)[1]),
        "refinements_per_episode": s2.grid_size**2 * s2.n_azimuths * s2.samples_per_view,
        "episode_steps": s2.episode_steps,
    }
    assert s2.lambda_depth == 0  # no depth prediction per refined image, as the projection assumes

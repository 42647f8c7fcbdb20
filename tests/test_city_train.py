"""`skyfall city train`: tiles as Ray tasks on a local Ray, a tile killed mid-run retried and resumed,
finished tiles skipped, the refiner pool serving every tile, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skyfall.city.folders import CityFolder
from skyfall.city.train import RefinerService, tile_attempts, tile_done

ray = pytest.importorskip("ray", reason='city training needs ray (pip install "skyfall[city]")')

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _skyfall(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skyfall", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 2x2 city of 64 m cores with 8 m margins, the `tiny` preset's tiles."""
    from skyfall.city.synth import write_synthetic_city

    root = tmp_path_factory.mktemp("city") / "city"
    write_synthetic_city(root, 2, 2, tile_size_m=64, overlap_m=8, preset="tiny", progress=False)
    return root


def _ckpt_params(run: Path) -> dict[str, torch.Tensor]:
    from skyfall.storage.checkpoints import load_latest_checkpoint

    _, st = load_latest_checkpoint(run / "ckpts")
    return st["model"]["params"]


@pytest.fixture(scope="module")
def trained_city(
    tiny_city: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess, int]:
    """`city train` on a local Ray with 2 workers; one tile's worker is SIGKILLed after its first
    Stage 1 checkpoint. Returns the city, the finished command and the killed worker's PID."""
    city = tmp_path_factory.mktemp("trained") / "city"
    shutil.copytree(tiny_city, city)
    folder = CityFolder(city)
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyfall", "city", "train", str(city), "--preset", "tiny", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )  # fmt: skip
    victim = folder.run("r000c000")
    pid = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        starts = tile_attempts(folder, "r000c000")
        if starts and (victim / "ckpts" / "ckpt_000010.pt").exists():
            pid = int(starts[0]["pid"])
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    assert pid is not None, f"the tile's first checkpoint never appeared:\n{out}"
    return city, subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), pid


def test_city_trains_every_tile_and_retries_the_killed_one(trained_city) -> None:
    city, done, pid = trained_city
    assert done.returncode == 0, done.stdout
    folder = CityFolder(city)
    names = [c.name for c in folder.manifest().cells]
    for name in names:
        rec = tile_done(folder, name, ("stage1", "stage2"))
        assert rec is not None, f"{name} has no done.json:\n{done.stdout}"
        assert rec["stage1"]["steps"] == 60 and rec["stage2_episodes"] == 2
        assert (folder.run(name) / "ply" / "stage2_raw.ply").is_file()
    starts = tile_attempts(folder, "r000c000")
    assert len(starts) == 2, starts
    assert starts[0]["pid"] == pid and starts[1]["pid"] != pid
    # the retried task continued the run from its checkpoints instead of starting again
    assert starts[1]["resume"] is True and starts[1]["from_step"] >= 10
    assert tile_done(folder, "r000c000", ("stage1", "stage2"))["attempts"] == 2
    assert all(len(tile_attempts(folder, n)) == 1 for n in names if n != "r000c000")
    summary = json.loads((city / "city_train.json").read_text())
    assert sorted(summary["tiles"]) == names and not summary["failed"]
    # one refiner actor served the Stage 2 refinements of all four tiles: 2 episodes x 2x2 targets x
    # 2 azimuths x 2 samples per tile (the tiny preset)
    assert [r["calls"] for r in summary["refiners"]] == [4 * 2 * 4 * 2 * 2]
    assert "retried: r000c000 (2 attempts)" in done.stdout


def test_killed_tile_resumes_to_the_uninterrupted_result(trained_city, tmp_path: Path) -> None:
    """The killed tile, resumed by Ray's retry, ends bit-identical to the same tile trained without
    interruption (same process layout: one tile task, one thread)."""
    city, _, _ = trained_city
    fresh = tmp_path / "city"
    shutil.copytree(city, fresh, ignore=shutil.ignore_patterns("runs", "tasks", "city_train.*"))
    r = _skyfall("city", "train", str(fresh), "--preset", "tiny", "--workers", "1", "--cells", "r000c000")
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = _ckpt_params(CityFolder(city).run("r000c000")), _ckpt_params(CityFolder(fresh).run("r000c000"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_running_again_skips_finished_tiles_without_starting_ray(trained_city) -> None:
    city, _, _ = trained_city
    t0 = time.perf_counter()
    r = _skyfall("city", "train", str(city))  # settings from CITY/city_train.yml
    assert r.returncode == 0, r.stdout + r.stderr
    assert "settings from" in r.stdout and "city_train.yml" in r.stdout
    assert "4 tiles already trained (stage1, stage2); nothing to do" in r.stdout
    assert all(len(tile_attempts(CityFolder(city), c.name)) <= 2 for c in CityFolder(city).manifest().cells)
    assert time.perf_counter() - t0 < 60


def test_changed_settings_are_refused_naming_the_option(trained_city) -> None:
    city, _, _ = trained_city
    before = (city / "city_train.yml").read_text()
    r = _skyfall("city", "train", str(city), "--preset", "tiny", "--stage1.seed", "7")
    assert r.returncode == 2
    assert "--stage1.seed is 7 here but 0 in" in r.stderr and "city_train.yml" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert (city / "city_train.yml").read_text() == before


def test_missing_tile_and_unknown_cell_are_one_line_errors(tiny_city: Path, tmp_path: Path) -> None:
    city = tmp_path / "city"
    shutil.copytree(tiny_city, city)
    r = _skyfall("city", "train", str(city), "--preset", "tiny", "--cells", "r009c009")
    assert r.returncode == 2 and "--cells: r009c009 not in" in r.stderr and r.stderr.count("\n") == 1
    shutil.rmtree(CityFolder(city).tile("r001c000"))
    r = _skyfall("city", "train", str(city), "--preset", "tiny")
    assert r.returncode == 2
    assert "the tile of cell r001c000 is missing" in r.stderr and r.stderr.count("\n") == 1
    assert not (city / "runs").exists()
    r = _skyfall("city", "train", str(tmp_path / "nowhere"), "--preset", "tiny")
    assert r.returncode == 2 and "city.json" in r.stderr and "file not found" in r.stderr


def test_refiner_service_builds_oracles_per_tile_and_models_once(tiny_city: Path) -> None:
    from skyfall.config import load_config
    from skyfall.config.presets import to_dict
    from skyfall.data.tile import load_tile
    from skyfall.synth.oracles import IdealRefiner

    folder = CityFolder(tiny_city)
    cfg2 = load_config("tiny").stage2
    cfg2.refiner = "ideal"
    service = RefinerService(to_dict(cfg2))
    outs = {}
    for name in ("r000c000", "r001c001"):
        cam = load_tile(folder.tile(name)).train.cameras[[0]]
        img = torch.zeros(1, 3, cam.height, cam.width)
        outs[name] = service.refine(str(folder.tile(name)), img, [0], cam, None)
        want = IdealRefiner(folder.tile(name)).refine(img, seeds=[0], cameras=cam)
        assert torch.equal(outs[name], want)
    assert not torch.equal(outs["r000c000"], outs["r001c001"])  # two windows of the city, two tiles
    assert len(service._tiles) == 2 and service._shared is None
    cfg2.refiner = "identity"
    shared = RefinerService(to_dict(cfg2))
    x = torch.rand(1, 3, 8, 8)
    for name in ("r000c000", "r001c001"):
        assert torch.equal(shared.refine(str(folder.tile(name)), x, [1], None, None), x)
    assert shared._shared is not None and not shared._tiles and shared.stats()["calls"] == 2


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from skyfall.city import train
    from skyfall.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "skyfall\[city\]"'):
        train.require_ray()


def test_trained_city_exports_one_scene_with_seam_figures(trained_city, tmp_path: Path) -> None:
    """synth --city -> city train (with the kill) -> city export: one PLY holding every cell's owned
    splats, the DSM mosaic against the city's exact DSM near the seams and inside the cores."""
    from skyfall.export.formats import read_ply

    city, _, _ = trained_city
    out = tmp_path / "city"
    shutil.copytree(city, out)
    r = _skyfall("city", "export", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "export" / "chunks.json").read_text())
    assert len(doc["chunks"]) == 4 and doc["embedding"]["name"] == "sat_00"
    assert (
        len(read_ply(out / "export" / "city.ply")) == doc["count"] == sum(c["count"] for c in doc["chunks"])
    )
    err = json.loads((out / "export" / "dsm_errors.json").read_text())
    assert err["seam"]["count"] > 0 and err["interior"]["count"] > 0
    assert err["all"]["coverage"] > 0.95
    # the tiny preset's 60 steps: metres of error, but nowhere near the 20-40 m building heights
    assert 0.5 < err["interior"]["mae_m"] < 8 and 0.5 < err["seam"]["mae_m"] < 8
    assert "seam" in r.stdout

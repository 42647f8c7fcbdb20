"""The descent along the altitude ladder: one column from the top rung to street level, always on target."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skyfall.data.descent import descent_altitudes, descent_cameras
from skyfall.data.ladder import HeightField, place_ladder


def test_descent_altitudes_are_geometric_and_hold_both_ends():
    alts = descent_altitudes(350.0, 1.7, 50, hold=5)
    assert len(alts) == 60 and alts[0] == alts[4] == 350.0 and alts[-1] == alts[-5] == pytest.approx(1.7)
    ratios = alts[6:55] / alts[5:54]
    assert np.allclose(ratios, ratios[0]) and ratios[0] < 1
    with pytest.raises(ValueError):
        descent_altitudes(1.7, 350.0, 10)


def test_descent_keeps_one_column_and_the_target_at_the_image_centre():
    flat = HeightField(np.zeros((400, 400)), -200.0, 200.0, 1.0)  # open ground everywhere, z = 0
    ladder = place_ladder(flat, (-100.0, 100.0, -100.0, 100.0), n_targets=1, n_azimuths=4, size=64)
    cams, info = descent_cameras(flat, ladder, frames=40, hold=4, width=64)
    assert len(cams) == 48 and (info["top_m"], info["bottom_m"]) == (350.0, 1.7)
    eyes = cams.centers
    assert torch.allclose(eyes[:, :2], eyes[:1, :2].expand_as(eyes[:, :2]), atol=1e-9)  # a vertical column
    assert float(eyes[0, 2]) == pytest.approx(350.0) and float(eyes[-1, 2]) == pytest.approx(1.7)
    assert bool((eyes[1:, 2] <= eyes[:-1, 2] + 1e-9).all())  # always sinking
    uv, z = cams.project(torch.tensor([info["target"]]))
    assert torch.allclose(uv[:, 0], torch.full((48, 2), 32.0, dtype=torch.float64), atol=1e-6)
    assert bool((z > 0).all())


def test_render_descent_writes_the_video(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = subprocess.run(
        [sys.executable, "-m", "skyfall", "render", str(run), "--descent", "--orbit.frames", "12",
         "--orbit.width", "48", "--orbit.height", "48", "--no-depth"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[render] descent 350 m ->" in res.stdout
    assert (run / "video" / "descent.mp4").stat().st_size > 0
    assert len(list((run / "video" / "descent").glob("*.png"))) == 12

"""Distribution metrics: reference patch grid, FID and CMMD math by hand, tiny offline CLIP encoders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from skyfall.eval.distribution import (
    ClipEmbedder,
    extract_patches,
    fid_from_features,
    load_clip,
    mmd2_rbf,
    patch_grid,
    patch_stride,
)


def test_patch_grid_matches_reference_counts():
    # Skyfall-GS eval.py: 1024^2 -> stride 34, 16 x 16 patches; 960 x 540 -> stride 3, 10 x 150.
    assert patch_stride(1024, 1024) == 34
    assert len(patch_grid(1024, 1024)[1]) == 256
    assert patch_stride(540, 960) == 3
    p, corners = patch_grid(540, 960)
    assert p == 512 and len(corners) == 1500 and corners[-1] == (27, 447)
    # Smaller images: one patch of side min(H, W).
    img = np.arange(256 * 300 * 3, dtype=np.uint8).reshape(256, 300, 3)
    patches = extract_patches(img)
    assert patches.shape == (1, 256, 256, 3) and (patches[0] == img[:, :256]).all()


def test_cmmd_two_points_hand_computed():
    x, y = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])
    # k(x,x) = k(y,y) = 1, k(x,y) = exp(-25 / (2 * 10^2)).
    assert math.isclose(mmd2_rbf(x, y), 1000 * (2 - 2 * math.exp(-25 / 200)), rel_tol=1e-12)


def test_cmmd_is_the_biased_estimator():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 3)) * 5, rng.normal(size=(3, 3)) * 5 + 2

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return math.exp(-float(((a - b) ** 2).sum()) / 200)

    kxx = sum(k(a, b) for a in x for b in x) / 16  # diagonal included (biased)
    kyy = sum(k(a, b) for a in y for b in y) / 9
    kxy = sum(k(a, b) for a in x for b in y) / 12
    assert math.isclose(mmd2_rbf(x, y), 1000 * (kxx + kyy - 2 * kxy), rel_tol=1e-10)
    assert mmd2_rbf(x, x) == pytest.approx(0.0, abs=1e-12)


def test_fid_diagonal_gaussians_hand_computed():
    a, b, c, d = 1.0, 2.0, 3.0, 0.5
    x = np.array([[a, 0], [-a, 0], [0, b], [0, -b]])
    m = np.array([1.0, -2.0])
    y = np.array([[c, 0], [-c, 0], [0, d], [0, -d]]) + m
    # np.cov (N-1): diag(2a^2/3, 2b^2/3); FID = |m|^2 + sum (sqrt(s_x) - sqrt(s_y))^2.
    sx, sy = np.array([a, b]) ** 2 * 2 / 3, np.array([c, d]) ** 2 * 2 / 3
    expected = float(m @ m + ((np.sqrt(sx) - np.sqrt(sy)) ** 2).sum())
    assert math.isclose(fid_from_features(x, y), expected, rel_tol=1e-9)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)


def test_tiny_clip_embedders_offline(tmp_path: Path, tiny_clip):
    model = tiny_clip(num_hidden_layers=2, projection_dim=16)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    cm = ClipEmbedder.from_model(model, "cmmd")
    e = cm.embed(imgs)
    assert e.shape == (3, 16) and np.allclose(np.linalg.norm(e, axis=1), 1.0)
    fe = ClipEmbedder.from_model(model, "clip_fid").embed(imgs)
    assert fe.shape == (3, 16) and not np.allclose(np.linalg.norm(fe, axis=1), 1.0)
    assert mmd2_rbf(e, cm.embed(imgs)) == pytest.approx(0.0, abs=1e-9)
    # A saved local folder loads with local_files_only and embeds identically.
    model.save_pretrained(tmp_path / "clip")
    loaded = load_clip(tmp_path / "clip", "cmmd")
    assert isinstance(loaded, ClipEmbedder)
    assert np.allclose(loaded.embed(imgs), e, atol=1e-6)


def test_missing_clip_reports_reason(tmp_path: Path):
    pytest.importorskip("transformers")
    reason = load_clip(tmp_path / "no_such_model", "cmmd")
    assert isinstance(reason, str) and "no_such_model" in reason

"""Joint multi-view bundle adjustment of RPC image corrections, on exact synthetic cameras.

Four satellite-like pinholes (700 km away, 0.5 m/px, different azimuths and elevations) see random
points of a 200 m x 200 m x 50 m scene; every view's observations are shifted by a known image
offset (up to 2 px, the size of a Pléiades RPC bias). The adjustment must recover the offsets
relative to view 0 up to the one ambiguity image data cannot resolve (a common 3D translation of
the scene, whose image shifts differ per view), and make heights triangulated from different view
pairs agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skyfall.data.cameras import look_at
from skyfall.prepare.adjust import Correction, build_tracks, joint_adjustment, project_views
from skyfall.prepare.matching import Matches

SIZE = (400, 400)


def _camera(azimuth_deg: float, elevation_deg: float) -> tuple[np.ndarray, np.ndarray]:
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    centre = 7.0e5 * np.array([np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)])
    c2w = look_at(torch.from_numpy(centre), torch.zeros(3)).numpy()
    f = np.linalg.norm(centre) / 0.5  # 0.5 m per pixel at the scene
    return np.array([[f, 0, SIZE[0] / 2], [0, f, SIZE[1] / 2], [0, 0, 1.0]]), c2w


CAMS = [_camera(0, 70), _camera(100, 62), _camera(200, 75), _camera(290, 58)]
INJECTED = np.array([[0.7, -1.2], [-1.6, 0.9], [1.9, 1.4], [-0.4, -1.9]])


def _synthetic(cams, offsets, n_points=400, noise=0.01, outliers=0.03, seed=0):
    """Star matches from each reference view to later views, with the given per-view offsets."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-100, -100, 0], [100, 100, 50], (n_points, 3))
    matches = []
    n = len(cams)
    # Each point gets one reference view and 1..n-1-ref later views (track lengths 2..n).
    ref_of = rng.integers(0, n - 1, n_points)
    for ref in range(n - 1):
        pts = xyz[ref_of == ref]
        uv_ref = project_views(cams, np.full(len(pts), ref), pts) + offsets[ref]
        uv_ref += rng.normal(0, noise, uv_ref.shape)
        for k in range(ref + 1, n):
            seen = rng.random(len(pts)) < (1.0 if k == ref + 1 else 0.7)
            uvk = project_views(cams, np.full(int(seen.sum()), k), pts[seen]) + offsets[k]
            uvk += rng.normal(0, noise, uvk.shape)
            bad = rng.random(len(uvk)) < outliers
            uvk[bad] += rng.uniform(3, 8, (int(bad.sum()), 2))
            matches.append(Matches(k, uv_ref[seen], uvk, np.ones(len(uvk)), ref))
    return matches


def _jacobians(cams):
    """[V, 2, 3] image shift per metre of scene translation at the scene centre."""
    p = np.array([[0.0, 0.0, 25.0]])
    out = []
    for k in range(len(cams)):
        v = np.array([k])
        out.append(
            np.stack([(project_views(cams, v, p + e) - project_views(cams, v, p))[0] for e in np.eye(3)], 1)
        )
    return np.array(out)


def _gauge_free_error(recovered: np.ndarray, injected: np.ndarray, cams) -> np.ndarray:
    """Per-view |recovered − injected − J_k t| after the best translation t.

    Moving every point by t shifts view k's images by J_k t, so offsets b_k = injected_k − J_k t
    explain the observations equally well for any t; the view-0 gauge picks t with J_0 t = injected_0.
    """
    want = injected
    jac = _jacobians(cams)
    t, *_ = np.linalg.lstsq(jac.reshape(-1, 3), (recovered - want).ravel(), rcond=None)
    return np.linalg.norm(recovered - want - jac @ t, axis=1)


def test_joint_adjustment_recovers_injected_offsets() -> None:
    tracks = build_tracks(_synthetic(CAMS, INJECTED))
    lengths = tracks.lengths()
    assert lengths.min() == 2 and lengths.max() == 4
    adj = joint_adjustment(CAMS, tracks, SIZE)
    assert np.all(adj.correction.offset[0] == 0)  # the view-0 gauge
    err = _gauge_free_error(adj.correction.offset, INJECTED, CAMS)
    assert err.max() < 0.05, err
    s = adj.summary(len(CAMS))
    assert s["reproj_rms_tracks3_before_px"] > 0.5
    assert s["reproj_rms_tracks3_after_px"] < 0.05
    assert s["pair_height_spread_m"]["median_before"] > 0.5
    assert s["pair_height_spread_m"]["median_after"] < 0.05
    for pair in s["pairs"].values():
        assert abs(pair["median_dz_after_m"]) < 0.02
    # The injected outliers (3 %) are the observations left out.
    assert 0.01 < 1 - s["inliers"] / s["observations"] < 0.06
    assert set(s["track_length_histogram"]) == {"2", "3", "4"}


def test_mean_gauge_gives_the_same_relative_offsets() -> None:
    tracks = build_tracks(_synthetic(CAMS, INJECTED, seed=1))
    a = joint_adjustment(CAMS, tracks, SIZE, gauge="view0").correction.offset
    b = joint_adjustment(CAMS, tracks, SIZE, gauge="mean").correction.offset
    assert np.abs(b[0]).max() > 0.1  # view 0 moves in this gauge
    assert _gauge_free_error(b, a, CAMS).max() < 0.05


def test_two_views_reduce_to_the_pairwise_case() -> None:
    cams = CAMS[:2]
    tracks = build_tracks(_synthetic(cams, INJECTED[:2], outliers=0.0))
    adj = joint_adjustment(cams, tracks, SIZE)
    assert _gauge_free_error(adj.correction.offset, INJECTED[:2], cams).max() < 0.05
    assert np.median(adj.ray_gap_before_m) > 0.2 and np.median(adj.ray_gap_after_m) < 0.02
    # The unobservable component (along the epipolar direction) is set to 0 by the gauge choice.
    epi = _jacobians(cams)[1] @ np.linalg.svd(_jacobians(cams)[0])[2][-1]
    assert abs(adj.correction.offset[1] @ epi / np.linalg.norm(epi)) < 0.05


def test_affine_model_absorbs_a_rotation_the_offset_model_cannot() -> None:
    base = _synthetic(CAMS, INJECTED, outliers=0.0, seed=2)
    # Rotate view 2's observations by 1 mrad about the image centre: 0.2 px at the border.
    a = np.array([[0.0, -1e-3], [1e-3, 0.0]])
    c = np.array(SIZE) / 2
    for m in base:
        if m.view == 2:
            m.uvk = m.uvk + (m.uvk - c) @ a.T
        if m.ref == 2:
            m.uv0 = m.uv0 + (m.uv0 - c) @ a.T
    tracks = build_tracks(base)
    off = joint_adjustment(CAMS, tracks, SIZE, model="offset").summary(4)
    aff = joint_adjustment(CAMS, tracks, SIZE, model="affine").summary(4)
    assert off["views"][2]["rms_tracks3_after_px"] > 0.04
    assert aff["views"][2]["rms_tracks3_after_px"] < 0.02


def test_tracks_chain_and_conflicts_are_dropped() -> None:
    one = np.ones(1)
    m01 = Matches(1, np.array([[10.5, 20.5]]), np.array([[30.2, 40.1]]), one, 0)
    m02 = Matches(2, np.array([[10.5, 20.5]]), np.array([[50.0, 60.0]]), one, 0)
    m13 = Matches(3, np.array([[30.5, 40.5]]), np.array([[70.0, 80.0]]), one, 1)
    # Without merging, the view-1 match (30.2, 40.1) and view-1 keypoint (30.5, 40.5) are two nodes.
    t = build_tracks([m01, m02, m13])
    assert t.n_tracks == 2 and sorted(t.lengths()) == [2, 3]
    # Merging within 0.6 px chains them into one 4-view track at their mean position.
    t = build_tracks([m01, m02, m13], merge_px=0.6)
    assert t.n_tracks == 1 and t.lengths()[0] == 4
    assert np.allclose(t.uv[t.view == 1], [[30.35, 40.3]])
    # A second view-2 position reached through view 1 contradicts the first: the track is dropped.
    m12 = Matches(2, np.array([[30.5, 40.5]]), np.array([[55.0, 60.0]]), one, 1)
    t = build_tracks([m01, m02, m13, m12], merge_px=0.6)
    assert t.n_tracks == 0 and t.dropped_conflicts == 1


def test_correction_undo_inverts_apply() -> None:
    c = Correction.zero(2, np.array([200.0, 200.0]))
    c.offset[1] = [1.5, -0.5]
    c.linear[1] = [[1e-3, 2e-3], [-1e-3, 5e-4]]
    p = np.random.default_rng(0).uniform(0, 400, (50, 2))
    v = np.ones(50, int)
    assert np.abs(c.undo(v, c.apply(v, p)) - p).max() < 1e-9


@pytest.mark.parametrize("bad", [{"model": "quadratic"}, {"gauge": "view3"}])
def test_bad_options_are_rejected(bad: dict) -> None:
    tracks = build_tracks(_synthetic(CAMS[:2], INJECTED[:2], n_points=20))
    with pytest.raises(ValueError):
        joint_adjustment(CAMS[:2], tracks, SIZE, **bad)


def _planted(n_points=300, noise=0.02, planted=0.06, seed=5):
    """Every point seen by all four views (tracks of 4) with the INJECTED offsets, plus 100 points
    seen by views 0 and 1 only; ``planted`` of the 4-view observations moved by 0.3..3 px in a
    random direction (wrong matches that a 1 px floor lets through). Returns (tracks, planted mask)."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-100, -100, 0], [100, 100, 50], (n_points + 100, 3))
    matches, moved = [], []
    uv0 = (
        project_views(CAMS, np.zeros(len(xyz), int), xyz) + INJECTED[0] + rng.normal(0, noise, (len(xyz), 2))
    )
    for k in range(1, 4):
        sel = np.arange(len(xyz)) if k == 1 else np.arange(n_points)
        uvk = project_views(CAMS, np.full(len(sel), k), xyz[sel]) + INJECTED[k]
        uvk += rng.normal(0, noise, uvk.shape)
        bad = (rng.random(len(sel)) < planted) & (sel < n_points)
        ang = rng.uniform(0, 2 * np.pi, int(bad.sum()))
        uvk[bad] += rng.uniform(0.3, 3.0, int(bad.sum()))[:, None] * np.c_[np.cos(ang), np.sin(ang)]
        matches.append(Matches(k, uv0[sel], uvk, np.ones(len(sel)), 0))
        moved.append(np.c_[np.full(int(bad.sum()), k), uvk[bad]])
    tracks = build_tracks(matches)
    moved = np.concatenate(moved)
    key = {(int(k), float(u), float(v)) for k, u, v in moved}
    mask = np.array(
        [(int(k), float(u), float(v)) in key for k, (u, v) in zip(tracks.view, tracks.uv, strict=True)]
    )
    return tracks, mask


def test_outlier_rejection_drops_planted_outliers_and_recovers_the_offsets() -> None:
    tracks, planted = _planted()
    assert 40 < planted.sum() < 80
    adj = joint_adjustment(CAMS, tracks, SIZE, outlier_sigma=2.5)
    # Every planted observation is out (0.3 px is > 10 sigma of the 0.02 px noise)...
    assert not (adj.inlier & planted).any()
    # ... and about the 4.4 % of a Gaussian beyond 2.5 sigma of the others.
    assert (~adj.inlier & ~planted).sum() < 0.08 * (~planted).sum()
    err = _gauge_free_error(adj.correction.offset, INJECTED, CAMS)
    assert err.max() < 0.01
    assert 0.017 < adj.sigma_px < 0.023  # the noise, 0.02 px per axis
    s = adj.summary(len(CAMS))
    assert s["outliers"]["dropped"] == s["observations"] - s["inliers"] == adj.dropped
    assert s["outliers"]["rounds"] >= 1 and s["outliers"]["n_sigma"] == 2.5
    # Without the test, the soft-L1 loss alone leaves more of the planted errors in the offsets.
    loose = joint_adjustment(CAMS, tracks, SIZE, outlier_sigma=0)
    assert loose.dropped == 0
    assert _gauge_free_error(loose.correction.offset, INJECTED, CAMS).max() > 2 * err.max()


def test_studentized_residuals_are_chi2_on_gaussian_errors() -> None:
    """On 2-view tracks only the component across the epipolar line shows (1 degree of freedom),
    on longer tracks both; the studentized test must see the noise level on both."""
    tracks, _ = _planted(planted=0.0, noise=0.05, seed=6)
    adj = joint_adjustment(CAMS, tracks, SIZE, outlier_sigma=3.0)
    assert 0.045 < adj.sigma_px < 0.055
    assert adj.dropped < 0.03 * len(tracks.view)  # exp(-4.5) = 1.1 % expected
    two = tracks.lengths()[tracks.track] == 2
    assert two.sum() == 200 and (~adj.inlier[two]).sum() < 0.05 * two.sum()

"""KNN initialisation, GaussianModel optimizers, LR / SH schedules and state dicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skyfall.config import OptimConfig
from skyfall.gaussians.filters import apply_3d_filter
from skyfall.gaussians.init import SH_C0, init_from_points
from skyfall.gaussians.model import GaussianModel, expon_lr


def _brute_mean_sq_dist(xyz: np.ndarray, k: int = 3) -> np.ndarray:
    d2 = ((xyz[:, None, :] - xyz[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)  # exclude self by index, duplicates stay at 0
    return np.sort(d2, axis=1)[:, :k].mean(axis=1)


def _rand_params(n: int, deg: int = 1, app: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = {
        "means": torch.randn(n, 3, generator=g),
        "scales": torch.randn(n, 3, generator=g) * 0.3 - 1.0,
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, (deg + 1) ** 2 - 1, 3, generator=g),
    }
    if app:
        p["app_features"] = torch.randn(n, 24, generator=g)
    return p


# ---------------------------------------------------------------------------------- init


def test_init_scales_match_brute_force_knn_with_duplicates():
    rng = np.random.default_rng(1)
    xyz = rng.uniform(-300, 300, (60, 3))
    xyz[5] = xyz[4]  # a duplicate pair: each is the other's nearest neighbour at distance 0
    xyz[7] = xyz[4]
    rgb = rng.integers(0, 256, (60, 3), dtype=np.uint8)
    p = init_from_points(xyz, rgb)
    expected = np.log(np.sqrt(np.maximum(_brute_mean_sq_dist(xyz), 1e-7)))
    np.testing.assert_allclose(p["scales"].numpy(), np.repeat(expected[:, None], 3, 1), rtol=1e-6, atol=1e-6)
    # the triple (4, 5, 7): two neighbours at 0 and one real neighbour
    assert p["scales"][4, 0] < p["scales"][0, 0] - 0.5


def test_init_line_example_and_clamp_and_cap():
    xyz = np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [10, 0, 0]])
    rgb = np.zeros((5, 3), np.uint8)
    p = init_from_points(xyz, rgb)
    assert p["scales"][0, 0].item() == pytest.approx(math.log(math.sqrt((1 + 4 + 9) / 3)), rel=1e-6)
    assert p["scales"][4, 0].item() == pytest.approx(math.log(math.sqrt((49 + 64 + 81) / 3)), rel=1e-6)
    same = init_from_points(np.zeros((4, 3)), np.zeros((4, 3), np.uint8))
    torch.testing.assert_close(same["scales"], torch.full((4, 3), math.log(math.sqrt(1e-7))))
    capped = init_from_points(xyz, rgb, max_scale=2.0)
    assert capped["scales"][4, 0].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert capped["scales"][1, 0] == p["scales"][1, 0]  # below the cap: untouched


@pytest.mark.parametrize("deg", [0, 1, 3])
def test_init_colours_shapes_and_constants(deg: int):
    xyz = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]) + 123.456
    rgb = np.array([[255, 0, 128], [0, 0, 0], [255, 255, 255], [10, 20, 30]], np.uint8)
    p = init_from_points(xyz, rgb, sh_degree=deg)
    assert p["means"].dtype == torch.float32
    torch.testing.assert_close(p["means"], torch.from_numpy(xyz).float())
    assert p["sh0"].shape == (4, 1, 3)
    colour = 0.5 + SH_C0 * p["sh0"][:, 0]
    torch.testing.assert_close(colour, torch.from_numpy(rgb / 255.0).float(), atol=1e-6, rtol=0)
    assert p["sh0"][0, 0, 0].item() == pytest.approx(0.5 / SH_C0, rel=1e-6)
    assert p["shN"].shape == (4, (deg + 1) ** 2 - 1, 3) and not p["shN"].any()
    torch.testing.assert_close(p["quats"], torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1))
    torch.testing.assert_close(p["opacities"], torch.zeros(4))  # logit(0.5)
    p2 = init_from_points(xyz, rgb, init_opacity=0.1)
    assert torch.sigmoid(p2["opacities"][0]).item() == pytest.approx(0.1, rel=1e-6)


# ---------------------------------------------------------------------------------- LR schedules


def test_expon_lr_reference_formula():
    lr0, lr1 = 1.6e-4 * 128, 1.6e-6 * 128
    assert expon_lr(0, lr0, lr1, 30_000) == pytest.approx(0.02048, rel=1e-12)
    assert expon_lr(30_000, lr0, lr1, 30_000) == pytest.approx(2.048e-4, rel=1e-12)
    assert expon_lr(60_000, lr0, lr1, 30_000) == pytest.approx(2.048e-4, rel=1e-12)
    assert expon_lr(15_000, lr0, lr1, 30_000) == pytest.approx(math.sqrt(lr0 * lr1), rel=1e-12)
    assert expon_lr(-1, lr0, lr1, 30_000) == 0.0
    # sine warm-up from delay_mult to 1 over delay_steps
    assert expon_lr(0, lr0, lr1, 30_000, 100, 0.01) == pytest.approx(0.01 * lr0, rel=1e-12)
    half = (0.01 + 0.99 * math.sin(math.pi / 4)) * expon_lr(50, lr0, lr1, 30_000)
    assert expon_lr(50, lr0, lr1, 30_000, 100, 0.01) == pytest.approx(half, rel=1e-12)
    assert expon_lr(200, lr0, lr1, 30_000, 100, 0.01) == pytest.approx(expon_lr(200, lr0, lr1, 30_000))


def test_optimizers_one_adam_per_param_with_reference_lrs():
    m = GaussianModel(_rand_params(10, app=True))
    expected = {
        "means": 0.02048,
        "sh0": 2.5e-3,
        "shN": 2.5e-3 / 20,
        "opacities": 0.05,
        "scales": 1e-3,
        "quats": 1e-3,
        "app_features": 5e-3,
    }
    assert set(m.optimizers) == set(m.params.keys()) == set(expected)
    for name, lr in expected.items():
        opt = m.optimizers[name]
        assert isinstance(opt, torch.optim.Adam)
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"][0] is m.params[name]
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert opt.param_groups[0]["eps"] == 1e-15


def test_position_lr_schedule_and_stage2_restart():
    m = GaussianModel(_rand_params(4), scene_extent=64.0)
    assert m.position_lr(0) == pytest.approx(1.6e-4 * 64)
    assert m.update_position_lr(30_000) == pytest.approx(1.6e-6 * 64)
    assert m.optimizers["means"].param_groups[0]["lr"] == pytest.approx(1.6e-6 * 64)
    m.restart_position_lr(30_000, 10_000)
    assert m.position_lr(30_000) == pytest.approx(1.6e-4 * 64)
    assert m.position_lr(35_000) == pytest.approx(64 * math.sqrt(1.6e-4 * 1.6e-6))
    assert m.position_lr(40_000) == pytest.approx(1.6e-6 * 64)
    custom = GaussianModel(_rand_params(4), OptimConfig(means_lr_max_steps=100, opacities_lr=0.2))
    assert custom.position_lr(100) == pytest.approx(1.6e-6 * 128)
    assert custom.optimizers["opacities"].param_groups[0]["lr"] == 0.2


def test_sh_degree_schedule():
    m1 = GaussianModel(_rand_params(3, deg=1))
    assert m1.max_sh_degree == 1
    assert [m1.update_sh_degree(s) for s in (0, 1, 999)] == [0, 0, 0]
    assert m1.update_sh_degree(1000) == 1 and m1.update_sh_degree(5000) == 1
    m3 = GaussianModel(_rand_params(3, deg=3), sh_degree_interval=10)
    assert [m3.update_sh_degree(s) for s in (9, 10, 25, 30, 100)] == [0, 1, 2, 3, 3]
    assert m3.update_sh_degree(0) == 3  # never lowered


def test_effective_scales_opacities_use_the_3d_filter():
    p = _rand_params(8)
    m = GaussianModel(p)
    s, a = m.get_scales_opacities_eff()
    torch.testing.assert_close(s, p["scales"].exp())
    torch.testing.assert_close(a, torch.sigmoid(p["opacities"]))
    m.filter_3d = torch.full((8,), 0.3)
    s, a = m.get_scales_opacities_eff()
    s_ref, a_ref = apply_3d_filter(p["scales"], p["opacities"], torch.full((8,), 0.3))
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(a, a_ref)
    assert (a < torch.sigmoid(p["opacities"])).all()
    a.sum().backward()  # differentiable through the filter
    assert m.params["opacities"].grad is not None and m.params["scales"].grad is not None


def test_bad_params_rejected():
    p = _rand_params(5)
    with pytest.raises(ValueError, match="missing"):
        GaussianModel({k: v for k, v in p.items() if k != "quats"})
    with pytest.raises(ValueError, match="rows"):
        GaussianModel({**p, "opacities": torch.zeros(4)})
    with pytest.raises(ValueError, match="unknown"):
        GaussianModel({**p, "colors": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="degree"):
        GaussianModel({**p, "shN": torch.zeros(5, 4, 3)})


def _train(m: GaussianModel, steps: int, first: int, target: torch.Tensor) -> None:
    for step in range(first, first + steps):
        m.update_position_lr(step)
        m.zero_grad()
        loss = sum(((v - target.mean()) ** 2).sum() * (i + 1) for i, v in enumerate(m.params.values()))
        loss.backward()
        m.optimizer_step()


def test_state_dict_round_trip_resumes_identically():
    target = torch.tensor([0.7])
    a = GaussianModel(_rand_params(16, app=True))
    a.filter_3d = torch.rand(16)
    a.grad_accum += 2.0
    a.update_sh_degree(1000)
    a.restart_position_lr(3, 50)
    _train(a, 3, 3, target)
    state = a.state_dict()
    b = GaussianModel.from_state_dict(state)
    for k in a.params.keys():
        assert torch.equal(a.params[k], b.params[k])
        assert torch.equal(
            a.optimizers[k].state[a.params[k]]["exp_avg_sq"], b.optimizers[k].state[b.params[k]]["exp_avg_sq"]
        )
    assert torch.equal(b.filter_3d, a.filter_3d) and torch.equal(b.grad_accum, a.grad_accum)
    assert b.active_sh_degree == 1 and b.position_lr(53) == pytest.approx(a.position_lr(53))
    _train(a, 4, 6, target)
    _train(b, 4, 6, target)
    for k in a.params.keys():
        assert torch.equal(a.params[k], b.params[k]), k
    # the state dict held in memory aliases neither model
    assert not torch.equal(state["params"]["means"], a.params["means"])
    moment = state["optimizers"]["means"]["state"][0]["exp_avg"]
    assert not torch.equal(moment, b.optimizers["means"].state[b.params["means"]]["exp_avg"])


def test_flat_init_lays_disks_in_the_plane_of_the_points():
    """Points on a wall (x = 0) and on a roof (z = 10): each Gaussian's thin axis is the surface normal."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    wall = np.stack([np.zeros(300), rng.uniform(-5, 5, 300), rng.uniform(0, 10, 300)], 1)
    roof = np.stack([rng.uniform(20, 30, 300), rng.uniform(-5, 5, 300), np.full(300, 10.0)], 1)
    xyz = np.concatenate([wall, roof])
    p = init_from_points(xyz, np.zeros_like(xyz, dtype=np.uint8), flat=0.25)
    iso = init_from_points(xyz, np.zeros_like(xyz, dtype=np.uint8))
    q = p["quats"].numpy().astype(np.float64)
    rot = Rotation.from_quat(np.concatenate([q[:, 1:], q[:, :1]], 1)).as_matrix()
    normal = rot[:, :, 2]  # the local z axis carries the thin scale
    assert np.abs(normal[:300, 0]).min() > 0.99 and np.abs(normal[300:, 2]).min() > 0.99
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)
    s, s0 = p["scales"].exp().numpy(), iso["scales"].exp().numpy()
    np.testing.assert_allclose(s[:, :2], s0[:, :2], rtol=1e-6)
    np.testing.assert_allclose(s[:, 2], 0.25 * s0[:, 2], rtol=1e-5)
    # the reference's isotropic start is unchanged without the option
    np.testing.assert_array_equal(iso["quats"].numpy(), np.tile([1.0, 0, 0, 0], (600, 1)))


def test_height_field_points_fill_a_sparse_cloud_with_robust_heights():
    from skyfall.gaussians.init import height_field_points

    rng = np.random.default_rng(0)
    xy = rng.uniform(-50, 50, (400, 2))
    z = np.where(xy[:, 0] > 0, 10.0, 0.0)  # a step: roof east of x = 0, ground west
    z[::50] += 30.0  # a few outliers
    rgb = np.where(xy[:, :1] > 0, [[200, 0, 0]], [[0, 0, 200]]).astype(np.uint8)
    pts, cols = height_field_points(np.c_[xy, z], rgb, spacing=2.0)
    assert pts.shape[1] == 3 and len(pts) == len(cols)
    assert np.all(np.diff(np.unique(pts[:, 0])) > 1.99)  # the grid's spacing
    away = np.abs(pts[:, 0]) > 15  # cells whose 8 neighbours all lie on one side
    want = np.where(pts[away, 0] > 0, 10.0, 0.0)
    np.testing.assert_allclose(pts[away, 2], want)  # the median ignores the outliers
    assert np.all(cols[away & (pts[:, 0] > 0)] == [200, 0, 0])
    assert height_field_points(np.zeros((3, 3)), np.zeros((3, 3), np.uint8), 1.0)[0].shape == (0, 3)
    with pytest.raises(ValueError, match="spacing"):
        height_field_points(np.c_[xy, z], rgb, spacing=0.0)
    # A cloud already as dense as the grid (prepare's dense heights) gets nothing added, a hole is filled.
    g = np.arange(-49.0, 50.0, 2.0)
    dense = np.stack(np.meshgrid(g, g, [0.0], indexing="ij"), -1).reshape(-1, 3)
    assert len(height_field_points(dense, np.zeros((len(dense), 3), np.uint8), 2.0)[0]) == 0
    holed = dense[np.hypot(dense[:, 0], dense[:, 1]) > 6]
    filled, _ = height_field_points(holed, np.zeros((len(holed), 3), np.uint8), 2.0)
    assert 20 <= len(filled) <= 36 and np.hypot(filled[:, 0], filled[:, 1]).max() < 7

"""GOF densification (selection, clone, split, prune), Adam-state bookkeeping and the opacity reset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from skyfall.errors import SkyfallError
from skyfall.gaussians.densify import (
    CollapseError,
    _cat_params,
    _keep_params,
    accumulate_stats,
    check_gaussian_count,
    densify_and_prune,
    densify_selection,
    reset_opacity,
)
from skyfall.gaussians.filters import apply_3d_filter
from skyfall.gaussians.model import GaussianModel


def make_model(scales: list, opacities: list, quats: torch.Tensor | None = None) -> GaussianModel:
    """Gaussian i sits at x = i (a tag that survives cloning), with the given linear scales and alphas."""
    n = len(scales)
    g = torch.Generator().manual_seed(0)
    s = torch.tensor(scales, dtype=torch.float32)
    s = s[:, None].repeat(1, 3) if s.dim() == 1 else s
    means = torch.zeros(n, 3)
    means[:, 0] = torch.arange(n, dtype=torch.float32)
    q = torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1) if quats is None else quats
    params = {
        "means": means,
        "scales": torch.log(s),
        "quats": q,
        "opacities": torch.logit(torch.tensor(opacities, dtype=torch.float32)),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, 3, 3, generator=g),
        "app_features": torch.randn(n, 24, generator=g),
    }
    return GaussianModel(params, filter_3d=torch.rand(n, generator=g))


def set_stats(m: GaussianModel, grads: list, absgrads: list, denom: float = 1.0) -> None:
    m.grad_accum = torch.tensor(grads, dtype=torch.float32) * denom
    m.absgrad_accum = torch.tensor(absgrads, dtype=torch.float32) * denom
    m.denom = torch.full((m.num_gaussians,), float(denom))


def adam_step(m: GaussianModel) -> None:
    """One Adam step with row-dependent gradients so every row has distinct, non-zero moments."""
    m.zero_grad()
    loss = 0.0
    for p in m.params.values():
        w = torch.arange(1, p.shape[0] + 1, dtype=torch.float32).reshape((-1,) + (1,) * (p.dim() - 1))
        loss = loss + (p * w).sum()
    loss.backward()
    m.optimizer_step()


# ---------------------------------------------------------------------------------- statistics


def test_accumulate_stats_normalises_pixel_gradients_to_ndc():
    m = make_model([0.1] * 3, [0.5] * 3)
    grad = torch.tensor([[1e-3, 2e-3], [5.0, 5.0], [0.0, -1e-3]])
    absgrad = torch.tensor([[3e-3, 1e-3], [5.0, 5.0], [2e-3, 2e-3]])
    visible = torch.tensor([True, False, True])
    accumulate_stats(m, grad, absgrad, torch.tensor([3, 50, 7]), visible, 200, 100)
    # d/d ndc = d/d pix * (W/2, H/2)
    torch.testing.assert_close(m.grad_accum, torch.tensor([math.hypot(0.1, 0.1), 0.0, 0.05]))
    torch.testing.assert_close(
        m.absgrad_accum, torch.tensor([math.hypot(0.3, 0.05), 0.0, math.hypot(0.2, 0.1)])
    )
    torch.testing.assert_close(m.denom, torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(m.max_radii2d, torch.tensor([3.0, 0.0, 7.0]))
    # second view: accumulates, radii keep the max, [N, 2] radii use the larger axis, n_cameras rescales
    accumulate_stats(
        m, grad, absgrad, torch.tensor([[1, 2], [60, 60], [9, 4]]), torch.ones(3, dtype=torch.bool), 200, 100,
        n_cameras=2,
    )  # fmt: skip
    torch.testing.assert_close(
        m.grad_accum, torch.tensor([3 * math.hypot(0.1, 0.1), math.hypot(1000, 500), 0.15])
    )
    torch.testing.assert_close(m.denom, torch.tensor([2.0, 1.0, 2.0]))
    torch.testing.assert_close(m.max_radii2d, torch.tensor([3.0, 60.0, 9.0]))


def test_selection_is_grad_or_quantile_matched_absgrad():
    m = make_model([0.1] * 11, [0.5] * 11)
    grads = [0, 0, 0, 0, 0, 0, 0, 0, 5e-4, 2e-4, 0]
    absg = [9e-3, 8e-3, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 0.5e-3, 0.7e-3, 0]
    set_stats(m, grads, absg, denom=2.0)
    # a Gaussian never seen (denom 0) counts as grad = absgrad = 0 whatever its accumulators hold
    m.grad_accum[10], m.absgrad_accum[10], m.denom[10] = 1.0, 1.0, 0.0
    selected, mean_grads, q = densify_selection(m, 1e-4)
    ratio = 2 / 11
    assert q == pytest.approx(np.quantile(np.array(absg, np.float32), 1 - ratio), rel=1e-5)
    torch.testing.assert_close(mean_grads, torch.tensor(grads, dtype=torch.float32))
    expected = (torch.tensor(grads) >= 1e-4) | (torch.tensor(absg, dtype=torch.float32) >= q)
    assert torch.equal(selected, expected)
    assert selected.nonzero().flatten().tolist() == [0, 1, 8, 9]  # hand-checked: Q lies between 6e-3 and 8e-3


# ---------------------------------------------------------------------------------- clone / split


def test_clone_small_split_large_and_reference_order():
    # 0: small selected (exactly at the 1.0 boundary -> clone), 1: large selected -> split,
    # 2: small unselected, 3: large unselected
    scales = [[1.0, 1.0, 1.0], [2.0, 0.5, 0.5], [0.2, 0.2, 0.2], [3.0, 3.0, 3.0]]
    m = make_model(scales, [0.5] * 4)
    set_stats(m, [1e-3, 1e-3, 0, 0], [1e-3, 1e-3, 0, 0])
    before = {k: v.detach().clone() for k, v in m.params.items()}
    f_before = m.filter_3d.clone()
    rep = densify_and_prune(
        m, grad_threshold=1e-4, scene_extent=100.0, generator=torch.Generator().manual_seed(0)
    )
    assert (rep.n_before, rep.n_cloned, rep.n_split, rep.n_pruned, rep.n_after) == (4, 1, 1, 0, 6)
    assert m.num_gaussians == 6
    # order: originals without the split parent, the clone, then the children
    for k, v in m.params.items():
        torch.testing.assert_close(v[:3].detach(), before[k][[0, 2, 3]], rtol=0, atol=0)
        torch.testing.assert_close(
            v[3].detach(), before[k][0], rtol=0, atol=0
        )  # exact copy, incl. app_features
        if k not in ("means", "scales"):
            torch.testing.assert_close(v[4:].detach(), before[k][[1, 1]], rtol=0, atol=0)
    torch.testing.assert_close(m.filter_3d, f_before[[0, 2, 3, 0, 1, 1]])
    child_scales = m.params["scales"][4:].detach().exp()
    torch.testing.assert_close(child_scales, torch.tensor([[2.0, 0.5, 0.5]]).repeat(2, 1) / 1.6)
    assert not torch.equal(m.params["means"][4], m.params["means"][5])  # independent samples
    # statistics are reset at the new size
    for buf in (m.grad_accum, m.absgrad_accum, m.denom, m.max_radii2d):
        assert buf.shape == (6,) and not buf.any()


@pytest.mark.parametrize(("max_new", "cloned"), [(None, [0, 1, 2, 3, 4]), (2, [3, 1]), (0, [])])
def test_max_new_densifies_the_largest_gradients_first(max_new, cloned):
    m = make_model([0.2] * 6, [0.5] * 6)  # all small: every selected one is cloned
    grads = [2e-4, 5e-4, 1e-4, 9e-4, 3e-4, 0.0]  # Gaussians 0-4 pass tau = 1e-4
    set_stats(m, grads, grads)
    rep = densify_and_prune(m, grad_threshold=1e-4, scene_extent=100.0, max_new=max_new)
    assert rep.n_cloned == len(cloned) and m.num_gaussians == 6 + len(cloned)
    # clones are appended in index order; their x coordinate is the tag of their original
    assert m.params["means"][6:, 0].tolist() == sorted(float(i) for i in cloned)


def test_strategy_caps_the_count(tiny_tile, tmp_path):
    """max_gaussians bounds Stage 1's growth; without it the tiny run ends with 1575 Gaussians."""
    import dataclasses

    from skyfall.config import load_config
    from skyfall.train.stage1 import train_stage1

    cfg = load_config("tiny").stage1
    cfg = dataclasses.replace(cfg, densify=dataclasses.replace(cfg.densify, max_gaussians=900))
    summary = train_stage1(cfg, tiny_tile, tmp_path / "run", progress=False)
    assert 817 < summary["num_gaussians"] <= 900  # 817 initial points, then densified up to the cap


@pytest.mark.parametrize("split_n", [2, 3])
def test_split_children_follow_the_rotated_covariance(split_n: int):
    n = 1500
    q_wxyz = torch.nn.functional.normalize(torch.tensor([0.9, 0.3, -0.2, 0.4]), dim=0)
    s = torch.tensor([2.0, 0.5, 0.25])
    m = make_model(s[None].repeat(n, 1).tolist(), [0.5] * n, quats=q_wxyz[None].repeat(n, 1) * 3.0)
    centre = m.params["means"].detach().clone()
    set_stats(m, [1e-3] * n, [1e-3] * n)
    rep = densify_and_prune(
        m, grad_threshold=1e-4, generator=torch.Generator().manual_seed(1), split_n=split_n
    )
    assert rep.n_split == n and m.num_gaussians == split_n * n
    torch.testing.assert_close(
        m.params["scales"].detach().exp(), (s / (0.8 * split_n)).expand(split_n * n, 3)
    )
    offsets = (m.params["means"].detach() - centre.repeat(split_n, 1)).double().numpy()
    rot = Rotation.from_quat(q_wxyz[[1, 2, 3, 0]].double().numpy()).as_matrix()  # scipy wants xyzw
    white = offsets @ rot / s.double().numpy()  # R^T d / s, row-wise
    np.testing.assert_allclose(white.mean(0), 0.0, atol=0.1)
    np.testing.assert_allclose(np.cov(white.T), np.eye(3), atol=0.1)
    # the unrotated frame would be clearly wrong: the anisotropy is 8:1
    assert np.abs(np.cov((offsets / s.double().numpy()).T) - np.eye(3)).max() > 0.5


# ---------------------------------------------------------------------------------- prune


@pytest.mark.parametrize("reset_radii", [True, False])
def test_prune_rules(reset_radii: bool):
    # 0 ok, 1 alpha 0.004 (pruned), 2 alpha 0.006 (kept), 3 scale 13 > 12.8 (pruned), 4 scale 12.7 (kept),
    # 5 radius 25 px > 20 (pruned only when the reference's radius reset is off), 6 radius 15 (kept),
    # 7 the only Gaussian with an abs-grad: selected (Q = its value when ratio = 0) and cloned.
    scales = [0.1, 0.1, 0.1, 13.0, 12.7, 0.1, 0.1, 0.1]
    alphas = [0.5, 0.004, 0.006, 0.5, 0.5, 0.5, 0.5, 0.5]
    m = make_model(scales, alphas)
    set_stats(m, [0.0] * 8, [0.0] * 7 + [1e-3])
    m.max_radii2d = torch.tensor([1.0, 1, 1, 1, 1, 25, 15, 1])
    rep = densify_and_prune(m, grad_threshold=1e-4, reset_radii_before_prune=reset_radii)
    survivors = m.params["means"][:, 0].detach().round().long().tolist()
    expected = [0, 2, 4, 5, 6, 7, 7] if reset_radii else [0, 2, 4, 6, 7, 7]
    assert survivors == expected
    assert rep.n_cloned == 1 and rep.n_split == 0 and rep.n_pruned == 8 + 1 - len(expected)


def test_prune_rules_can_be_disabled():
    m = make_model([0.1, 13.0, 0.1, 0.1], [0.5] * 4)
    set_stats(m, [0.0] * 4, [0.0] * 3 + [1e-3])
    m.max_radii2d = torch.tensor([0.0, 0.0, 30.0, 0.0])
    densify_and_prune(
        m,
        grad_threshold=1e-4,
        max_screen_size=None,
        max_world_scale_frac=None,
        reset_radii_before_prune=False,
    )
    assert m.params["means"][:, 0].detach().round().long().tolist() == [0, 1, 2, 3, 3]


# ---------------------------------------------------------------------------------- Adam state


def test_optimizer_states_follow_densification():
    scales = [[1.0, 1.0, 1.0], [2.0, 0.5, 0.5], [0.2, 0.2, 0.2], [3.0, 3.0, 3.0]]
    m = make_model(scales, [0.5] * 4)
    adam_step(m)
    old = {
        k: {key: v.clone() for key, v in m.optimizers[k].state[m.params[k]].items()} for k in m.params.keys()
    }
    set_stats(m, [1e-3, 1e-3, 0, 0], [1e-3, 1e-3, 0, 0])
    densify_and_prune(m, grad_threshold=1e-4, scene_extent=100.0, generator=torch.Generator().manual_seed(0))
    for k, p in m.params.items():
        opt = m.optimizers[k]
        assert opt.param_groups[0]["params"][0] is p and len(opt.state) == 1
        st = opt.state[p]
        assert torch.equal(st["step"], old[k]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].shape == p.shape
            torch.testing.assert_close(st[key][:3], old[k][key][[0, 2, 3]], rtol=0, atol=0)  # kept rows
            assert not st[key][3:].any()  # clone and children start with zero moments
    adam_step(m)  # the resized optimizers keep working
    assert m.optimizers["means"].state[m.params["means"]]["exp_avg"].shape == (6, 3)


def test_cat_and_keep_ops_directly():
    m = make_model([0.1] * 3, [0.5] * 3)
    adam_step(m)
    exp_avg = m.optimizers["sh0"].state[m.params["sh0"]]["exp_avg"].clone()
    new = {k: torch.full((2,) + v.shape[1:], 7.0) for k, v in m.params.items()}
    _cat_params(m, new, torch.tensor([0.5, 0.25]))
    assert m.num_gaussians == 5 and torch.equal(m.filter_3d[3:], torch.tensor([0.5, 0.25]))
    assert m.grad_accum.shape == (5,) and m.params["app_features"][4, 0].item() == 7.0
    st = m.optimizers["sh0"].state[m.params["sh0"]]["exp_avg"]
    assert torch.equal(st[:3], exp_avg) and not st[3:].any()
    means = m.params["means"].detach().clone()
    _keep_params(m, torch.tensor([False, True, False, True, True]))
    assert m.num_gaussians == 3 and torch.equal(m.params["means"], means[[1, 3, 4]])
    assert torch.equal(m.optimizers["sh0"].state[m.params["sh0"]]["exp_avg"][0], exp_avg[1])
    assert m.denom.shape == (3,) and m.filter_3d.shape == (3,)
    with pytest.raises(ValueError, match="keys"):
        _cat_params(m, {"means": torch.zeros(1, 3)}, torch.zeros(1))


# ---------------------------------------------------------------------------------- opacity reset


def test_opacity_reset_without_filter():
    m = make_model([0.1] * 3, [0.5, 0.005, 0.02])
    m.filter_3d = torch.zeros(3)
    adam_step(m)
    raw_before = m.params["opacities"].detach().clone()
    step_before = m.optimizers["opacities"].state[m.params["opacities"]]["step"].clone()
    reset_opacity(m, 0.01)
    alpha = torch.sigmoid(m.params["opacities"].detach())
    torch.testing.assert_close(alpha[[0, 2]], torch.tensor([0.01, 0.01]))
    assert m.params["opacities"][1].item() == raw_before[1].item()  # already below: bit-exact
    st = m.optimizers["opacities"].state[m.params["opacities"]]
    assert not st["exp_avg"].any() and not st["exp_avg_sq"].any() and torch.equal(st["step"], step_before)
    assert m.optimizers["means"].state[m.params["means"]]["exp_avg"].any()  # other moments untouched


def test_opacity_reset_is_filter_aware():
    s = 0.2
    m = make_model([s] * 3, [0.5, 0.02, 0.9])
    m.filter_3d = torch.tensor([s, s, 0.0])  # s_eff^2 = 2 s^2 per axis -> coef = 2^-1.5
    coef = 2.0**-1.5
    _, a_eff_before = apply_3d_filter(
        m.params["scales"].detach(), m.params["opacities"].detach(), m.filter_3d
    )
    torch.testing.assert_close(a_eff_before, torch.tensor([0.5 * coef, 0.02 * coef, 0.9]))
    reset_opacity(m, 0.01)
    _, a_eff = m.get_scales_opacities_eff()
    # 0: 0.177 -> 0.01; 1: 0.0071 < 0.01 unchanged; 2: no filter -> 0.01
    torch.testing.assert_close(a_eff.detach(), torch.tensor([0.01, 0.02 * coef, 0.01]))
    torch.testing.assert_close(torch.sigmoid(m.params["opacities"].detach())[0], torch.tensor(0.01 / coef))


# ---------------------------------------------------------------------------------- guards


def test_collapse_guard():
    check_gaussian_count(100, 100)
    with pytest.raises(
        CollapseError, match="99 Gaussians left after the opacity reset, below the floor of 100"
    ):
        check_gaussian_count(99, 100, context="after the opacity reset")
    assert issubclass(CollapseError, SkyfallError)


def test_empty_model_is_a_no_op():
    m = make_model([0.1, 0.1], [0.5, 0.5])
    _keep_params(m, torch.tensor([False, False]))
    rep = densify_and_prune(m, grad_threshold=1e-4)
    assert rep.n_after == 0 and m.num_gaussians == 0


# ------------------------------------------------------------------- pruning outside densification


def test_prune_transparent_uses_the_effective_opacity_and_keeps_a_floor():
    from skyfall.gaussians.densify import prune_transparent

    m = make_model([0.5, 0.5, 0.5, 0.001, 0.5], [0.9, 0.03, 0.2, 0.9, 0.6])
    m.filter_3d = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0])
    # Gaussian 3 is opaque in its raw opacity but a 1 mm splat under a 10 cm filter: what a viewer
    # blends is 0.9 * (0.001^2 / (0.001^2 + 0.1^2))^(3/2), i.e. nothing.
    _, eff = m.get_scales_opacities_eff()
    assert float(eff.detach().reshape(-1)[3]) < 1e-5
    assert prune_transparent(m, 0.05) == 2
    np.testing.assert_array_equal(m.params["means"][:, 0].detach().numpy(), [0, 2, 4])
    assert m.filter_3d.shape == (3,) and m.grad_accum.shape == (3,)
    # the floor keeps the most opaque ones
    m = make_model([0.5] * 4, [0.01, 0.02, 0.03, 0.04])
    m.filter_3d = torch.zeros(4)
    assert prune_transparent(m, 0.5, floor=2) == 2
    np.testing.assert_array_equal(m.params["means"][:, 0].detach().numpy(), [2, 3])


def test_strategy_prunes_outside_densification_only_on_its_schedule():
    from skyfall.gaussians.strategy import GOFStrategy

    calls = []
    strat = GOFStrategy(
        start=10, until=0, prune_every=20, prune_opacity=0.05, refilter_every=1000, min_gaussians=1
    )
    state = strat.initialize_state()
    for step, expect in ((20, 3), (10, 4), (30, 4), (40, 3)):
        m = make_model([0.5] * 4, [0.9, 0.01, 0.6, 0.7])
        m.filter_3d = torch.zeros(4)
        strat.step_post_backward(m, state, step, None, lambda step=step: calls.append(step))
        assert m.num_gaussians == expect, step
    # step 20 and 40 prune (multiples of 20 after start 10); the filter is refreshed after a prune
    assert calls == [20, 40]

"""Appearance model (Skyfall-GS / WildGaussians ``EmbeddingModel``): Fourier init, forward math, embeddings,
gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skyfall.gaussians.appearance import SH_C0, AppearanceModel, fourier_init_embeddings


def test_fourier_symmetric_points_hand_computed():
    # Two points mirrored about their mean: normalised x = ±1, so p ∈ {0, 1}. With integer
    # frequencies sin(2π p f) = 0 and sin(2π p f + π/2) = 1 -> [0, 1] repeated for every axis/octave.
    pts = torch.tensor([[-1.0, -2.0, 10.0], [1.0, 2.0, 14.0]])
    feats = fourier_init_embeddings(pts, noise_std=0.0)
    assert feats.shape == (2, 24)
    expected = torch.tensor([0.0, 1.0] * 12).expand(2, 24)
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)


def test_fourier_generic_point_hand_computed():
    # x axis: [-3, 1, 2] (mean 0), |x| sorted [1, 2, 3]; the 0.97-quantile interpolates at position
    # 0.97 * 2 = 1.94: 2 + 0.94 * (3 - 2) = 2.94. Point 1 -> p_x = 1 / 2.94 * 0.5 + 0.5.
    # y axis: [0, 0.5, 1] + 4 (mean 4.5): centred [-0.5, 0, 0.5], quantile 0.5 -> p_y(point 1) = 0.5.
    # z axis: [1, 1, 4] (mean 2): centred [-1, -1, 2], |.| sorted [1, 1, 2] -> q = 1 + 0.94 = 1.94.
    pts = torch.tensor([[-3.0, 4.0, 1.0], [1.0, 4.5, 1.0], [2.0, 5.0, 4.0]])
    feats = fourier_init_embeddings(pts, noise_std=0.0)
    p = [1 / 2.94 * 0.5 + 0.5, 0.5, -1 / 1.94 * 0.5 + 0.5]
    expected = []
    for axis in range(3):  # axis-major, then octave, then (sin, cos)
        for k in range(4):
            for offset in (0.0, math.pi / 2):
                expected.append(math.sin(2 * math.pi * p[axis] * 2**k + offset))
    torch.testing.assert_close(feats[1], torch.tensor(expected), rtol=0, atol=2e-5)
    # cross-check the quantile against numpy on random points
    rnd = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([10.0, 1.0, 0.1])
    f = fourier_init_embeddings(rnd, n_freqs=2, noise_std=0.0)
    c = rnd.numpy().astype(np.float64) - rnd.numpy().astype(np.float64).mean(0)
    pn = c / np.quantile(np.abs(c), 0.97, axis=0) * 0.5 + 0.5
    ref = np.sin(2 * np.pi * pn[:, :, None] * np.array([1, 1, 2, 2]) + np.array([0, np.pi / 2] * 2))
    np.testing.assert_allclose(f.numpy(), ref.reshape(50, 12), atol=2e-5)


def test_fourier_noise_and_degenerate_axis():
    pts = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1))
    pts[:, 2] = 5.0  # flat cloud: the z axis has zero spread
    clean = fourier_init_embeddings(pts, noise_std=0.0)
    assert torch.isfinite(clean).all()
    noisy = fourier_init_embeddings(pts, noise_std=1e-4, generator=torch.Generator().manual_seed(2))
    diff = noisy - clean
    assert diff.std().item() == pytest.approx(1e-4, rel=0.05)
    assert abs(diff.mean().item()) < 5e-6
    again = fourier_init_embeddings(pts, noise_std=1e-4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(noisy, again, rtol=0, atol=0)
    with pytest.raises(ValueError):
        fourier_init_embeddings(torch.zeros(4, 2))


def test_module_layout_and_init():
    torch.manual_seed(0)
    model = AppearanceModel(n_images=500)
    assert model.image_embeddings.weight.shape == (500, 32)
    assert model.image_embeddings.weight.std().item() == pytest.approx(0.01, rel=0.05)
    linears = [m for m in model.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(59, 128), (128, 128), (128, 6)]
    # PyTorch default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
    for m in linears:
        bound = 1 / math.sqrt(m.in_features)
        assert m.weight.abs().max().item() <= bound and m.bias.abs().max().item() <= bound
        assert m.weight.abs().max().item() > 0.9 * bound


def _direct_forward(
    model: AppearanceModel, sh: torch.Tensor, g: torch.Tensor, a: torch.Tensor
) -> torch.Tensor:
    """Per-Gaussian, per-channel re-derivation of the reference's ``EmbeddingModel`` (explicit products)."""
    (w1, b1), (w2, b2), (w3, b3) = [(m.weight.detach(), m.bias.detach()) for m in model.mlp[::2]]
    n, k, _ = sh.shape
    out = torch.empty_like(sh)
    for i in range(n):
        dc = [min(sh[i, 0, c].item(), 1.0) for c in range(3)]
        x = torch.tensor(dc + g[i].tolist() + a.tolist(), dtype=torch.float64)
        h = torch.relu(w1.double() @ x + b1.double())
        h = torch.relu(w2.double() @ h + b2.double())
        y = 0.01 * (w3.double() @ h + b3.double())
        offset, mult = y[:3], y[3:]
        for band in range(k):
            for c in range(3):
                v = min(sh[i, band, c].item(), 1.0) * mult[c].item()
                if band == 0:
                    v += offset[c].item() / 0.28209479177387814
                out[i, band, c] = min(v, 1.0)
    return out


def test_forward_matches_direct_derivation_with_clamps():
    torch.manual_seed(3)
    model = AppearanceModel(n_images=4)
    with torch.no_grad():
        # large multipliers/offsets so that the final min(F', 1) clamps some entries
        model.mlp[4].bias.copy_(torch.tensor([30.0, -20.0, 5.0, 150.0, 90.0, -120.0]))
    gen = torch.Generator().manual_seed(4)
    sh = torch.randn(5, 4, 3, generator=gen) * 0.8  # K = 4: SH degree 1
    sh[0, 0, 0] = 3.0  # DC above 1: clamped both in the MLP input and in F
    sh[1, 2, 1] = 1.7  # higher band above 1
    g = torch.randn(5, 24, generator=gen)
    out = model(sh, g, 2)
    expected = _direct_forward(model, sh, g, model.image_embeddings.weight[2].detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == (5, 4, 3)
    assert (out <= 1.0).all() and (out == 1.0).any() and (out < 0).any()
    # the clamped inputs behave as exactly 1
    sh_one = sh.clone()
    sh_one[0, 0, 0] = 1.0
    sh_one[1, 2, 1] = 1.0
    torch.testing.assert_close(model(sh_one, g, 2), out, rtol=0, atol=0)
    assert SH_C0 == pytest.approx(1 / (2 * math.sqrt(math.pi)), rel=1e-15)


def test_image_embedding_mean_and_index():
    model = AppearanceModel(n_images=3)
    w = model.image_embeddings.weight.detach()
    torch.testing.assert_close(model.image_embedding("mean"), w.mean(0))
    torch.testing.assert_close(model.image_embedding(1), w[1])
    torch.testing.assert_close(model.image_embedding(6), w[2])  # reference: min(6, N - 1)
    with pytest.raises(ValueError):
        model.image_embedding(-1)
    with pytest.raises(ValueError):
        model.image_embedding("median")  # type: ignore[arg-type]
    sh = torch.rand(4, 1, 3)
    g = torch.randn(4, 24)
    torch.testing.assert_close(model(sh, g, 1), model(sh, g, model.image_embedding(1)))
    mean_out = model(sh, g, model.image_embedding("mean"))
    assert not torch.allclose(mean_out, model(sh, g, 0))
    with pytest.raises(IndexError):
        model(sh, g, 3)  # forward does not clamp: a training index must exist


def test_gradients_reach_mlp_image_and_gaussian_embeddings():
    torch.manual_seed(5)
    model = AppearanceModel(n_images=3)
    sh = (torch.rand(6, 4, 3) * 0.5).requires_grad_(True)
    g = torch.randn(6, 24, requires_grad=True)
    model(sh, g, 1).square().sum().backward()
    for p in model.mlp.parameters():
        assert p.grad is not None and p.grad.abs().sum().item() > 0
    grad_w = model.image_embeddings.weight.grad
    assert grad_w[1].abs().sum().item() > 0
    assert grad_w[0].abs().sum().item() == 0 and grad_w[2].abs().sum().item() == 0
    assert g.grad is not None and g.grad.abs().sum().item() > 0
    assert sh.grad is not None and sh.grad.abs().sum().item() > 0


def test_param_groups():
    model = AppearanceModel(n_images=2)
    groups = model.param_groups()
    assert [(gr["name"], gr["lr"]) for gr in groups] == [
        ("appearance_embeddings", 1e-3),
        ("appearance_mlp", 5e-4),
    ]
    ids = [id(p) for gr in groups for p in gr["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    torch.optim.Adam(groups, eps=1e-15)  # accepted as-is by the optimizer


def test_compiled_appearance_gives_the_same_losses(tiny_tile, tmp_path, tiny_config):
    """``--stage1.compile appearance`` (a GPU speed option) trains the same run up to float rounding."""
    import dataclasses

    from torch._dynamo.utils import counters

    from skyfall.train.loop import Trainer
    from skyfall.train.stage1 import stage1_phase

    counters.clear()
    losses = {}
    for mode in ("none", "appearance"):
        cfg = dataclasses.replace(tiny_config.stage1, compile=mode)
        tr = Trainer(cfg, tiny_tile, tmp_path / mode, progress=False)
        tr.init_from_points()
        phase = stage1_phase(tr)
        tr.strategy_state = phase.strategy.initialize_state()
        losses[mode] = [tr.train_step(it, phase).read()["loss"] for it in range(1, 5)]
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled modulation ran
    assert losses["appearance"] == pytest.approx(losses["none"], abs=1e-6, rel=0)

"""The pure-torch backend against a brute-force per-pixel renderer written here (float64).

The brute force projects in world space with gsplat 1.5.3's formulas (no re-centring shear) and
composites every pixel front to back with the CUDA kernel's rules, with autograd for gradients.
Each pixel gets its own copy of means2d so that the per-pixel |dL/d means2d| (absgrad) is exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
from skyfall.render import render

F64 = torch.float64


def brute_project(means, quats, scales, opacities, viewmat, K, W, H, eps2d, antialiased, near=0.01, far=1e10):
    """gsplat's EWA projection for one camera in world space; returns means2d, conics, depths, opac, radii."""
    q = torch.nn.functional.normalize(quats, dim=-1)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
    M = R * torch.exp(scales)[:, None, :]
    cov = M @ M.transpose(-1, -2)
    Rc, t = viewmat[:3, :3], viewmat[:3, 3]
    pc = means @ Rc.T + t
    covc = Rc @ cov @ Rc.T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    px, py, pz = pc.unbind(-1)
    limxp, limxn = (W - cx) / fx + 0.3 * 0.5 * W / fx, cx / fx + 0.3 * 0.5 * W / fx
    limyp, limyn = (H - cy) / fy + 0.3 * 0.5 * H / fy, cy / fy + 0.3 * 0.5 * H / fy
    tx = pz * torch.clamp(px / pz, -limxn, limxp)
    ty = pz * torch.clamp(py / pz, -limyn, limyp)
    zero = torch.zeros_like(pz)
    J = torch.stack(
        [
            torch.stack([fx / pz, zero, -fx * tx / pz**2], -1),
            torch.stack([zero, fy / pz, -fy * ty / pz**2], -1),
        ],
        -2,
    )
    c2 = J @ covc @ J.transpose(-1, -2)
    det0 = c2[:, 0, 0] * c2[:, 1, 1] - c2[:, 0, 1] ** 2
    c2 = c2 + eps2d * torch.eye(2, dtype=c2.dtype)
    det = c2[:, 0, 0] * c2[:, 1, 1] - c2[:, 0, 1] ** 2
    conics = torch.stack([c2[:, 1, 1] / det, -c2[:, 0, 1] / det, c2[:, 0, 0] / det], -1)
    m2d = torch.stack([fx * px / pz + cx, fy * py / pz + cy], -1)
    op = torch.sigmoid(opacities)
    if antialiased:
        op = op * torch.sqrt(torch.clamp_min(det0 / det, 0))
    ext = torch.clamp_max(torch.sqrt(2 * torch.log(op.detach() * 255)), 3.33)
    rx = torch.ceil(ext * c2[:, 0, 0].detach().sqrt())
    ry = torch.ceil(ext * c2[:, 1, 1].detach().sqrt())
    mx, my = m2d.detach().unbind(-1)
    ok = (pz >= near) & (pz <= far) & (det > 0) & (op.detach() >= 1 / 255)
    ok &= (mx + rx > 0) & (mx - rx < W) & (my + ry > 0) & (my - ry < H)
    radii = (torch.maximum(rx, ry) * ok).to(torch.int32)
    return m2d, conics, pz, op, radii


def brute_steps(m2d_pp, conics, depths, opac, radii, W, H):
    """Walk the Gaussians front to back over all pixels with gsplat's alpha and cut-off rules.

    m2d_pp is [H*W, N, 2] (one copy per pixel). Yields (Gaussian i, alpha [HW], T before [HW],
    T after [HW], contributes [HW]); ``brute_steps.done`` holds the pixels that hit the cut-off.
    """
    jj, ii = torch.meshgrid(torch.arange(W, dtype=F64), torch.arange(H, dtype=F64), indexing="xy")
    pxy = torch.stack([jj.reshape(-1), ii.reshape(-1)], -1) + 0.5  # [HW, 2]
    T = torch.ones(H * W, dtype=F64)
    done = torch.zeros(H * W, dtype=torch.bool)
    for i in torch.argsort(depths.detach()).tolist():
        if radii[i] <= 0:
            continue
        d = m2d_pp[:, i] - pxy
        a, b, c = conics[i]
        s = 0.5 * (a * d[:, 0] ** 2 + c * d[:, 1] ** 2) + b * d[:, 0] * d[:, 1]
        al = torch.clamp_max(opac[i] * torch.exp(-s), 0.999)
        use = (s >= 0) & (al >= 1 / 255) & ~done
        nT = T * (1 - al)
        stop = use & (nT <= 1e-4)
        done = done | stop
        use = use & ~stop
        yield i, al, T, nT, use
        T = torch.where(use, nT, T)
    brute_steps.done, brute_steps.T = done, T


def brute_composite(m2d_pp, conics, depths, opac, feats, radii, W, H, bg=None):
    """Per-pixel front-to-back compositing; m2d_pp is [H*W, N, 2] (one copy per pixel)."""
    out = torch.zeros(H * W, feats.shape[-1], dtype=F64)
    for i, al, T, _, use in brute_steps(m2d_pp, conics, depths, opac, radii, W, H):
        out = out + torch.where(use[:, None], (al * T)[:, None] * feats[i], torch.zeros_like(out))
    T = brute_steps.T
    if bg is not None:
        out = out + T[:, None] * bg
    brute_composite.n_cut = int(brute_steps.done.sum())  # pixels that hit the T cut-off (for test coverage)
    return out.reshape(H, W, -1), (1 - T).reshape(H, W, 1)


def make_scene(n, W, H, seed=0, sh_k=None, opa=(0.2, 0.95), spread=1.1):
    g = torch.Generator().manual_seed(seed)
    z = 2 + 3 * torch.rand(n, generator=g, dtype=F64)
    xy = (
        (torch.rand(n, 2, generator=g, dtype=F64) - 0.5)
        * z[:, None]
        * torch.tensor([1.0, H / W], dtype=F64)
        * spread
    )
    means = torch.cat([xy, z[:, None]], 1)
    quats = torch.randn(n, 4, generator=g, dtype=F64)
    scales = math.log(0.03) + (math.log(0.4) - math.log(0.03)) * torch.rand(n, 3, generator=g, dtype=F64)
    o = opa[0] + (opa[1] - opa[0]) * torch.rand(n, generator=g, dtype=F64)
    opac = torch.log(o / (1 - o))
    if sh_k is None:
        colors = torch.rand(n, 3, generator=g, dtype=F64)
    else:
        colors = 0.4 * torch.randn(n, sh_k, 3, generator=g, dtype=F64)
    K = torch.tensor([[1.1 * W, 0, W / 2 + 1.3], [0, 1.05 * W, H / 2 - 0.7], [0, 0, 1]], dtype=F64)
    return means, quats, scales, opac, colors, K


def brute_render(means, quats, scales, opac, rgb, viewmat, K, W, H, antialiased, bg=None, eps2d=0.1):
    m2d, con, z, op, radii = brute_project(means, quats, scales, opac, viewmat, K, W, H, eps2d, antialiased)
    m2d_pp = m2d[None].expand(H * W, -1, -1)
    feats = torch.cat([rgb, z[:, None]], -1)
    bgf = None if bg is None else torch.cat([bg, bg.new_zeros(1)])
    img, alpha = brute_composite(m2d_pp, con, z, op, feats, radii, W, H, bgf)
    return img, alpha, m2d_pp, radii


def sh_colors_brute(sh, degree, means, viewmat):
    from skyfall.render.sh import sh_to_rgb

    campos = -viewmat[:3, :3].T @ viewmat[:3, 3]
    return sh_to_rgb(degree, means - campos, sh)


@pytest.mark.parametrize(
    "mode,sh_degree,use_bg,opaque",
    [
        ("antialiased", None, False, False),
        ("classic", None, True, False),
        ("antialiased", 0, True, False),
        ("antialiased", 1, False, False),
        ("antialiased", None, True, True),
        ("classic", 1, False, True),
    ],
)
def test_matches_brute_force_values_and_grads(
    mode, sh_degree, use_bg, opaque, monkeypatch: pytest.MonkeyPatch
):
    W, H = 37, 29
    sh_k = None if sh_degree is None else 4
    opa = (0.9, 0.995) if opaque else (0.2, 0.95)
    means, quats, scales, opac, colors, K = make_scene(
        80 if opaque else 40, W, H, seed=1, sh_k=sh_k, opa=opa, spread=0.5 if opaque else 1.1
    )
    if opaque:
        # small depth chunks: the T cut-off state must carry over from chunk to chunk
        import skyfall.render.composite as composite

        monkeypatch.setattr(composite, "DEFAULT_MAX_PAIRS", 400)
    c2w = look_at(
        torch.tensor([0.3, -0.2, -0.5]), torch.tensor([0.0, 0.0, 3.0]), up=torch.tensor([0.0, -1.0, 0.0])
    )
    viewmat = Cameras(c2w, K, W, H).viewmats[0]
    bg = torch.tensor([0.2, 0.5, 0.9], dtype=F64) if use_bg else None
    g = torch.Generator().manual_seed(7)
    wc, wd, wa = (torch.randn(H, W, k, generator=g, dtype=F64) for k in (3, 1, 1))

    params = [p.clone().requires_grad_(True) for p in (means, quats, scales, opac, colors)]
    out = render(
        *params,
        viewmat[None],
        K[None],
        W,
        H,
        sh_degree=sh_degree,
        backgrounds=bg,
        rasterize_mode=mode,
        backend="torch",
    )
    loss = (out.colors[0] * wc).sum() + (out.depths[0] * wd).sum() + (out.alphas[0] * wa).sum()
    loss.backward()

    bparams = [p.clone().requires_grad_(True) for p in (means, quats, scales, opac, colors)]
    rgb = bparams[4] if sh_degree is None else sh_colors_brute(bparams[4], sh_degree, bparams[0], viewmat)
    img, alpha, m2d_pp, radii = brute_render(*bparams[:4], rgb, viewmat, K, W, H, mode == "antialiased", bg)
    m2d_pp.retain_grad()
    bloss = (img[..., :3] * wc).sum() + (img[..., 3:] * wd).sum() + (alpha * wa).sum()
    bloss.backward()

    assert out.backend == "torch"
    assert 0.2 < alpha.mean() < 0.999  # the scene is not empty
    assert (brute_composite.n_cut > 20) == opaque  # the opaque scenes exercise the T cut-off
    torch.testing.assert_close(out.colors[0], img[..., :3], atol=1e-10, rtol=0)
    torch.testing.assert_close(out.depths[0], img[..., 3:], atol=1e-9, rtol=0)
    torch.testing.assert_close(out.alphas[0], alpha, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        out.expected_depths[0], img[..., 3:] / alpha.clamp_min(1e-10), atol=1e-8, rtol=1e-9
    )
    torch.testing.assert_close(out.radii[0], radii)
    for p, b in zip(params, bparams, strict=True):
        torch.testing.assert_close(p.grad, b.grad, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(out.means2d.grad[0], m2d_pp.grad.sum(0), atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(out.means2d.absgrad[0], m2d_pp.grad.abs().sum(0), atol=1e-9, rtol=1e-8)


def test_transmittance_cutoff_is_exclusive():
    """Three opaque Gaussians on one pixel: T after two is 1e-6 <= 1e-4, so the second is skipped."""
    W = H = 9
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 4.0]], dtype=F64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 3, dtype=F64)
    scales = torch.full((3, 3), math.log(0.5), dtype=F64)
    opac = torch.full((3,), 20.0, dtype=F64)  # sigmoid -> ~1: alpha clamps at 0.999 at the centre
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=F64)
    K = torch.tensor([[10.0, 0, 4.5], [0, 10.0, 4.5], [0, 0, 1]], dtype=F64)
    out = render(
        means,
        quats,
        scales,
        opac,
        rgb,
        torch.eye(4, dtype=F64)[None],
        K[None],
        W,
        H,
        rasterize_mode="classic",
        backend="torch",
    )
    c = out.colors[0, 4, 4]
    # first Gaussian 0.999 -> T = 1e-3; the second would give T = 1e-6 <= 1e-4, so the pixel stops there
    torch.testing.assert_close(c, torch.tensor([0.999, 0.0, 0.0], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.alphas[0, 4, 4, 0], torch.tensor(0.999, dtype=F64), atol=1e-12, rtol=0)


def test_single_isotropic_gaussian_centre_pixel():
    """Centre pixel = opacity * compensation * colour; depth = o * comp * z."""
    W, H = 21, 17
    z = 3.0
    fx = 40.0
    K = torch.tensor([[fx, 0, 10.5], [0, fx, 8.5], [0, 0, 1]], dtype=F64)
    s = 0.05
    means = torch.tensor([[0.0, 0.0, z]], dtype=F64)
    quats = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=F64)  # isotropic: the rotation is irrelevant
    scales = torch.full((1, 3), math.log(s), dtype=F64)
    o = 0.7
    opac = torch.tensor([math.log(o / (1 - o))], dtype=F64)
    rgb = torch.tensor([[0.2, 0.6, 0.9]], dtype=F64)
    out = render(
        means,
        quats,
        scales,
        opac,
        rgb,
        torch.eye(4, dtype=F64)[None],
        K[None],
        W,
        H,
        eps2d=0.1,
        backend="torch",
    )
    var = (fx * s / z) ** 2
    comp = math.sqrt(var * var / ((var + 0.1) ** 2))
    torch.testing.assert_close(out.colors[0, 8, 10], rgb[0] * o * comp, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.alphas[0, 8, 10, 0], torch.tensor(o * comp, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        out.depths[0, 8, 10, 0], torch.tensor(o * comp * z, dtype=F64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        out.expected_depths[0, 8, 10, 0], torch.tensor(z, dtype=F64), atol=1e-12, rtol=0
    )
    expected_r = math.ceil(min(3.33, math.sqrt(2 * math.log(o * comp * 255))) * math.sqrt(var + 0.1))
    assert out.radii[0, 0].item() == expected_r


def test_gradcheck_tiny_scene():
    W, H = 13, 11
    means, quats, scales, opac, colors, K = make_scene(6, W, H, seed=3, opa=(0.2, 0.6))
    vm = torch.eye(4, dtype=F64)[None]
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=F64)

    def f(m, q, s, o, c):
        out = render(m, q, s, o, c, vm, K[None], W, H, backgrounds=bg, backend="torch")
        return out.colors, out.depths, out.alphas

    inputs = tuple(x.clone().requires_grad_(True) for x in (means, quats, scales, opac, colors))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_satellite_camera_lands_on_the_right_pixel():
    """700 km away, fx ~ 4e6 px, principal point ~4e5 px off the image: float64 preparation."""
    W, H = 64, 48
    target = torch.tensor([120.0, -80.0, 15.0], dtype=F64)
    eye = target + torch.tensor([2.0e5, -1.5e5, 6.5e5], dtype=F64)
    c2w = look_at(eye, torch.tensor([0.0, 0.0, 0.0], dtype=F64))
    fx = 4.1e6
    K = torch.tensor([[fx, 0, -3.9e5], [0, fx * 1.01, 2.2e5], [0, 0, 1]], dtype=F64)
    cams = Cameras(c2w, K, W, H)
    # move the principal point so that `target` projects to a known in-image spot
    uv, _ = cams.project(target[None])
    K[0, 2] += 20.3 - uv[0, 0, 0]
    K[1, 2] += 30.6 - uv[0, 0, 1]
    cams = Cameras(c2w, K, W, H)
    uv, depth = cams.project(target[None])
    means = target[None].float().requires_grad_(True)  # float32 world coordinates (small: ENU tile)
    quats = torch.tensor([[1.0, 0, 0, 0]])
    scales = torch.full((1, 3), math.log(0.6))  # ~0.6 m: a few pixels at ~0.17 m/px
    opac = torch.tensor([2.0])
    rgb = torch.tensor([[1.0, 1.0, 1.0]])
    out = render(means, quats, scales, opac, rgb, cams.viewmats, cams.Ks, W, H, backend="torch")
    assert out.means2d.dtype == torch.float32
    torch.testing.assert_close(out.means2d[0, 0].double(), uv[0, 0], atol=2e-3, rtol=0)
    img = out.alphas[0, ..., 0]
    peak = torch.nonzero(img == img.max())[0]
    assert (peak[0].item(), peak[1].item()) == (30, 20)
    torch.testing.assert_close(out.expected_depths[0, 30, 20, 0].double(), depth[0, 0], atol=0.2, rtol=0)
    out.colors.sum().backward()
    assert torch.isfinite(means.grad).all() and means.grad.abs().sum() > 0


def test_intrinsics_fov_camera_and_culling():
    """Gaussians behind the near plane or off-image are culled (radius 0) and do not render."""
    W, H = 32, 24
    K = intrinsics_from_fov(60.0, W, H)
    means = torch.tensor([[0.0, 0.0, 0.005], [0.0, 0.0, -2.0], [50.0, 0.0, 2.0], [0.0, 0.0, 2.0]], dtype=F64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 4, dtype=F64)
    scales = torch.full((4, 3), math.log(0.05), dtype=F64)
    opac = torch.zeros(4, dtype=F64)
    rgb = torch.rand(4, 3, dtype=F64)
    out = render(
        means, quats, scales, opac, rgb, torch.eye(4, dtype=F64)[None], K[None], W, H, backend="torch"
    )
    assert out.visible[0].tolist() == [False, False, False, True]
    assert out.radii.dtype == torch.int32


def test_row_bands_give_identical_results(monkeypatch: pytest.MonkeyPatch):
    """Splitting the pair list into row bands (the memory bound) changes nothing."""
    import skyfall.render.composite as composite

    W, H = 45, 38
    means, quats, scales, opac, colors, K = make_scene(60, W, H, seed=4)
    vm = torch.eye(4, dtype=F64)[None]

    def run():
        ps = [p.clone().requires_grad_(True) for p in (means, quats, scales, opac, colors)]
        out = render(*ps, vm, K[None], W, H, backend="torch")
        (out.colors.sum() + out.depths.sum()).backward()
        return out, [p.grad for p in ps]

    ref, ref_grads = run()
    monkeypatch.setattr(composite, "DEFAULT_MAX_PAIRS", 500)
    banded, grads = run()
    torch.testing.assert_close(banded.colors, ref.colors, atol=1e-13, rtol=0)
    torch.testing.assert_close(banded.alphas, ref.alphas, atol=1e-13, rtol=0)
    torch.testing.assert_close(banded.means2d.absgrad, ref.means2d.absgrad, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def brute_median_depth(m2d, conics, depths, opac, radii, W, H, normalized=False):
    """Per pixel: depth of the Gaussian after which T <= level (gsplat's alpha/cut-off rules); NaN if none.

    The level is 0.5, or (1 + T_final) / 2 with ``normalized`` (found by a first pass)."""
    m2d_pp = m2d[None].expand(H * W, -1, -1)

    def sweep(level):
        med = torch.full((H * W,), math.nan, dtype=F64)
        for i, _, T, nT, use in brute_steps(m2d_pp, conics, depths, opac, radii, W, H):
            med = torch.where(use & (T > level) & (nT <= level), depths[i], med)
        return med, brute_steps.T

    _, t_final = sweep(torch.full((H * W,), 0.5, dtype=F64))
    level = (1 + t_final) / 2 if normalized else torch.full((H * W,), 0.5, dtype=F64)
    med, t_final = sweep(level)
    return med.reshape(H, W), (1 - t_final).reshape(H, W)


@pytest.mark.parametrize("max_pairs,normalized", [(None, False), (300, False), (None, True), (300, True)])
def test_median_depth_matches_brute_force(max_pairs, normalized, monkeypatch: pytest.MonkeyPatch):
    from skyfall.render import render_median_depth

    if max_pairs is not None:
        import skyfall.render.composite as composite

        monkeypatch.setattr(composite, "DEFAULT_MAX_PAIRS", max_pairs)
    W, H = 41, 33
    means, quats, scales, opac, _, K = make_scene(70, W, H, seed=5, opa=(0.3, 0.99), spread=0.8)
    vm = torch.eye(4, dtype=F64)[None]
    med, alpha = render_median_depth(means, quats, scales, opac, vm, K[None], W, H, normalized=normalized)
    med, alpha = med[0, ..., 0], alpha[0, ..., 0]
    m2d, con, z, op, radii = brute_project(means, quats, scales, opac, vm[0], K, W, H, 0.1, True)
    ref, ref_alpha = brute_median_depth(
        m2d.detach(), con.detach(), z.detach(), op.detach(), radii, W, H, normalized
    )
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-10, rtol=0)
    finite = torch.isfinite(ref)
    if normalized:  # defined wherever anything is rendered
        assert torch.equal(finite, ref_alpha > 0) and finite.float().mean() > 0.9
    else:  # only where T reaches 0.5
        assert 0.3 < finite.float().mean() < 0.9
    assert torch.equal(torch.isfinite(med), finite)
    torch.testing.assert_close(med[finite], ref[finite], atol=1e-12, rtol=0)
    # a median depth is one Gaussian's depth, unlike the alpha-normalised expected depth
    assert set(med[finite].tolist()) <= set(z.tolist())

"""Covisibility from analytic depth maps (ray-plane intersections) and pair ranking on hand matrices."""

from __future__ import annotations

import math

import pytest
import torch

from skyfall.data.cameras import look_at
from skyfall.data.covisibility import covisibility, pair_scores, rank_pairs

F64 = torch.float64


def intrinsics(f: float, w: int, h: int, *, cx: float | None = None, cy: float | None = None, skew=0.0):
    cx = w / 2 if cx is None else cx
    cy = h / 2 if cy is None else cy
    return torch.tensor([[f, skew, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=F64)


def nadir(x: float, y: float, z: float) -> torch.Tensor:
    """Camera at (x, y, z) looking straight down: image x = world east, image y = world south."""
    c2w = torch.eye(4, dtype=F64)
    c2w[:3, :3] = torch.tensor([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]], dtype=F64)
    c2w[:3, 3] = torch.tensor([x, y, z], dtype=F64)
    return c2w


def plane(normal, offset):
    """Surface {X : n . X = offset}, unbounded."""
    n = torch.as_tensor(normal, dtype=F64)

    def hit(o, d):
        return (offset - o @ n) / (d @ n)

    return hit


def wall(x_w: float, height: float):
    """Vertical wall x = x_w from the ground up to ``height``, unbounded along y."""

    def hit(o, d):
        t = (x_w - o[0]) / d[:, 0]
        z = o[2] + t * d[:, 2]
        return torch.where((z >= 0) & (z <= height), t, torch.full_like(t, math.inf))

    return hit


def render_depth(c2w, K, h, w, surfaces):
    """Camera-space z depth of the nearest surface through each pixel centre (inf: no hit)."""
    v, u = torch.meshgrid(torch.arange(h, dtype=F64) + 0.5, torch.arange(w, dtype=F64) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)
    rays = torch.linalg.solve(K, pix.T).T  # z = 1, so the ray parameter is the z depth
    d = rays @ c2w[:3, :3].T
    o = c2w[:3, 3]
    best = torch.full((h * w,), math.inf, dtype=F64)
    for surface in surfaces:
        t = surface(o, d)
        t = torch.where(torch.isfinite(t) & (t > 1e-9), t, torch.full_like(t, math.inf))
        best = torch.minimum(best, t)
    return best.reshape(h, w)


def scene(cams, surfaces, h, w):
    """(depths, valid, Ks, camtoworlds) for [(c2w, K), ...] over the given surfaces."""
    depths = torch.stack([render_depth(c2w, K, h, w, surfaces) for c2w, K in cams])
    valid = torch.isfinite(depths)
    Ks = torch.stack([K for _, K in cams])
    c2ws = torch.stack([c2w for c2w, _ in cams])
    return depths, valid, Ks, c2ws


def random_plane_scene(n: int = 5, h: int = 48, w: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.tensor([0.2, -0.1, 1.0], dtype=F64)
    surfaces = [plane(normal, 3.0)]
    cams = []
    for k in range(n):
        az = 2 * math.pi * float(torch.rand((), generator=g, dtype=F64))
        el = math.radians(35 + 50 * float(torch.rand((), generator=g, dtype=F64)))
        r = 80 + 60 * float(torch.rand((), generator=g, dtype=F64))
        eye = torch.tensor(
            [r * math.cos(el) * math.cos(az), r * math.cos(el) * math.sin(az), r * math.sin(el)]
        )
        target = torch.cat([20 * (torch.rand(2, generator=g, dtype=F64) - 0.5), torch.tensor([3.0])])
        K = intrinsics(55.0 + 5 * k, w, h, cx=w / 2 + 3 * k, cy=h / 2 - 2 * k, skew=0.7 * k)
        cams.append((look_at(eye, target), K))
    return scene(cams, surfaces, h, w)


# ---------------------------------------------------------------------------------------- covisibility


def test_view_sees_itself_and_its_duplicate_exactly():
    depths, valid, Ks, c2ws = random_plane_scene()
    # View 5 repeats view 2 (a view with skew and an off-centre principal point), so the depth test
    # itself, not only the C[i, i] = 1 convention, must give exactly 1.
    depths, valid = torch.cat([depths, depths[2:3]]), torch.cat([valid, valid[2:3]])
    Ks, c2ws = torch.cat([Ks, Ks[2:3]]), torch.cat([c2ws, c2ws[2:3]])
    assert valid.all(), "every pixel of the random plane scene sees the plane"
    C = covisibility(depths, valid, Ks, c2ws)
    assert C.dtype == torch.float64 and C.shape == (6, 6)
    assert torch.equal(C.diag(), torch.ones(6, dtype=F64))
    assert C[2, 5].item() == 1.0 and C[5, 2].item() == 1.0
    assert ((C >= 0) & (C <= 1)).all()
    assert (C[:5, :5] < 1).sum() > 0, "distinct random views do not all cover each other"


def test_view_without_valid_pixels_has_empty_row_and_column():
    depths, valid, Ks, c2ws = random_plane_scene(n=3)
    valid[1] = False
    C = covisibility(depths, valid, Ks, c2ws)
    assert C[1].abs().sum().item() == 0.0
    assert C[:, 1].abs().sum().item() == 0.0
    assert C[0, 0].item() == 1.0 and C[2, 2].item() == 1.0


def test_disjoint_views_have_zero_overlap_both_ways():
    K = intrinsics(32.0, 32, 32)
    depths, valid, Ks, c2ws = scene(
        [(nadir(0, 0, 50), K), (nadir(1000, 0, 50), K)], [plane([0, 0, 1], 0.0)], 32, 32
    )
    C = covisibility(depths, valid, Ks, c2ws)
    assert torch.equal(C, torch.eye(2, dtype=F64))


# Wall test geometry, chosen so that every boundary falls half an A-pixel away from A's pixel centres:
# A: nadir at (0, 0, 50), f = 32 px, 32 x 32 px, so it sees the ground x, y in [-25, 25] and column c at
#    ground x = (c + 0.5 - 16) * 50 / 32; the wall at x = -30 stays outside A's frustum at every height.
# B: at (-60, 0, 60) looking at the origin (45 degrees down), 256 x 256 px, f = 200 px.
# The wall's top edge hides from B the ground between x = -30 and the shadow end
#    x_s = (Z_B * x_w - h_w * x_B) / (Z_B - h_w) = -18.75   for h_w = 675 / 41.25,
# which is the border between A's columns 3 and 4: columns 0..3 (4 of 32) are hidden.
WALL_X, WALL_H = -30.0, 675.0 / 41.25


def wall_scene(with_wall: bool):
    cam_a = (nadir(0, 0, 50), intrinsics(32.0, 32, 32))
    c2w_b = look_at(torch.tensor([-60.0, 0.0, 60.0]), torch.zeros(3))
    surfaces = [plane([0, 0, 1], 0.0)] + ([wall(WALL_X, WALL_H)] if with_wall else [])
    depth_a = render_depth(*cam_a, 32, 32, surfaces)
    depth_b = render_depth(c2w_b, intrinsics(200.0, 256, 256), 256, 256, surfaces)
    # One [N, H, W] stack needs one size: A is embedded top-left in a 256 x 256 canvas with K
    # unchanged, the rest invalid.
    canvas = torch.full((256, 256), math.inf, dtype=F64)
    canvas[:32, :32] = depth_a
    depths = torch.stack([canvas, depth_b])
    Ks = torch.stack([cam_a[1], intrinsics(200.0, 256, 256)])
    return depths, torch.isfinite(depths), Ks, torch.stack([cam_a[0], c2w_b])


def test_wall_occludes_hand_computed_fraction():
    x_shadow = (60 * WALL_X - WALL_H * (-60)) / (60 - WALL_H)
    assert x_shadow == pytest.approx(-18.75)
    hidden_columns = sum(1 for c in range(32) if (c + 0.5 - 16) * 50 / 32 < x_shadow)
    assert hidden_columns == 4

    C_open = covisibility(*wall_scene(with_wall=False))
    assert C_open[0, 1].item() == 1.0, "without the wall B sees all of A's footprint"

    C = covisibility(*wall_scene(with_wall=True))
    expected = 1 - hidden_columns / 32
    assert abs(C[0, 1].item() - expected) <= 1 / (32 * 32)
    assert C[0, 1].item() == 0.875
    # B also sees the wall face and ground far beyond A's footprint.
    assert 0 < C[1, 0].item() < 0.5


def zoom_scene():
    """A wide and a 4x zoomed nadir view from the same spot over flat ground."""
    ground = [plane([0, 0, 1], 0.0)]
    wide = (nadir(0, 0, 50), intrinsics(32.0, 32, 32))
    narrow = (nadir(0, 0, 50), intrinsics(128.0, 32, 32))
    return scene([wide, narrow], ground, 32, 32)


def test_zoomed_view_inside_wide_view_is_asymmetric():
    C = covisibility(*zoom_scene())
    # The narrow view's 12.5 m square sits inside the wide view's 50 m square; the wide view's pixel
    # centres inside that square are columns and rows 12..19: 8 x 8 of 32 x 32 = 1/16 (the area ratio).
    assert C[1, 0].item() == 1.0
    assert C[0, 1].item() == 1 / 16
    assert pair_scores(C)[0, 1].item() == pytest.approx((1 + 1 / 16) ** 2 / (4 / 16))


def test_invalid_depth_is_skipped_on_both_sides():
    depths, valid, Ks, c2ws = zoom_scene()
    depths[1, :, :16] = math.nan  # the narrow view's left half has no depth...
    depths[0, 0, 0] = 0.0  # ...and one wide pixel has none either; valid stays True for both
    valid[0, 31, :] = False  # the wide view's last row is masked out
    C = covisibility(depths, valid, Ks, c2ws)
    # Wide: 32 * 31 - 1 valid pixels; only its 8 x 4 block over the narrow view's valid half counts.
    assert C[0, 1].item() == 32 / (32 * 31 - 1)
    # Narrow: its valid half all lands on valid wide pixels.
    assert C[1, 0].item() == 1.0


def test_stride_estimates_full_resolution_overlap():
    cams = [
        (nadir(0, 0, 60), intrinsics(40.0, 64, 64)),
        (nadir(17, -9, 70), intrinsics(48.0, 64, 64, skew=1.5)),
        (look_at(torch.tensor([-70.0, 10.0, 55.0]), torch.tensor([5.0, 0.0, 0.0])), intrinsics(60.0, 64, 64)),
        (look_at(torch.tensor([40.0, 60.0, 45.0]), torch.tensor([0.0, 8.0, 0.0])), intrinsics(52.0, 64, 64)),
    ]
    data = scene(cams, [plane([0, 0, 1], 0.0), wall(-20.0, 12.0)], 64, 64)
    full = covisibility(*data, stride=1)
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    assert full[off_diagonal].min() > 0.05, "every pair overlaps, so the comparison says something"
    for stride in (2, 3, 4):
        sub = covisibility(*data, stride=stride)
        # A region bounded by a few straight edges: each edge shifts the sampled fraction by at most
        # about stride / 64 of the image.
        err = (sub - full).abs().max().item()
        assert err <= 2 * stride / 64, (stride, err)


def reference_covisibility(depths, valid, Ks, c2ws, rel_tol=0.01, abs_tol=0.05):
    """Plain per-pair version through world coordinates: no culling, no chunking."""
    n, h, w = depths.shape
    ok = valid & torch.isfinite(depths) & (depths > 0)
    C = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        vv, uu = torch.nonzero(ok[i], as_tuple=True)
        if vv.numel() == 0:
            continue
        pix = torch.stack([uu + 0.5, vv + 0.5, torch.ones_like(uu, dtype=F64)]).to(F64)
        cam = torch.linalg.inv(Ks[i]) @ pix * depths[i, vv, uu]
        world = c2ws[i, :3, :3] @ cam + c2ws[i, :3, 3:]
        for j in range(n):
            if i == j:
                C[i, j] = 1.0
                continue
            w2c = torch.linalg.inv(c2ws[j])
            pc = w2c[:3, :3] @ world + w2c[:3, 3:]
            z = pc[2]
            uv = (Ks[j] @ pc)[:2] / z
            seen = 0
            for k in range(world.shape[1]):
                u, v = uv[0, k].item(), uv[1, k].item()
                if not (z[k] > 0 and 0 <= u < w and 0 <= v < h):
                    continue
                if not ok[j, int(v), int(u)]:
                    continue
                if abs(z[k].item() - depths[j, int(v), int(u)].item()) <= abs_tol + rel_tol * z[k].item():
                    seen += 1
            C[i, j] = seen / world.shape[1]
    return C


def test_matches_a_plain_per_pixel_reference():
    cams = [
        (nadir(0, 0, 40), intrinsics(20.0, 20, 16)),
        (look_at(torch.tensor([-45.0, 5.0, 35.0]), torch.tensor([0.0, 0.0, 0.0])), intrinsics(18.0, 20, 16)),
        (
            look_at(torch.tensor([30.0, -30.0, 25.0]), torch.tensor([-5.0, 3.0, 0.0])),
            intrinsics(22.0, 20, 16, skew=0.8),
        ),
        (nadir(500, 0, 40), intrinsics(20.0, 20, 16)),  # far away: culled without projecting a point
        (
            look_at(
                torch.tensor([0.0, 0.0, 30.0]), torch.tensor([0.0, 0.0, 90.0]), torch.tensor([0.0, 1.0, 0.0])
            ),
            intrinsics(20.0, 20, 16),
        ),
    ]
    depths, valid, Ks, c2ws = scene(cams, [plane([0, 0, 1], 0.0), wall(-12.0, 9.0)], 16, 20)
    assert not valid[4].any(), "the upward-looking view sees no surface"
    expected = reference_covisibility(depths, valid, Ks, c2ws)
    got = covisibility(depths, valid, Ks, c2ws)
    assert (expected[:3, :3] > 0.1).all() and (expected[:3, :3] < 1).any()
    assert expected[3, :3].sum() == 0 and expected[:3, 3].sum() == 0
    # Different arithmetic paths may round a point sitting on a pixel border differently: at most one.
    assert (got - expected).abs().max().item() <= 1 / (16 * 20)
    assert (got == expected).float().mean().item() >= 0.9


def test_chunking_never_changes_the_result():
    data = random_plane_scene(n=4, h=24, w=32, seed=3)
    reference = covisibility(*data)
    assert (reference > 0).sum() > 4
    for chunk in (37, 500, 1024, 5000):
        assert torch.equal(covisibility(*data, chunk=chunk), reference), chunk
    strided = covisibility(*data, stride=3)
    assert torch.equal(covisibility(*data, stride=3, chunk=11), strided)


def test_float32_inputs_give_the_float64_result():
    depths, valid, Ks, c2ws = random_plane_scene(n=3)
    C64 = covisibility(depths, valid, Ks, c2ws)
    C32 = covisibility(depths.float(), valid, Ks.float(), c2ws.float())
    assert C32.dtype == torch.float64
    assert (C32 - C64).abs().max().item() <= 2 / (48 * 64)


def test_bad_inputs_are_refused():
    depths, valid, Ks, c2ws = random_plane_scene(n=2)
    with pytest.raises(ValueError, match="stride"):
        covisibility(depths, valid, Ks, c2ws, stride=0)
    with pytest.raises(ValueError, match="valid"):
        covisibility(depths, valid[:, :-1], Ks, c2ws)
    with pytest.raises(ValueError, match="Ks"):
        covisibility(depths, valid, Ks[:1], c2ws)


# ------------------------------------------------------------------------------- pair scores / ranking

# Hand matrix: C[i, j] = fraction of view i seen by view j.
HAND = torch.tensor(
    [
        [1.0, 0.8, 0.5, 0.0],
        [0.4, 1.0, 0.05, 0.4],
        [0.5, 0.2, 1.0, 0.6],
        [0.2, 0.4, 0.9, 1.0],
    ],
    dtype=F64,
)


def test_pair_scores_is_am_over_hm():
    S = pair_scores(HAND)
    assert torch.equal(S.diag(), torch.ones(4, dtype=F64))
    assert S[0, 1].item() == pytest.approx(1.2**2 / (4 * 0.8 * 0.4))  # 1.125
    assert S[0, 1].item() == pytest.approx(1.125)
    assert S[0, 2].item() == 1.0 and S[1, 3].item() == 1.0  # symmetric overlap
    assert S[2, 3].item() == pytest.approx(1.5**2 / (4 * 0.6 * 0.9))
    assert S[1, 2].item() == pytest.approx(1.5625)  # ratio 4: (1 + 4)^2 / 16
    assert math.isnan(S[0, 3].item()) and math.isnan(S[3, 0].item())  # zero one way: no score
    finite = torch.isfinite(S)
    assert torch.equal(S[finite], S.T[finite])
    assert (S[finite] >= 1).all()


def test_rank_pairs_filters_and_orders():
    pairs = rank_pairs(HAND)
    # Weaker overlap first: (2,3) 0.6, (0,2) 0.5, then the 0.4 tie broken by score: (1,3) 1 < (0,1) 1.125.
    # (1,2) has 0.05 < min_overlap one way; (0,3) has 0 one way.
    assert [(i, j) for i, j, *_ in pairs] == [(2, 3), (0, 2), (1, 3), (0, 1)]
    i, j, cij, cji, s = pairs[0]
    assert (cij, cji) == (0.6, 0.9) and s == pytest.approx(2.25 / 2.16)
    assert pairs[3] == (0, 1, 0.8, 0.4, pytest.approx(1.125))

    assert [(i, j) for i, j, *_ in rank_pairs(HAND, min_overlap=0.45)] == [(2, 3), (0, 2)]
    assert [(i, j) for i, j, *_ in rank_pairs(HAND, max_pairs=2)] == [(2, 3), (0, 2)]
    assert rank_pairs(HAND, max_pairs=0) == []
    # min_overlap 0 admits (1,2) last; the zero-overlap pair (0,3) still has no score and stays out.
    assert [(i, j) for i, j, *_ in rank_pairs(HAND, min_overlap=0.0)] == [
        (2, 3),
        (0, 2),
        (1, 3),
        (0, 1),
        (1, 2),
    ]


def test_rank_pairs_cross_band_only():
    altitudes = [2.0, 1.5, 120.0, 300.0]  # two ground views, two aerial ones
    pairs = rank_pairs(HAND, altitudes=altitudes, bands=[50.0], cross_band_only=True)
    assert [(i, j) for i, j, *_ in pairs] == [(0, 2), (1, 3)]
    # A second edge puts views 2 and 3 in different bands, so (2,3) crosses bands too.
    pairs = rank_pairs(HAND, altitudes=torch.tensor(altitudes), bands=[50.0, 200.0], cross_band_only=True)
    assert [(i, j) for i, j, *_ in pairs] == [(2, 3), (0, 2), (1, 3)]
    # An altitude on an edge belongs to the band above it.
    pairs = rank_pairs(HAND, altitudes=[2.0, 1.5, 50.0, 300.0], bands=[50.0], cross_band_only=True)
    assert [(i, j) for i, j, *_ in pairs] == [(0, 2), (1, 3)]
    # Without cross_band_only the bands filter nothing.
    assert len(rank_pairs(HAND, altitudes=altitudes, bands=[50.0])) == 4


def test_rank_pairs_refuses_bad_options():
    with pytest.raises(ValueError, match="cross_band_only"):
        rank_pairs(HAND, cross_band_only=True)
    with pytest.raises(ValueError, match="together"):
        rank_pairs(HAND, altitudes=[0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="increasing"):
        rank_pairs(HAND, altitudes=[0.0, 1.0, 2.0, 3.0], bands=[50.0, 10.0], cross_band_only=True)
    with pytest.raises(ValueError, match="min_overlap"):
        rank_pairs(HAND, min_overlap=1.5)


def test_one_way_pairs_keep_aerial_ground_pairs():
    # view 0: street level, mostly visible from the aerial view 1, which it barely covers
    C = torch.tensor([[1.0, 0.85, 0.0], [0.0, 1.0, 0.3], [0.0, 0.4, 1.0]])
    assert [(i, j) for i, j, *_ in rank_pairs(C, min_overlap=0.1)] == [(1, 2)]
    one_way = rank_pairs(C, min_overlap=0.1, one_way=True)
    assert [(i, j) for i, j, *_ in one_way] == [(0, 1), (1, 2)]  # ordered by the stronger direction
    assert one_way[0][4] == float("inf")  # AM/HM is undefined one way: ranked last among equals

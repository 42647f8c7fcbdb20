"""True error of every ``skyfall prepare`` match on a synthetic RPC tile, and the adjustment's goals (issue #14).

A synthetic tile (``skyfall synth OUT --rpc``) can be ray-cast exactly, so every match can be
checked: a keypoint of the reference view is the centre of pixel (i, j); its ray through the exact
camera hits the city's surface at X (the tile's own ray caster), and the exact camera of the other
view projects X to the true match. The exact cameras are the pinholes ``prepare`` fits to the RPCs
(fit error ~1e-5 px on these RPCs) with the injected bias taken back out of the principal point, in
prepare's ENU frame, which has the synthetic tile's axes and an origin ``ANCHOR.h − h0`` metres
lower.

Per match the script also records what might explain its error, from per-pixel maps of each view
(the exact hit point, its primitive and normal, and whether the sun of every acquisition date
reaches it):

* ``dz``: the range of surface heights inside the reference correlation window (a depth edge);
* ``facade``: share of the window on vertical faces (the matcher's affine warp assumes a
  horizontal surface);
* ``shadow``: share of the window whose sun visibility differs between the two views' dates (a
  shadow edge that moves between acquisitions);
* ``occluded``: the true point is hidden in the searched view;
* the NCC score and the angle between the two views.

It prints the error distribution (median, RMS, 90th/99th percentile, share > 0.5 px) overall and
per feature bin, the share of the squared error each kind of window carries (split along / across
the epipolar line), then the adjustment exactly as ``prepare`` runs it
(:func:`skyfall.prepare.pipeline.match_and_adjust`) and the issue's goals: reprojection RMS on
tracks of >= 3 views, median per-track spread of pairwise heights, the largest per-pair median
height bias, and each view's offset error against −bias modulo the gauge (a common 3D translation
of the scene: the offsets minus −bias, least squares over the translation's image shifts J_k t, as
tests/test_prepare_multiview.py does). Matcher and adjustment options can be overridden
(``--match half=5 sweep_views=all``, ``--adjust outlier_sigma=3``); ``--cache`` keeps the
matches and tracks of a run, to try adjustment options without matching again. With
``PYTHONPATH`` set to an export of an older commit (``git archive``), the same script measures
the older matcher (one pairwise pass).

    OMP_NUM_THREADS=1 python scripts/bench_matches.py /tmp/c14/city0
    OMP_NUM_THREADS=1 python scripts/bench_matches.py /tmp/c14/city --cache /tmp/m.pkl --adjust outlier_sigma=3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

from skyfall.data.cameras import Cameras
from skyfall.prepare.adjust import JointAdjustment, Tracks, joint_adjustment
from skyfall.prepare.geodesy import ENUFrame
from skyfall.prepare.matching import MatchConfig, Matches
from skyfall.prepare.pinhole import project_pinhole
from skyfall.prepare.pipeline import PrepareConfig, _build_views

try:
    from skyfall.prepare.pipeline import match_and_adjust
except ImportError:  # an older skyfall (PYTHONPATH=<export of an older commit>): one pairwise pass
    from skyfall.prepare.adjust import build_tracks
    from skyfall.prepare.pipeline import _match_all

    def match_and_adjust(views, cams, z, cfg, size):  # noqa: ANN001, ANN201, D103
        matches = _match_all(views, cams, z, cfg.matcher)
        tracks = build_tracks(matches, cfg.track_merge_px)
        adj = joint_adjustment(cams, tracks, size) if cfg.adjust and tracks.n_tracks >= 3 else None
        return matches, tracks, adj, {}


from skyfall.prepare.raster import read_satellite_image
from skyfall.synth.city import _SHADOW_OFFSET, SyntheticCity
from skyfall.synth.raycast import ShadowGrid, trace_camera
from skyfall.synth.rpc import ANCHOR
from skyfall.synth.shading import surface_normals

Camera = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class Scene:
    """A synthetic RPC tile prepared in memory: views, fitted and exact cameras, truth maps."""

    names: list[str]
    views: list  # pipeline._View
    cams: list[Camera]  # fitted to the RPCs (biased)
    exact: list[Camera]  # bias removed
    bias: np.ndarray  # [V, 2] RPC minus exact (px)
    z: tuple[float, float]
    size: tuple[int, int]
    dz_frame: float  # synthetic z = prepare z + dz_frame
    maps: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    dates: list[int] = dataclasses.field(default_factory=list)


def _parse_overrides(items: list[str], cls: type) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        if key not in fields:
            sys.exit(f"unknown {cls.__name__} option {key!r}; known: {', '.join(fields)}")
        default = getattr(cls(), key) if dataclasses.is_dataclass(cls) else None
        if isinstance(default, bool):
            out[key] = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[key] = int(text)
        elif isinstance(default, float):
            out[key] = float(text)
        else:
            out[key] = text
    return out


def load_scene(tile: Path, n_views: int | None = None) -> Scene:
    """Read the tile's RPC views and fit their pinholes as ``prepare`` does (AOI/heights of rpc.json)."""
    meta = json.loads((tile / "rpc" / "rpc.json").read_text())
    rows = meta["views"][:n_views]
    lon, lat, size = (float(v) for v in meta["prepare"]["aoi"].split(","))
    alt = tuple(float(v) for v in meta["prepare"]["alt_range"].split(","))
    cfg = PrepareConfig(aoi=(lon, lat, size), alt_range=alt)  # type: ignore[arg-type]
    sats = [read_satellite_image(tile / "rpc" / r["image"]) for r in rows]
    frame = ENUFrame(lon, lat, alt[0] - cfg.origin_below)
    if (lon, lat) != (ANCHOR.lon, ANCHOR.lat):
        sys.exit(f"{tile}: the AOI centre {lon},{lat} is not the synthetic anchor; frames differ")
    z = (cfg.origin_below, alt[1] - frame.h0)
    views, w, h = _build_views(sats, frame, 0.5 * size, z, 1, cfg)
    cams = [(v.fit.K.copy(), v.fit.c2w.copy()) for v in views]
    bias = np.array([r["bias_px"] for r in rows], float)
    exact = []
    for (K, c2w), b in zip(cams, bias, strict=True):
        K2 = K.copy()
        K2[:2, 2] -= b
        exact.append((K2, c2w))
    synth = json.loads((tile / "synth.json").read_text())
    dates = [int(synth["image_dates"][r["name"]]) for r in rows]
    return Scene(
        [r["name"] for r in rows], views, cams, exact, bias, z, (w, h), frame.h0 - ANCHOR.h, dates=dates
    )


def render_maps(scene: Scene, city: SyntheticCity) -> None:
    """Per view: exact hit point, height, camera depth, primitive, normal z and sun visibility per date."""
    prims = city.primitives(None)
    layout = city.layout.at_date(None)
    grids = [ShadowGrid(prims, torch.as_tensor(d.sun_dir, dtype=torch.float32)) for d in city.dates]
    w, h = scene.size
    for K, c2w in scene.exact:
        c = c2w.copy()
        c[2, 3] += scene.dz_frame
        cams = Cameras(torch.as_tensor(c[None]), torch.as_tensor(K[None]), w, h)
        hits, _d, zscale = trace_camera(cams, 0, prims)
        mask = hits.mask
        p = hits.points[mask]
        n = surface_normals(layout, hits.prim[mask], p)
        lit = np.zeros((len(grids), h * w), bool)
        for di, g in enumerate(grids):
            sun = g.sun
            facing = (n @ sun) > 0
            v = torch.zeros(len(p), dtype=torch.bool)
            v[facing] = g.visible(p[facing] + _SHADOW_OFFSET * n[facing])
            lit[di, mask.numpy()] = v.numpy()
        xyz = np.full((h * w, 3), np.nan)
        xyz[mask.numpy()] = p.double().numpy()
        nz = np.full(h * w, np.nan)
        nz[mask.numpy()] = n[:, 2].numpy()
        depth = np.where(mask.numpy(), (hits.t * zscale).numpy(), np.inf)
        scene.maps.append(
            {
                "xyz": xyz.reshape(h, w, 3),
                "depth": depth.reshape(h, w),
                "prim": hits.prim.numpy().reshape(h, w),
                "nz": nz.reshape(h, w),
                "lit": lit.reshape(len(grids), h, w),
            }
        )


def _cam_depth(cam: Camera, xyz: np.ndarray) -> np.ndarray:
    K, c2w = cam
    return (xyz - c2w[:3, 3]) @ c2w[:3, 2]


def _window(a: np.ndarray, ij: np.ndarray, half: int) -> np.ndarray:
    """[N, (2h+1)², ...] values of a [H, W, ...] map in the windows centred on pixels ij [N, 2] (row, col)."""
    o = np.arange(-half, half + 1)
    rr = np.clip(ij[:, 0, None, None] + o[:, None], 0, a.shape[0] - 1)
    cc = np.clip(ij[:, 1, None, None] + o[None, :], 0, a.shape[1] - 1)
    return a[rr, cc].reshape(len(ij), -1, *a.shape[2:])


def truth(scene: Scene, matches: list[Matches], half: int) -> dict[str, np.ndarray]:
    """Per match: the true position, its error and the features of its window (module docstring)."""
    rec: dict[str, list] = {k: [] for k in ("ref", "view", "err", "err_vec", "along", "across", "ncc",
                                             "dz", "facade", "shadow", "occluded", "angle", "kp", "hit")}  # fmt: skip
    centre = np.array([0.0, 0.0, 0.5 * (scene.z[0] + scene.z[1])])
    for m in matches:
        if len(m.uv0) == 0:
            continue
        r, k = m.ref, m.view
        mr, mk = scene.maps[r], scene.maps[k]
        ij = np.floor(m.uv0[:, ::-1]).astype(int)
        xyz = mr["xyz"][ij[:, 0], ij[:, 1]] - [0, 0, scene.dz_frame]  # prepare frame
        hit = np.isfinite(xyz[:, 0])
        true_k = project_pinhole(*scene.exact[k], np.where(hit[:, None], xyz, centre))
        # The images were rendered by the exact cameras: the bias is only in the RPCs.
        ev = m.uvk - true_k
        # Epipolar direction in view k: image motion per metre of height along the reference ray.
        o = scene.exact[r][1][:3, 3]
        dirs = np.where(hit[:, None], xyz - o, 1.0)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        pa = project_pinhole(*scene.exact[k], np.where(hit[:, None], xyz, centre))
        pb = project_pinhole(*scene.exact[k], np.where(hit[:, None], xyz + dirs, centre))
        ep = pb - pa
        ep /= np.maximum(np.linalg.norm(ep, axis=1, keepdims=True), 1e-12)
        along = (ev * ep).sum(1)
        across = ev[:, 0] * ep[:, 1] - ev[:, 1] * ep[:, 0]
        # Occlusion: the true point is farther than what view k sees at that pixel.
        kk = np.clip(np.floor(true_k).astype(int), 0, [scene.size[0] - 1, scene.size[1] - 1])
        seen = mk["depth"][kk[:, 1], kk[:, 0]]
        occl = _cam_depth(scene.exact[k], xyz) > seen + 0.3
        z_win = _window(mr["xyz"][..., 2], ij, half)
        dz = np.nanmax(z_win, 1) - np.nanmin(z_win, 1)
        fac = np.nanmean(np.abs(_window(mr["nz"], ij, half)) < 0.5, 1)
        lr = _window(mr["lit"][scene.dates[r]], ij, half)
        lk = _window(mr["lit"][scene.dates[k]], ij, half)
        shadow = (lr != lk).mean(1)
        d0 = scene.exact[r][1][:3, 3] - centre
        d1 = scene.exact[k][1][:3, 3] - centre
        ang = np.degrees(np.arccos(d0 @ d1 / np.linalg.norm(d0) / np.linalg.norm(d1)))
        n = len(m.uv0)
        for key, val in (("ref", np.full(n, r)), ("view", np.full(n, k)), ("err", np.linalg.norm(ev, axis=1)),
                         ("err_vec", ev), ("along", along), ("across", across), ("ncc", m.ncc), ("dz", dz),
                         ("facade", fac), ("shadow", shadow), ("occluded", occl & hit),
                         ("angle", np.full(n, ang)), ("kp", m.uv0), ("hit", hit)):  # fmt: skip
            rec[key].append(val)
    return {k: np.concatenate(v) for k, v in rec.items()}


def _row(label: str, e: np.ndarray) -> str:
    if len(e) == 0:
        return f"{label:<34} {0:>6}"
    q = np.percentile(e, [50, 90, 99])
    rms = np.sqrt(np.mean(e**2))
    return (
        f"{label:<34} {len(e):>6} {q[0]:>7.3f} {rms:>7.3f} {q[1]:>7.3f} {q[2]:>7.3f} "
        f"{100 * np.mean(e > 0.5):>6.1f}% {100 * np.mean(e > 1.0):>6.1f}%"
    )


def error_table(t: dict[str, np.ndarray]) -> str:
    e = t["err"]
    ok = t["hit"]
    lines = [
        f"{'matches':<34} {'n':>6} {'median':>7} {'rms':>7} {'p90':>7} {'p99':>7} {'>0.5px':>7} {'>1px':>7}"
    ]
    lines.append(_row("all", e[ok]))
    clean = ok & (t["dz"] < 0.5) & (t["shadow"] == 0) & ~t["occluded"] & (t["facade"] == 0)
    lines.append(_row("clean (flat, no shadow change)", e[clean]))
    groups = [
        ("window height range dz", "dz", [0, 0.1, 0.5, 2, 5, 1e9], "m"),
        ("window on facades", "facade", [0, 1e-9, 0.2, 0.5, 1.01], ""),
        ("window shadow change", "shadow", [0, 1e-9, 0.05, 0.2, 1.01], ""),
        ("NCC", "ncc", [0.8, 0.85, 0.9, 0.95, 0.98, 1.01], ""),
        ("pair angle", "angle", [0, 10, 15, 20, 25, 90], "deg"),
    ]
    for title, key, edges, unit in groups:
        lines.append(f"  by {title}")
        x = t[key]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            sel = ok & (x >= a) & (x < b)
            lab = f"    [{a:g}, {b:g}){unit}" if b < 1e8 else f"    >= {a:g}{unit}"
            lines.append(_row(lab, e[sel]))
    lines.append("  by occlusion in the searched view")
    lines.append(_row("    visible", e[ok & ~t["occluded"]]))
    lines.append(_row("    occluded", e[ok & t["occluded"]]))
    lines.append("  by pair")
    for r, k in sorted({(int(a), int(b)) for a, b in zip(t["ref"], t["view"], strict=True)}):
        sel = ok & (t["ref"] == r) & (t["view"] == k)
        lines.append(
            _row(f"    {r}-{k} ({t['angle'][sel][0]:.1f} deg)" if sel.any() else f"    {r}-{k}", e[sel])
        )
    return "\n".join(lines)


def error_split(t: dict[str, np.ndarray]) -> str:
    """Share of the squared error carried by each kind of match (what the RMS is made of)."""
    ok = t["hit"]
    e2 = t["err"] ** 2
    total = e2[ok].sum()
    kinds = [
        ("occluded in the searched view", t["occluded"]),
        ("window with a moving shadow edge", (t["shadow"] > 0) & ~t["occluded"]),
        ("window across a depth edge (dz >= 2 m)", (t["dz"] >= 2) & (t["shadow"] == 0) & ~t["occluded"]),
        ("window on a facade / slope (no edge)", (t["dz"] < 2) & (t["facade"] > 0) & (t["shadow"] == 0) & ~t["occluded"]),
        ("flat, no shadow change", (t["dz"] < 2) & (t["facade"] == 0) & (t["shadow"] == 0) & ~t["occluded"]),
    ]  # fmt: skip
    lines = [
        f"{'kind':<42} {'n':>6} {'share n':>8} {'share err²':>10} {'rms':>7} {'|along|':>8} {'|across|':>8}"
    ]
    for name, sel in kinds:
        s = sel & ok
        lines.append(
            f"{name:<42} {int(s.sum()):>6} {100 * s.sum() / max(ok.sum(), 1):>7.1f}% "
            f"{100 * e2[s].sum() / max(total, 1e-12):>9.1f}% {np.sqrt(e2[s].mean()) if s.any() else 0:>7.3f} "
            f"{np.sqrt(np.mean(t['along'][s] ** 2)) if s.any() else 0:>8.3f} "
            f"{np.sqrt(np.mean(t['across'][s] ** 2)) if s.any() else 0:>8.3f}"
        )
    return "\n".join(lines)


def _jacobians(cams: list[Camera], centre: np.ndarray) -> np.ndarray:
    out = []
    for K, c2w in cams:
        p0 = project_pinhole(K, c2w, centre[None])[0]
        out.append(np.stack([project_pinhole(K, c2w, (centre + e)[None])[0] - p0 for e in np.eye(3)], 1))
    return np.array(out)


def adjust_report(scene: Scene, tracks: Tracks, adj: JointAdjustment) -> dict:
    """The issue's goals from an adjustment of the scene's tracks."""
    s = adj.summary(len(scene.cams))
    centre = np.array([0.0, 0.0, 0.5 * (scene.z[0] + scene.z[1])])
    jac = _jacobians(scene.cams, centre)
    got = adj.correction.offset
    want = -scene.bias
    tvec, *_ = np.linalg.lstsq(jac.reshape(-1, 3), (got - want).ravel(), rcond=None)
    bias_err = np.linalg.norm(got - want - jac @ tvec, axis=1)
    dz = [abs(p["median_dz_after_m"]) for p in s["pairs"].values() if p["median_dz_after_m"] is not None]
    return {
        "tracks": s["tracks"],
        "hist": s["track_length_histogram"],
        "observations": s["observations"],
        "inliers": s["inliers"],
        "rms3_before": s["reproj_rms_tracks3_before_px"],
        "rms3_after": s["reproj_rms_tracks3_after_px"],
        "rms_after": s["reproj_rms_after_px"],
        "spread_before": s["pair_height_spread_m"]["median_before"],
        "spread_after": s["pair_height_spread_m"]["median_after"],
        "spread_tracks": s["pair_height_spread_m"]["tracks"],
        "pair_bias_max": max(dz) if dz else None,
        "offsets": got.tolist(),
        "bias_err": bias_err.tolist(),
        "gauge_t": tvec.tolist(),
    }


def print_adjust(rep: dict) -> None:
    print(
        f"tracks {rep['tracks']} ({', '.join(f'{k}v: {v}' for k, v in rep['hist'].items())}), "
        f"inliers {rep['inliers']}/{rep['observations']} ({rep['observations'] - rep['inliers']} dropped)"
    )
    print(f"reprojection rms on >= 3-view tracks {rep['rms3_before']:.3f} -> {rep['rms3_after']:.3f} px "
          f"(all tracks {rep['rms_after']:.3f} px)")  # fmt: skip
    print(f"median per-track spread of pairwise heights {rep['spread_before']:.3f} -> {rep['spread_after']:.3f} m "
          f"over {rep['spread_tracks']} tracks; largest per-pair median height bias {rep['pair_bias_max']:.3f} m")  # fmt: skip
    for k, (o, e) in enumerate(zip(rep["offsets"], rep["bias_err"], strict=True)):
        print(f"  view {k}: offset ({o[0]:+.3f}, {o[1]:+.3f}) px, error vs -bias modulo gauge {e:.3f} px")
    print(f"bias recovery error max {max(rep['bias_err']):.3f} px")


@contextlib.contextmanager
def _adjust_options(kw: dict):
    """Run the pipeline's joint adjustment with these keyword overrides."""
    import skyfall.prepare.pipeline as pipeline

    orig = pipeline.joint_adjustment
    pipeline.joint_adjustment = lambda *args, **kwargs: orig(*args, **{**kwargs, **kw})
    try:
        yield
    finally:
        pipeline.joint_adjustment = orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tile", type=Path, help="synthetic tile with rpc/ (skyfall synth OUT --rpc)")
    ap.add_argument("--views", type=int, default=None, help="use the first N RPC views")
    ap.add_argument("--match", nargs="*", default=[], metavar="KEY=VALUE", help="MatchConfig overrides")
    ap.add_argument("--adjust", nargs="*", default=[], metavar="KEY=VALUE", help="joint_adjustment overrides")
    ap.add_argument("--merge-px", type=float, default=0.0, help="PrepareConfig.track_merge_px")
    ap.add_argument("--no-truth", action="store_true", help="skip the ray-cast error analysis")
    ap.add_argument("--no-adjust", action="store_true", help="skip tracks and adjustment")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--dump", type=Path, default=None, help="write the per-match table (.npz)")
    ap.add_argument(
        "--cache", type=Path, default=None, help="pickle of the matches: read if it exists, else written"
    )
    a = ap.parse_args()
    mcfg = MatchConfig(**_parse_overrides(a.match, MatchConfig))
    akw = {}
    for item in a.adjust:
        key, _, text = item.partition("=")
        akw[key] = text if key in ("model", "gauge") else float(text)
    if "max_rounds" in akw:
        akw["max_rounds"] = int(akw["max_rounds"])
    t0 = time.perf_counter()
    scene = load_scene(a.tile, a.views)
    cfg = PrepareConfig(matcher=mcfg, adjust=not a.no_adjust, track_merge_px=a.merge_px)
    t1 = time.perf_counter()
    if a.cache is not None and a.cache.exists():
        with open(a.cache, "rb") as f:
            matches, tracks, guide = pickle.load(f)
        kw = {"outlier_sigma": cfg.outlier_sigma, **akw} if hasattr(cfg, "outlier_sigma") else akw
        adj = joint_adjustment(scene.cams, tracks, scene.size, **kw) if not a.no_adjust else None
    else:
        with _adjust_options(akw):
            matches, tracks, adj, guide = match_and_adjust(scene.views, scene.cams, scene.z, cfg, scene.size)
        if a.cache is not None:
            with open(a.cache, "wb") as f:
                pickle.dump((matches, tracks, guide), f)
    t2 = time.perf_counter()
    n_m = sum(len(m.uv0) for m in matches)
    print(f"{a.tile}: {len(scene.views)} views {scene.size[0]}x{scene.size[1]}, matcher {mcfg}")
    print(
        f"{n_m} matches over {len(matches)} pairs; load+fit {t1 - t0:.1f} s, matching+adjustment {t2 - t1:.1f} s"
    )
    if guide:
        g = guide["guide"]
        print(f"guiding pass: cell {g['cell']}, {g['tracks']} tracks, offsets "
              + ", ".join(f"({o[0]:+.2f}, {o[1]:+.2f})" for o in g["offsets_px"]))  # fmt: skip
    out: dict = {"tile": str(a.tile), "matcher": dataclasses.asdict(mcfg), "adjust": akw, "matches": n_m,
                 "seconds": t2 - t1}  # fmt: skip
    if not a.no_truth:
        city = SyntheticCity.from_tile(a.tile)
        render_maps(scene, city)
        t = truth(scene, matches, mcfg.half)
        print(f"\ntrue match error (px; {int((~t['hit']).sum())} keypoints without a surface hit left out)")
        print(error_table(t))
        print("\nwhat the squared error is made of (along/across: error along / across the epipolar line)")
        print(error_split(t))
        ok = t["hit"]
        out["truth"] = {
            "median": float(np.median(t["err"][ok])),
            "rms": float(np.sqrt(np.mean(t["err"][ok] ** 2))),
            "p90": float(np.percentile(t["err"][ok], 90)),
            "p99": float(np.percentile(t["err"][ok], 99)),
            "gt05": float(np.mean(t["err"][ok] > 0.5)),
        }
        if a.dump:
            np.savez(a.dump, **t)
    if adj is not None:
        rep = adjust_report(scene, tracks, adj)
        print(f"\njoint adjustment ({getattr(adj, 'rounds', '?')} rejection rounds)")
        print_adjust(rep)
        out["adjustment"] = rep
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

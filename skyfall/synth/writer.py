"""Write a synthetic city as a tile folder in the reference format (`skyfall.data.tile`), plus ground truth.

Layout written::

    OUT/images/sat_XX.png            satellite views (uint8 RGB; black = no data)
        masks/sat_XX.npy             uint8 {0, 1} hit masks
        transforms_{train,test}.json PINHOLE, OpenCV c2w, float64 precision
        points3D.txt                 COLMAP text: noisy SfM-like surface samples with >= 2-view tracks
        synth.json                   generator, preset, style, seed, dates (sun, tint), per-image date, splits
        contact_sheet.png            all satellite views, labelled with their date
        gt/dsm.npy, gt/dsm.json      exact top-surface heights on a 0.5 m grid (row 0 = north)
        gt/views/<set>/              curriculum orbits and street views: images/, depth/, camera_path.json
        gt/views/ladder_<alt>m/      altitude ladder (1.7 m to 350 m, `skyfall export-views`' camera rule),
                                     same files plus ladder.json (per-view target, azimuth, pitch; skipped)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from skyfall.data import ladder as ladder_rule
from skyfall.data.camera_path import write_camera_path
from skyfall.data.cameras import Cameras
from skyfall.data.tile import transforms_document
from skyfall.errors import ConfigError
from skyfall.synth.cameras import (
    CURRICULUM,
    LADDER_FOV_DEG,
    ORBIT_FOV_DEG,
    STREET_EYE_M,
    STREET_FOV_DEG,
    STREET_PITCH_DEG,
    ladder_cameras,
    orbit_cameras,
    satellite_cameras,
    street_cameras,
)
from skyfall.synth.city import GENERATOR, GENERATOR_VERSION, SyntheticCity
from skyfall.synth.layout import city_style


@dataclass(frozen=True)
class Preset:
    """Sizes of a synthetic tile."""

    n_sat: int  # satellite views
    sat_px: int  # satellite image side
    n_dates: int  # acquisition dates used (<= 5; fewer when the city style has fewer)
    gt_px: int  # ground-truth view side (orbits and street views)
    orbit_az: int  # azimuths per curriculum orbit
    n_street: int  # street-level views
    points_per_view: int  # SfM point samples drawn per satellite view
    sat_supersample: int = 2  # rays per pixel side of the satellite views (anti-aliasing)
    gt_supersample: int = 2  # same for the ground-truth views
    size_m: float = 256.0


PRESETS: dict[str, Preset] = {
    "default": Preset(
        n_sat=16, sat_px=512, n_dates=5, gt_px=256, orbit_az=8, n_street=8, points_per_view=1500
    ),
    "tiny": Preset(
        n_sat=6, sat_px=64, n_dates=3, gt_px=32, orbit_az=2, n_street=2, points_per_view=150, gt_supersample=1
    ),
}
POINT_NOISE_M = 0.3
# Altitude-ladder GT sets per preset: (N for an N x N target grid, azimuths per target). Kept out of
# ``Preset`` so that synth.json (which lists the preset's fields) is unchanged by them. The tiny preset
# writes none: its 32 px views are for tests, whose fixture tile keeps exactly the curriculum and
# street sets.
LADDER_VIEWS: dict[str, tuple[int, int] | None] = {"default": (1, 4), "tiny": None}
_OWNED = ("images", "masks", "gt", "transforms_train.json", "transforms_test.json", "points3D.txt", "synth.json",
          "contact_sheet.png", "rpc")  # fmt: skip


def test_indices(n: int) -> list[int]:
    """Held-out satellite views: every 7th starting at 5 (2 of 16, 1 of 6); deterministic."""
    return [i for i in range(n) if i % 7 == 5]


def _to_u8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace the tile")
        # Only remove what a synthetic tile consists of: never wipe an arbitrary directory.
        for name in _OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _sample_points(
    rng: np.random.Generator, cams: Cameras, images: np.ndarray, depth: torch.Tensor, per_view: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    """SfM-like points: visible surface samples of each view, kept when seen by >= 2 views, then jittered.

    Returns:
        xyz [P, 3] float64 (noisy), rgb [P, 3] uint8, error [P] (mean reprojection error of the noise,
        px) and tracks (1-based image id, 2D point index) per point.
    """
    c, h, w = depth.shape
    xyz_all, rgb_all = [], []
    for ci in range(c):
        valid = torch.nonzero(torch.isfinite(depth[ci]).reshape(-1)).squeeze(1).numpy()
        if len(valid) == 0:
            continue
        pick = rng.choice(valid, size=min(per_view, len(valid)), replace=False)
        i, j = pick // w, pick % w
        k = cams.Ks[ci].numpy()
        z = depth[ci].double().numpy()[i, j]
        y = (i + 0.5 - k[1, 2]) / k[1, 1]
        x = (j + 0.5 - k[0, 2] - k[0, 1] * y) / k[0, 0]
        pc = np.stack([x * z, y * z, z], 1)
        c2w = cams.camtoworlds[ci].numpy()
        xyz_all.append(pc @ c2w[:3, :3].T + c2w[:3, 3])
        rgb_all.append(images[ci, i, j])
    xyz = np.concatenate(xyz_all)
    rgb = np.concatenate(rgb_all)
    uv, zc = cams.project(torch.from_numpy(xyz))
    ui = torch.floor(uv[..., 0]).long()
    vi = torch.floor(uv[..., 1]).long()
    inb = (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    dref = depth.double()[torch.arange(c)[:, None], vi.clamp(0, h - 1), ui.clamp(0, w - 1)]
    seen = inb & ((dref - zc).abs() < 0.75)  # [C, P]: unoccluded in that view
    keep = (seen.sum(0) >= 2).numpy()
    xyz, rgb, seen, uv = xyz[keep], rgb[keep], seen[:, keep], uv[:, keep]
    noisy = xyz + rng.normal(0.0, POINT_NOISE_M, xyz.shape)
    uvn, _ = cams.project(torch.from_numpy(noisy))
    err = ((uvn - uv).norm(dim=-1) * seen).sum(0) / seen.sum(0)
    tracks: list[list[tuple[int, int]]] = [[] for _ in range(len(xyz))]
    counter = [0] * c
    seen_np = seen.numpy()
    for p in range(len(xyz)):
        for ci in np.nonzero(seen_np[:, p])[0]:
            tracks[p].append((int(ci) + 1, counter[ci]))
            counter[ci] += 1
    return noisy, rgb, err.numpy(), tracks


def _write_points(path: Path, xyz: np.ndarray, rgb: np.ndarray, err: np.ndarray, tracks: list) -> None:
    mean_track = np.mean([len(t) for t in tracks]) if tracks else 0.0
    lines = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
        f"# Number of points: {len(xyz)}, mean track length: {mean_track:.4f}",
    ]
    for p in range(len(xyz)):
        tr = " ".join(f"{a} {b}" for a, b in tracks[p])
        x, y, z = xyz[p]
        r, g, b = (int(v) for v in rgb[p])
        lines.append(f"{p + 1} {x:.6f} {y:.6f} {z:.6f} {r} {g} {b} {err[p]:.6f} {tr}")
    path.write_text("\n".join(lines) + "\n")


def _contact_sheet(path: Path, images: np.ndarray, labels: list[str]) -> None:
    n, h, w, _ = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    scale = max(1, 256 // w)  # tiny views are enlarged so that the labels fit
    tw, th = w * scale, h * scale
    pad = 14
    sheet = Image.new("RGB", (cols * tw, rows * (th + pad)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, cols)
        im = Image.fromarray(images[i]).resize((tw, th), Image.NEAREST)
        sheet.paste(im, (c * tw, r * (th + pad) + pad))
        draw.text((c * tw + 3, r * (th + pad) + 1), labels[i], fill=(255, 255, 255))
    sheet.save(path)


def _write_gt_views(
    out: Path, city: SyntheticCity, name: str, cams: Cameras, supersample: int, **path_kw: float
) -> None:
    d = out / "gt" / "views" / name
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "depth").mkdir(exist_ok=True)
    r = city.render(cams, date=None, supersample=supersample)
    rgb = _to_u8(r["rgb"])
    for i in range(len(cams)):
        Image.fromarray(rgb[i]).save(d / "images" / f"{i:05d}.png")
        np.save(d / "depth" / f"{i:05d}.npy", r["depth"][i].numpy().astype(np.float32))
    write_camera_path(d / "camera_path.json", cams, **path_kw)


def write_ladder_sets(
    out: Path,
    city: SyntheticCity,
    dsm: np.ndarray,
    georef: dict,
    size_px: int,
    supersample: int,
    n_targets: int,
    n_azimuths: int,
) -> list[str]:
    """Write one GT view set per ladder altitude, ``gt/views/ladder_<alt>m/``; returns their names.

    Each holds the files of every GT set (images/, depth/, camera_path.json) plus ``ladder.json``:
    the altitude, band, camera rule constants and, per view (in file order), its name in
    `skyfall export-views`' naming, target, azimuth and pitch, and the cameras the rule skipped.
    An altitude whose every camera was skipped gets no set.
    """
    ladder = ladder_cameras(dsm, georef, city.size_m, size_px, n_targets, n_azimuths)
    names = []
    for alt in ladder_rule.DEFAULT_ALTITUDES_M:
        idx = [k for k, v in enumerate(ladder.views) if v.altitude_m == alt]
        if not idx:
            continue
        name = ladder_rule.set_name(alt)
        _write_gt_views(out, city, name, ladder.cameras[idx], supersample)
        doc = {
            "altitude_m": alt,
            "band": ladder_rule.band_of(alt),
            "standoff_m": ladder_rule.STANDOFF_M,
            "fov_deg": LADDER_FOV_DEG,
            "heights": "the city's exact DSM (gt/dsm.npy)",
            "views": [
                {
                    "file": f"{i:05d}",
                    "name": ladder.views[k].name,
                    "target": list(ladder.views[k].target),
                    "azimuth_deg": ladder.views[k].azimuth_deg,
                    "requested_azimuth_deg": ladder.views[k].requested_azimuth_deg,
                    "pitch_deg": ladder.views[k].pitch_deg,
                }
                for i, k in enumerate(idx)
            ],
            "skipped": [sk for sk in ladder.skipped if sk["altitude_m"] == alt],
        }
        (out / "gt" / "views" / name / "ladder.json").write_text(json.dumps(doc, indent=1))
        names.append(name)
    return names


def write_synthetic_tile(
    out: str | Path,
    preset: str = "default",
    seed: int = 0,
    overwrite: bool = False,
    style: str = "default",
    *,
    city_size_m: float | None = None,
    window: tuple[float, float, float] | None = None,
) -> Path:
    """Generate the synthetic city of ``seed`` and write it as a tile folder with ground truth.

    Args:
        out: tile directory (created).
        preset: "default" (16 views at 512^2) or "tiny" (6 views at 64^2, for tests).
        seed: city seed (layout, dates, cameras, point noise).
        overwrite: replace the tile files of a non-empty ``out``.
        style: city style (``skyfall.synth.layout.STYLES``): default, downtown, suburb or mixed.
        city_size_m: side of the generated city (default: the preset's tile size).
        window: ``(x, y, side)``: write only the square tile of ``side`` metres centred on city
            point (x, y), in a frame with its origin there (``SyntheticCity.window``); synth.json
            records it so that oracles rebuild the same view. Default: the whole city, centred.

    Returns:
        The tile directory.

    Raises:
        ConfigError: unknown preset or style, a negative seed, or ``out`` not empty and ``overwrite``
            is False.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    city_style(style)  # an unknown style fails here, before anything is written
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0 (numpy seeds), got {seed!r}")
    cfg = PRESETS[preset]
    out = Path(out)
    _prepare_out(out, overwrite)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    city = SyntheticCity.generate(seed, cfg.size_m if city_size_m is None else city_size_m, style)
    if window is not None:
        city = city.window(window[:2], window[2])
    n_dates = min(cfg.n_dates, len(city.dates))
    rng = np.random.default_rng([seed, 2])
    sat, off_nadir = satellite_cameras(rng, cfg.n_sat, cfg.sat_px, city.size_m / 2, city.layout.max_height)
    names = [f"sat_{i:02d}" for i in range(cfg.n_sat)]
    date_of = [i % n_dates for i in range(cfg.n_sat)]
    test = test_indices(cfg.n_sat)
    train = [i for i in range(cfg.n_sat) if i not in test]
    assert {date_of[i] for i in test} <= {date_of[i] for i in train}, "test dates must appear in training"
    timings["layout+cameras"] = time.perf_counter() - t0

    # Satellite views, one render call per date.
    t = time.perf_counter()
    rgb = np.zeros((cfg.n_sat, cfg.sat_px, cfg.sat_px, 3), np.uint8)
    depth = torch.zeros(cfg.n_sat, cfg.sat_px, cfg.sat_px)
    mask = np.zeros((cfg.n_sat, cfg.sat_px, cfg.sat_px), np.uint8)
    for di in tqdm(range(n_dates), desc="[synth] satellite views (per date)", leave=False):
        idx = [i for i in range(cfg.n_sat) if date_of[i] == di]
        r = city.render(sat[idx], date=di, supersample=cfg.sat_supersample)
        rgb[idx] = _to_u8(r["rgb"])
        depth[idx] = r["depth"]
        mask[idx] = r["mask"].numpy().astype(np.uint8)
    (out / "images").mkdir()
    (out / "masks").mkdir()
    for i, name in enumerate(names):
        Image.fromarray(rgb[i]).save(out / "images" / f"{name}.png")
        np.save(out / "masks" / f"{name}.npy", mask[i])
    for split, ids in (("train", train), ("test", test)):
        doc = transforms_document(sat[ids], [names[i] for i in ids])
        (out / f"transforms_{split}.json").write_text(json.dumps(doc, indent=1))
    timings["satellite views"] = time.perf_counter() - t

    t = time.perf_counter()
    xyz, prgb, err, tracks = _sample_points(rng, sat, rgb, depth, cfg.points_per_view)
    _write_points(out / "points3D.txt", xyz, prgb, err, tracks)
    timings["points3D"] = time.perf_counter() - t

    labels = [f"{names[i]} {city.dates[date_of[i]].name} off{off_nadir[i]:.0f}" for i in range(cfg.n_sat)]
    _contact_sheet(out / "contact_sheet.png", rgb, labels)

    # Ground truth: DSM and canonical-lighting views along the Stage 2 curriculum and in the streets.
    t = time.perf_counter()
    (out / "gt").mkdir()
    dsm, georef = city.dsm(0.5)
    np.save(out / "gt" / "dsm.npy", dsm)
    (out / "gt" / "dsm.json").write_text(json.dumps(georef, indent=1))
    gt_sets = []
    for el, rad in tqdm(CURRICULUM, desc="[synth] ground-truth orbits", leave=False):
        name = f"orbit_e{int(el)}_r{int(rad)}"
        cams = orbit_cameras(el, rad, cfg.orbit_az, cfg.gt_px)
        _write_gt_views(
            out, city, name, cams, cfg.gt_supersample, target=(0.0, 0.0, 0.0), radius=rad, elevation_deg=el
        )
        gt_sets.append(
            {"name": name, "kind": "orbit", "elevation_deg": el, "radius": rad, "fov_deg": ORBIT_FOV_DEG}
        )
    street = street_cameras(
        np.random.default_rng([seed, 3]), city.layout, cfg.n_street, cfg.gt_px,
        offset=city.offset[:2], half_m=None if window is None else city.size_m / 2,
    )  # fmt: skip
    _write_gt_views(out, city, "street", street, cfg.gt_supersample)
    gt_sets.append(
        {
            "name": "street",
            "kind": "street",
            "eye_height_m": STREET_EYE_M,
            "pitch_deg": STREET_PITCH_DEG,
            "fov_deg": STREET_FOV_DEG,
        }  # fmt: skip
    )
    timings["ground truth"] = time.perf_counter() - t
    ladder_sets: list[str] = []
    if LADDER_VIEWS[preset] is not None:
        t = time.perf_counter()
        n_targets, n_az = LADDER_VIEWS[preset]
        ladder_sets = write_ladder_sets(
            out, city, dsm, georef, cfg.gt_px, cfg.gt_supersample, n_targets, n_az
        )
        timings["altitude ladder"] = time.perf_counter() - t

    meta = {
        "generator": {"name": GENERATOR, "version": GENERATOR_VERSION},
        "preset": preset,
        "preset_params": asdict(cfg) if window is None else {**asdict(cfg), "size_m": city.size_m},
        "style": style,
        "seed": seed,
        "size_m": city.size_m,
        "scene_checksum": city.layout.checksum(),
        "canonical_date": 0,
        "dates": [d.to_json() for d in city.dates[:n_dates]],
        # Transient objects per date (shown in that date's satellite views only, never in gt/).
        "cars_per_date": [int(city.layout.transients.on(d).sum()) for d in range(n_dates)],
        "image_dates": {names[i]: date_of[i] for i in range(cfg.n_sat)},
        "image_off_nadir_deg": {names[i]: float(off_nadir[i]) for i in range(cfg.n_sat)},
        "train": [names[i] for i in train],
        "test": [names[i] for i in test],
        "n_points": len(xyz),
        "point_noise_m": POINT_NOISE_M,
        "gt_views": gt_sets,
    }
    if window is not None:
        meta["city"] = {"size_m": city.layout.size_m, "offset": list(city.offset)}
    (out / "synth.json").write_text(json.dumps(meta, indent=1))
    timings["total"] = time.perf_counter() - t0
    gsd = float(
        np.median([np.linalg.norm(sat.centers[i].numpy()) / float(sat.Ks[i, 0, 0]) for i in range(len(sat))])
    )
    print(
        f"[synth] wrote {out} ({preset}, {style} city, seed {seed}): {cfg.n_sat} satellite views {cfg.sat_px}^2 "
        f"(median GSD {gsd:.2f} m/px, {cfg.sat_supersample}x{cfg.sat_supersample} rays/px), {len(xyz)} points, "
        f"{len(gt_sets)} GT view sets at {cfg.gt_px}^2"
        + (f" + {len(ladder_sets)} altitude-ladder sets" if ladder_sets else "")
    )
    print("[synth] timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return out

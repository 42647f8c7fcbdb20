"""Evaluate a run: render ground-truth views and held-out satellite views, score images, distributions
and geometry, group by altitude band (AerialMegaDepth style), and write CSV + JSON + report.

Inputs: RUN/config.yml (``data`` = tile folder), the latest RUN/ckpts/ckpt_*.pt (or given checkpoints,
e.g. a Stage 1 and a Stage 2 one, to compare them per altitude), ground-truth view sets
``<set>/{images/*.png, depth/*.npy, camera_path.json}`` (default: TILE/gt/views).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skyfall.data.camera_path import read_camera_path
from skyfall.data.cameras import Cameras
from skyfall.errors import ConfigError, SkyfallError, TileFormatError
from skyfall.eval import distribution as dist
from skyfall.eval import geometry as geo
from skyfall.eval.dreamsim import DREAMSIM_MODELS, DreamSimMetric, load_dreamsim
from skyfall.eval.image_metrics import load_lpips, lpips_distance, psnr, ssim
from skyfall.eval.options import DEFAULT_BAND_EDGES, EvalOptions  # noqa: F401 (re-exported)
from skyfall.eval.report import eval_dsm_protocol, eval_image_protocol

SATELLITE_BAND = "satellite"


@dataclass
class ViewSet:
    """Views with reference images: a ground-truth set or the held-out satellite views."""

    name: str
    cameras: Cameras
    images: np.ndarray  # [N, H, W, 3] uint8
    depths: list[np.ndarray | None]
    masks: np.ndarray | None = None  # [N, H, W] bool (satellite no-data borders)
    kind: str = "gt"


# ------------------------------------------------------------------------------------------- loading


def band_label(altitude_m: float, edges: tuple[float, ...]) -> str:
    """Altitude band name of a ground-truth view, e.g. ``"150-200m"``; at or above the last edge
    ``">=350m"`` (satellite views get ``SATELLITE_BAND`` by their kind, not their altitude)."""
    if altitude_m >= edges[-1]:
        return f">={edges[-1]:g}m"
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if altitude_m < hi:
            return f"{lo:g}-{hi:g}m"
    return f"<{edges[0]:g}m"


def load_scene(ckpt: Path, device: str = "cpu"):  # noqa: ANN201 (Scene, dict)
    """Rebuild the Scene (Gaussians + appearance) of a checkpoint; returns (scene, checkpoint dict)."""
    from skyfall.scene import Scene
    from skyfall.storage.checkpoints import load_checkpoint

    try:
        st = load_checkpoint(ckpt, map_location=device)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{ckpt}: cannot load checkpoint: {e}") from e
    if "model" not in st:
        raise ConfigError(f"{ckpt}: not a skyfall checkpoint (no 'model' entry)")
    return Scene.from_checkpoint(st, device), st


def _find_key(d: Any, key: str, default: Any) -> Any:
    """First value of ``key`` in a nested config dict (Stage 1 and Stage 2 configs nest differently)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            r = _find_key(v, key, None)
            if r is not None:
                return r
    return default


def discover_sets(gt: Path) -> list[Path]:
    """GT view-set folders under ``gt`` (a tile, its gt/, gt/views/ or one set folder)."""
    for root in (gt / "gt" / "views", gt / "views", gt):
        if (root / "camera_path.json").is_file():
            return [root]
        if root.is_dir():
            sets = sorted(p for p in root.iterdir() if (p / "camera_path.json").is_file())
            if sets:
                return sets
    return []


def load_view_set(folder: Path, max_views: int = 0) -> ViewSet:
    """Read ``folder/{camera_path.json, images/*.png, depth/*.npy}`` (depth optional)."""
    from PIL import Image

    cams = read_camera_path(folder / "camera_path.json")
    files = sorted((folder / "images").glob("*.png")) + sorted((folder / "images").glob("*.jpg"))
    if len(files) != len(cams):
        raise TileFormatError(folder / "images", None, f"{len(files)} images for {len(cams)} cameras")
    n = len(cams) if max_views <= 0 else min(max_views, len(cams))
    imgs, depths = [], []
    for i in range(n):
        im = np.asarray(Image.open(files[i]).convert("RGB"))
        if im.shape[:2] != (cams.height, cams.width):
            raise TileFormatError(files[i], None, f"size {im.shape[1]}x{im.shape[0]} != camera path")
        imgs.append(im)
        dp = folder / "depth" / f"{files[i].stem}.npy"
        depths.append(np.load(dp).astype(np.float64) if dp.is_file() else None)
    return ViewSet(folder.name, cams[list(range(n))], np.stack(imgs), depths)


def _satellite_set(tile_dir: Path, resolution: int, max_views: int) -> ViewSet | None:
    from skyfall.data.tile import load_tile

    tile = load_tile(tile_dir, resolution=resolution)
    t = tile.test
    if len(t) == 0:
        return None
    n = len(t) if max_views <= 0 else min(max_views, len(t))
    idx = list(range(n))
    return ViewSet(
        "sat_test", t.cameras[idx], t.images[:n].numpy(), [None] * n, t.masks[:n].numpy(), kind="satellite"
    )


# ----------------------------------------------------------------------------------------- metrics


def _view_metrics(
    pred: torch.Tensor,
    gt: np.ndarray,
    mask: np.ndarray | None,
    lpips_model: Any,
    dreamsim_model: DreamSimMetric | None = None,
) -> dict:
    g = torch.from_numpy(gt).double() / 255.0
    p = pred.double().clamp(0, 1)
    m = None
    if mask is not None:
        m = torch.from_numpy(mask)
        # No-data pixels are black in the reference image: compare them as black for SSIM/LPIPS/DreamSim.
        p = p * m[..., None]
    out = {"psnr": psnr(p, g, m), "ssim": ssim(p, g)}
    if lpips_model is not None:
        out["lpips"] = lpips_distance(lpips_model, p, g)
    if dreamsim_model is not None:
        out["dreamsim"] = dreamsim_model.image_distance(p, g)
    return out


def _depth_metrics(depth: np.ndarray, alpha: np.ndarray, gt_depth: np.ndarray | None) -> dict:
    if gt_depth is None:
        return {}
    has = np.isfinite(gt_depth) & (gt_depth > 0)
    cov = has & (alpha >= 0.5)
    out = {"coverage": float(cov.sum() / max(has.sum(), 1))}
    if cov.any():
        out["depth_absrel"] = float((np.abs(depth[cov] - gt_depth[cov]) / gt_depth[cov]).mean())
    return out


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return float(np.mean(vals)) if vals else math.nan


IMAGE_KEYS = ("psnr", "ssim", "lpips", "dreamsim", "depth_absrel", "coverage")


def aggregate(rows: list[dict], by: str) -> dict[str, dict]:
    """Mean image/depth metrics of per-view rows grouped by ``rows[i][by]`` (first-seen order)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[by], []).append(r)
    out = {}
    for g, rs in groups.items():
        agg = {"n_views": len(rs), "altitude_m": _mean(rs, "altitude_m")}
        for k in IMAGE_KEYS:
            v = _mean(rs, k)
            if not math.isnan(v):
                agg[k] = v
        out[g] = agg
    return out


# ------------------------------------------------------------------------------------------- runner


def _resolve(opts: EvalOptions) -> tuple[dict, Path | None, list[Path]]:
    run = Path(opts.run)
    if not run.is_dir():
        raise ConfigError(f"{run}: run directory not found")
    edges = opts.band_edges
    if (
        not edges
        or any(not math.isfinite(e) for e in edges)
        or any(edges[i + 1] <= edges[i] for i in range(len(edges) - 1))
    ):
        raise ConfigError(
            f"--band-edges must be increasing finite altitudes in metres, got {' '.join(map(str, edges))}"
        )
    from skyfall.devices import resolve_device

    resolve_device(opts.device, "--device")
    from skyfall.storage.run_dir import RunDir

    rd = RunDir(run)
    config = rd.load_config()
    if opts.data:
        data: Path | None = Path(opts.data)
        if not data.is_dir():
            raise ConfigError(f"--data {data}: tile folder not found")
    else:
        # None when the tile moved: GT must then come from --gt / --gt-dsm / --dsm-truth, and
        # evaluate_run says so when nothing is left to evaluate.
        data = rd.tile_dir(config)
    if opts.ckpts:
        ckpts = [Path(c) for c in opts.ckpts]
        for c in ckpts:
            if not c.is_file():
                raise ConfigError(f"--ckpt {c}: file not found")
    else:
        from skyfall.storage.checkpoints import load_latest_checkpoint

        # the newest checkpoint that loads (a damaged newer one is skipped with a warning)
        latest, _ = load_latest_checkpoint(run / "ckpts")
        ckpts = [latest]
    return config, data, ckpts


def _load_embedders(opts: EvalOptions) -> tuple[dict, dict[str, str]]:
    # DreamSim is a per-view metric, not a patch-distribution embedder: _load_dreamsim takes it.
    embedders: dict[str, Any] = {k: v for k, v in opts.embedders.items() if k != "dreamsim"}
    unavailable: dict[str, str] = {}
    if not opts.clip:
        unavailable["clip_fid"] = unavailable["cmmd"] = "disabled (--no-clip)"
        return {}, unavailable
    for mode, name in (("clip_fid", opts.clip_fid_model), ("cmmd", opts.cmmd_model)):
        if mode in embedders:
            continue
        e = dist.load_clip(name, mode, opts.device)
        if isinstance(e, str):
            unavailable[mode] = e
        else:
            embedders[mode] = e
    return embedders, unavailable


def _load_dreamsim(opts: EvalOptions) -> DreamSimMetric | str:
    """The injected DreamSim (a DreamSimMetric or an embed function), the local one, or why there is none."""
    if not opts.dreamsim:
        return "disabled (--no-dreamsim)"
    given = opts.embedders.get("dreamsim")
    if isinstance(given, DreamSimMetric):
        return given
    if given is not None:
        return DreamSimMetric(given, device=opts.device)
    return load_dreamsim(opts.dreamsim_cache, opts.device)


def evaluate_run(opts: EvalOptions, *, progress: bool = True) -> dict:
    """Evaluate every requested checkpoint of a run and write the outputs; returns the JSON document."""
    from skyfall.eval.report import write_outputs

    t_start = time.perf_counter()
    config, data, ckpts = _resolve(opts)
    out_dir = Path(opts.out) if opts.out else Path(opts.run) / "eval"
    embedding_rule = opts.embedding or _find_key(config, "test_embedding", "mean")

    # Reference views: GT sets (sorted from high to low altitude) and the held-out satellite views.
    gt_root = Path(opts.gt) if opts.gt else data
    view_sets: list[ViewSet] = []
    if gt_root is not None:
        folders = discover_sets(gt_root)
        if opts.gt and not folders:
            raise ConfigError(f"--gt {opts.gt}: no view set (<set>/camera_path.json + images/) found")
        for f in folders:
            if opts.sets and f.name not in opts.sets:
                continue
            view_sets.append(load_view_set(f, opts.max_views))
    if opts.satellite and data is not None:
        res = int(_find_key(config, "resolution", 1))
        sat = _satellite_set(data, res, opts.max_views)
        if sat is not None:
            view_sets.insert(0, sat)
    if opts.sets and gt_root is not None:
        found = {f.name for f in discover_sets(gt_root)}
        unknown = [name for name in opts.sets if name not in found]
        if unknown:
            raise ConfigError(
                f"--sets {' '.join(unknown)}: no such view set in {gt_root} "
                f"(found: {', '.join(sorted(found)) or 'none'})"
            )

    # Ground-truth DSM.
    gt_dsm = None
    if opts.geometry:
        if opts.gt_dsm:
            gt_dsm = geo.load_dfc_dsm(opts.gt_dsm) if Path(opts.gt_dsm).suffix.lower() in (".tif", ".tiff") \
                else geo.load_synthetic_dsm(opts.gt_dsm)  # fmt: skip
            if gt_dsm is None:
                raise ConfigError(f"--gt-dsm {opts.gt_dsm}: no gt/dsm.npy + dsm.json there")
        elif data is not None:
            gt_dsm = geo.load_synthetic_dsm(data)
    truth = _load_truth(opts, data) if opts.geometry else None
    if gt_dsm is not None:
        ground_z = float(np.nanpercentile(gt_dsm[0], 2))
    elif truth is not None:
        raster, frame = truth[0], truth[1]
        ground_z = float(np.nanpercentile(raster.heights, 2)) - (
            frame.enu.h0 if frame.enu is not None else 0.0
        )
    else:
        ground_z = 0.0
    if not view_sets and gt_dsm is None and truth is None:
        # Before any model is loaded or any file written: an empty report is not a result.
        raise ConfigError(f"nothing to evaluate in {opts.run}: {_why_nothing(opts, config, data)}")

    unavailable: dict[str, str] = {}
    lpips_model = None
    if opts.lpips:
        m = load_lpips(opts.lpips_backbone, opts.lpips_lin, opts.device)
        if isinstance(m, str):
            unavailable["lpips"] = m
        else:
            lpips_model = m
    else:
        unavailable["lpips"] = "disabled (--no-lpips)"
    dreamsim_model = _load_dreamsim(opts)
    if isinstance(dreamsim_model, str):
        unavailable["dreamsim"] = dreamsim_model
        dreamsim_model = None
    embedders, un = _load_embedders(opts)
    unavailable.update(un)
    if gt_dsm is None and truth is None:
        unavailable["geometry"] = (
            "disabled" if not opts.geometry else "no ground-truth DSM (tile gt/dsm.npy or --gt-dsm)"
        )

    results = []
    for ckpt in ckpts:
        results.append(
            _evaluate_ckpt(
                ckpt,
                opts,
                view_sets,
                gt_dsm,
                ground_z,
                embedding_rule,
                lpips_model,
                embedders,
                progress,
                truth,
                dreamsim_model,
            )
        )
    stereo = _stereo_score(opts, data, truth) if truth is not None and data is not None else None
    models = {k: e.name for k, e in embedders.items()}
    if dreamsim_model is not None:
        models["dreamsim"] = dreamsim_model.name
    doc = {
        "run": str(opts.run),
        "data": str(data) if data else None,
        "gt": str(gt_root) if gt_root else None,
        "embedding": str(embedding_rule),
        "train_eval_appearance": _find_key(config, "eval_appearance", "fit-left-half"),
        "band_edges_m": list(opts.band_edges),
        "ground_z_m": ground_z,
        "unavailable": unavailable,
        "models": models,
        "protocol": {
            "appearance": f"{eval_image_protocol(embedding_rule)}: every view is rendered with the novel-view "
            "embedding and scored on the whole image (the training summary's psnr_test fits the embedding "
            "on the left half of each held-out view and scores the right half)",
            "ssim": "pyiqa ssim: YIQ luma x255 rounded, 11x11 Gaussian sigma 1.5, valid filtering, relu(cs)",
            "psnr": "RGB, data range 1 (masked to valid pixels on satellite views)",
            "lpips": "LPIPS v0.1 AlexNet",
            "dreamsim": f"{DREAMSIM_MODELS}: 1 - cosine similarity of the embeddings of both images resized "
            "to 224x224 (bicubic); satellite views: no-data pixels black in both, as for SSIM/LPIPS",
            "patches": "512^2 (or min(H, W)), stride min((H-p)//8, (W-p)//15)",
            "clip_fid": f"Frechet distance of CLIP image embeddings ({opts.clip_fid_model}), clean-fid preprocessing",
            "cmmd": f"biased MMD^2, RBF sigma 10, x1000, L2-normalised CLIP embeddings ({opts.cmmd_model})",
            "geometry": "dsm_nadir: median depth seen straight down; dsm_nadir_expected: expected depth; "
            "dsm_views: depth -> points -> plyflatten(r=1) on the GT grid; all NCC shift + mean vertical offset "
            "registered (dsm_mae_unregistered_m: without; the training summary's dsm_mae_m is dsm_nadir's)",
            **(
                {
                    "dsm_truth": f"{truth[0].path}: nadir median-depth DSM rendered at 1/{opts.dsm_oversample} "
                    "of the truth cell, resampled exactly onto the truth grid (truth CRS -> geodetic -> ENU), "
                    f"cropped to the tile; NCC shift within +-{opts.dsm_shift_radius} cells + vertical offset"
                }
                if truth is not None
                else {}
            ),
        },
        "checkpoints": results,
        "stereo_dsm": stereo,
        "wall_s": time.perf_counter() - t_start,
    }
    write_outputs(out_dir, doc)
    doc["out"] = str(out_dir)
    return doc


def _why_nothing(opts: EvalOptions, config: dict, data: Path | None) -> str:
    """Why ``evaluate_run`` found no reference view and no ground-truth DSM, and what to pass."""
    from skyfall.storage.run_dir import RunDir

    hint = "pass --data TILE, --gt DIR, --gt-dsm FILE or --dsm-truth FILE"
    if data is None and not opts.gt:
        cfg = RunDir(opts.run).config_path
        if config.get("data"):
            return f"{cfg} [data]: tile folder {config['data']} not found; {hint}"
        return f"{cfg} names no tile; {hint}"
    skipped = [
        flag for flag, on in (("--no-satellite", opts.satellite), ("--no-geometry", opts.geometry)) if not on
    ]
    where = opts.gt or data
    return (
        f"{where} has no ground-truth view set (gt/views/<set>/camera_path.json), no held-out satellite "
        f"view (transforms_test.json) and no ground-truth DSM (gt/dsm.npy)"
        + (f" that {' and '.join(skipped)} leave{'s' if len(skipped) == 1 else ''}" if skipped else "")
        + f"; {hint}"
    )


@torch.no_grad()
def _evaluate_ckpt(
    ckpt: Path,
    opts: EvalOptions,
    view_sets: list[ViewSet],
    gt_dsm: tuple[np.ndarray, geo.DsmGrid] | None,
    ground_z: float,
    embedding_rule: str,
    lpips_model: Any,
    embedders: dict,
    progress: bool,
    truth: tuple | None = None,
    dreamsim_model: DreamSimMetric | None = None,
) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    scene, st = load_scene(ckpt, opts.device)
    emb = scene.novel_embedding(embedding_rule, "--embedding" if opts.embedding else None)
    label = f"{st.get('stage', 'ckpt')}@{int(st.get('step', 0))}"
    rows: list[dict] = []
    samples: dict[str, dict] = {}
    feats: dict[str, dict[str, list[np.ndarray]]] = {m: {"gt": [], "pred": []} for m in embedders}
    total = sum(len(v.cameras) for v in view_sets)
    bar = tqdm(total=total, desc=f"eval {label}", disable=not progress, leave=False)
    for vs in view_sets:
        for i in range(len(vs.cameras)):
            cam = vs.cameras[i]
            r = scene.render(cam.to(opts.device), emb, absgrad=False)
            pred = r.colors[0].cpu()
            depth = r.expected_depths[0, ..., 0].double().cpu().numpy()
            alpha = r.alphas[0, ..., 0].cpu().numpy()
            alt = float(cam.centers[0, 2]) - ground_z
            row = {
                "ckpt": label,
                "set": vs.name,
                "view": i,
                "altitude_m": alt,
                "band": SATELLITE_BAND if vs.kind == "satellite" else band_label(alt, opts.band_edges),
            }
            mask = None if vs.masks is None else vs.masks[i]
            row.update(_view_metrics(pred, vs.images[i], mask, lpips_model, dreamsim_model))
            row.update(_depth_metrics(depth, alpha, vs.depths[i]))
            rows.append(row)
            pred_u8 = dist.as_tensor_image(pred if mask is None else pred * torch.from_numpy(mask)[..., None])
            for m, e in embedders.items():
                feats[m]["gt"].append(e.embed_image(vs.images[i]))
                feats[m]["pred"].append(e.embed_image(pred_u8))
            if i == 0:
                samples[vs.name] = {
                    "gt": vs.images[i],
                    "pred": pred_u8,
                    "gt_depth": vs.depths[i],
                    "depth": np.where(alpha >= 0.5, depth, np.nan),
                    "mask": mask,
                    "metrics": {k: row[k] for k in ("psnr", "ssim") if k in row},
                }
            bar.update(1)
    bar.close()

    by_set = aggregate(rows, "set")
    # bands from street level up, the satellite band last: the order a per-altitude table reads in
    by_band = aggregate(rows, "band")
    by_band = dict(sorted(by_band.items(), key=lambda kv: (kv[0] == SATELLITE_BAND, kv[1]["altitude_m"])))
    for name, agg in by_set.items():
        agg["protocol"] = eval_image_protocol(embedding_rule, satellite=name == "sat_test")
    for name, agg in by_band.items():
        agg["protocol"] = eval_image_protocol(embedding_rule, satellite=name == SATELLITE_BAND)
    # Distribution metrics per set, per band and over all ground-truth (non-satellite) views.
    groups: dict[tuple[str, str], list[int]] = {}
    for idx, r in enumerate(rows):
        groups.setdefault(("set", r["set"]), []).append(idx)
        groups.setdefault(("band", r["band"]), []).append(idx)
        if r["band"] != SATELLITE_BAND:
            groups.setdefault(("all", "gt_views"), []).append(idx)
    distribution: dict[str, dict[str, dict]] = {"set": {}, "band": {}, "all": {}}
    for (kind, name), idxs in groups.items():
        d: dict[str, float] = {}
        for m in embedders:
            real = np.concatenate([feats[m]["gt"][j] for j in idxs])
            fake = np.concatenate([feats[m]["pred"][j] for j in idxs])
            d.update(
                dist.distribution_metrics(
                    *((real, fake, None, None) if m == "clip_fid" else (None, None, real, fake))
                )
            )
            d["n_patches"] = len(real)
        if d:
            distribution[kind][name] = d
            target = by_set if kind == "set" else by_band if kind == "band" else None
            if target is not None:
                target[name].update({k: v for k, v in d.items() if k != "n_patches"})

    geometry: dict[str, dict] = {}
    dsm_maps: dict[str, np.ndarray] = {}
    if gt_dsm is not None:
        dsm, grid = gt_dsm
        off = np.asarray(opts.world_offset, np.float64)
        # Nadir render on the grid (the Stage 1 summary's DSM), then the reference protocol from views.
        from skyfall.eval.dsm import render_dsm

        georef = {"x_min": grid.x_min - off[0], "y_max": grid.y_max - off[1], "resolution": grid.resolution,
                  "width": grid.width, "height": grid.height}  # fmt: skip
        nadir = render_dsm(scene, georef, progress=progress).astype(np.float64) + off[2]
        dsm_maps["nadir"] = nadir
        # What a viewer blends (alpha-normalised depth) next to the median surface.
        dsm_maps["nadir_expected"] = (
            render_dsm(scene, georef, depth="expected", progress=progress).astype(np.float64) + off[2]
        )
        cams = _geometry_cameras(opts)
        if cams is not None:
            pts = geo.render_points(scene, cams.to(opts.device), None) + off
            dsm_maps["views"] = geo.flatten_points(pts, grid, radius=1, reduce="mean")
        for name, pred in dsm_maps.items():
            geometry[name] = geo.dsm_metrics(pred, dsm)
            geometry[name]["protocol"] = eval_dsm_protocol(
                name, geometry_views=0 if cams is None else len(cams)
            )
        from skyfall.dsm import opaque_weight_share

        geometry["nadir"]["opaque_weight_share"] = opaque_weight_share(scene, georef, progress=progress)
        dsm_maps["gt"] = dsm
    truth_score = None
    if truth is not None:
        from skyfall.dsm import render_dsm
        from skyfall.eval.truth import score_truth

        raster, frame, extent = truth
        truth_score = score_truth(
            lambda g: render_dsm(scene, g, progress=progress).astype(np.float64),
            raster,
            frame,
            extent=extent,
            oversample=opts.dsm_oversample,
            radius=opts.dsm_shift_radius,
        )
        geometry["truth"] = {
            **truth_score.metrics,
            "file": str(raster.path),
            "protocol": eval_dsm_protocol("truth", shift_radius=opts.dsm_shift_radius),
        }
    return {
        "label": label,
        "ckpt": str(ckpt),
        "stage": st.get("stage"),
        "step": int(st.get("step", 0)),
        "num_gaussians": int(scene.model.num_gaussians),
        "views": rows,
        "by_set": by_set,
        "by_band": by_band,
        "distribution": distribution,
        "geometry": geometry,
        "wall_s": time.perf_counter() - t0,
        "_samples": samples,
        "_dsm": dsm_maps,
        "_truth": truth_score,
    }


def _load_truth(opts: EvalOptions, data: Path | None) -> tuple | None:
    """(truth raster, tile frame, ENU extent) for --dsm-truth or the tile's prepare.json ``truth_dsm``."""
    from skyfall.dsm import TileFrame, tile_frame
    from skyfall.eval.truth import check_frames, load_truth

    frame = tile_frame(data) if data is not None else TileFrame(None, None)
    path = opts.dsm_truth or frame.truth_dsm
    if path is None:
        if opts.dsm_mask is not None:
            raise ConfigError("--dsm-mask needs --dsm-truth (or truth_dsm in the tile's prepare.json)")
        return None
    if opts.dsm_shift_radius < 0 or opts.dsm_oversample < 1:
        raise ConfigError("--dsm-shift-radius must be >= 0 and --dsm-oversample >= 1")
    truth = load_truth(path, opts.dsm_mask)
    check_frames(truth, frame, data)
    extent = frame.extent
    if extent is None:
        g = truth.grid
        if frame.enu is not None:
            raise TileFormatError(
                data / "prepare.json", "aoi.size_m", "missing: the tile's extent is unknown"
            )
        extent = (g.x_min, g.x_max, g.y_min, g.y_max)
    return truth, frame, extent


def _stereo_score(opts: EvalOptions, data: Path, truth: tuple) -> dict | None:
    """The tile's stereo DSM (``prepare``'s dense heights) scored like the checkpoints against the same
    truth: what training added over matching alone. None when the tile has no dense heights."""
    from skyfall.eval.stereo import score_stereo

    raster, frame, extent = truth
    s = score_stereo(data, raster, frame=frame, extent=extent, oversample=opts.dsm_oversample,
                     radius=opts.dsm_shift_radius)  # fmt: skip
    if s is None:
        return None
    return {**s, "protocol": eval_dsm_protocol("stereo", shift_radius=opts.dsm_shift_radius)}


def _geometry_cameras(opts: EvalOptions) -> Cameras | None:
    """The first ``geometry_views`` training satellite cameras (the reference's fallback cameras)."""
    if opts.geometry_views <= 0:
        return None
    config, data, _ = _resolve(opts)
    if data is None:
        return None
    from skyfall.data.tile import load_tile

    try:
        tile = load_tile(data, resolution=int(_find_key(config, "resolution", 1)))
    except SkyfallError:
        return None
    n = min(opts.geometry_views, len(tile.train))
    return tile.train.cameras[list(range(n))]

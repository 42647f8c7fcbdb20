"""City scale on one machine: a synthetic city split into tiles, trained on a local Ray with 1 and with
2 workers, merged, and compared with one tile covering the same area.

Prints (and writes to WORK/bench_city.json) the wall time of `skyfall city train` per worker count,
the merged DSM's error near the seams (cells within 10 m of an interior core border) and in the
interior, the same figures for the single tile, and writes a picture: 45° views of the ground
truth, the merged city and the single tile (same camera), and both DSM error maps with the core
borders.

    python scripts/bench_city.py --work /tmp/bench_city                     # 2x2, 128 m cores, demo preset
    python scripts/bench_city.py --work /tmp/b --grid 2x2 --preset tiny --tile-preset tiny --tile-size 64 --overlap 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _run(cmd: list[str], log: Path) -> float:
    """Run a skyfall command with one thread per process (as the tiles' tasks); returns its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, "-m", "skyfall", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): skyfall {' '.join(cmd)}; see {log}")
    return wall


def _render_ply(ply: Path, cam) -> np.ndarray:  # noqa: ANN001
    from skyfall.export.bake import render_splats
    from skyfall.export.formats import read_ply

    return render_splats(read_ply(ply), cam)[0]


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of uint8 images over ``mask``: skyfall's own metric (skyfall.eval.image_metrics)."""
    import torch

    from skyfall.eval.image_metrics import psnr

    return psnr(torch.from_numpy(a) / 255.0, torch.from_numpy(b) / 255.0, torch.from_numpy(mask))


def _error_map(heights: np.ndarray, grid, truth_city, manifest, size: int) -> np.ndarray:  # noqa: ANN001
    """|DSM - truth| as an image (0 m black .. 5 m white, NaN red) with the core borders in cyan."""
    from PIL import Image

    rows, cols = np.mgrid[0 : grid.height, 0 : grid.width]
    x = grid.x_min + (cols + 0.5) * grid.resolution
    y = grid.y_max - (rows + 0.5) * grid.resolution
    err = np.abs(heights - truth_city.height_at(x, y))
    v = np.clip(np.nan_to_num(err, nan=0.0) / 5.0, 0, 1)
    img = np.stack([v, v, v], -1)
    img[~np.isfinite(err)] = (1, 0, 0)
    for cell in manifest.cells:
        for ex in cell.core[:2]:
            j = int(round((ex - grid.x_min) / grid.resolution))
            if 0 < j < grid.width:
                img[:, max(0, j - 1) : j + 1] = (0, 1, 1)
        for ey in cell.core[2:]:
            i = int(round((grid.y_max - ey) / grid.resolution))
            if 0 < i < grid.height:
                img[max(0, i - 1) : i + 1, :] = (0, 1, 1)
    pil = Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(pil)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--grid", default="2x2")
    ap.add_argument("--tile-size", type=float, default=128.0)
    ap.add_argument("--overlap", type=float, default=16.0)
    ap.add_argument("--tile-preset", default="default", help="synthetic tile preset (views, pixels)")
    ap.add_argument("--preset", default="demo", help="training preset of every tile and of the single tile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", default="default")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="more training options (e.g. --stage1.steps 500)",
    )
    ap.add_argument("--picture", type=Path, default=None, help="PNG to write (default WORK/city.png)")
    args = ap.parse_args()

    from PIL import Image, ImageDraw

    from skyfall.city.export import dsm_seam_report, export_city
    from skyfall.city.folders import CityFolder
    from skyfall.city.manifest import CityCell
    from skyfall.city.merge import ownership_mask
    from skyfall.city.synth import parse_grid, write_synthetic_city
    from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at
    from skyfall.dsm import read_geotiff
    from skyfall.export.dsm import export_dsm
    from skyfall.export.formats import read_ply, write_ply
    from skyfall.export.run import export_run
    from skyfall.synth.city import SyntheticCity
    from skyfall.synth.writer import write_synthetic_tile

    rows, cols = parse_grid(args.grid)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = work / "city_src"
    t0 = time.perf_counter()
    manifest = write_synthetic_city(
        src, rows, cols, tile_size_m=args.tile_size, overlap_m=args.overlap, preset=args.tile_preset,
        seed=args.seed, style=args.style,
    )  # fmt: skip
    x0, x1, y0, y1 = manifest.bounds
    side = max(rows, cols) * args.tile_size + 2 * args.overlap
    single_tile = work / "single_tile"
    if not (single_tile / "synth.json").is_file():
        write_synthetic_tile(
            single_tile, preset=args.tile_preset, seed=args.seed, overwrite=True, style=args.style,
            city_size_m=side, window=(0.5 * (x0 + x1), 0.5 * (y0 + y1), max(x1 - x0, y1 - y0)),
        )  # fmt: skip
    synth_s = time.perf_counter() - t0

    res: dict = {"grid": args.grid, "tile_size_m": args.tile_size, "overlap_m": args.overlap,
                 "tile_preset": args.tile_preset, "preset": args.preset, "extra": args.extra,
                 "seed": args.seed, "style": args.style, "cpus": os.cpu_count(), "synth_s": round(synth_s, 1),
                 "city_train": {}}  # fmt: skip
    before = (
        json.loads((work / "bench_city.json").read_text()) if (work / "bench_city.json").is_file() else {}
    )
    city = None
    for w in args.workers:
        city = work / f"city_w{w}"
        if not (city / "city_train.json").is_file():
            if city.exists():
                shutil.rmtree(city)
            shutil.copytree(src, city)
            wall = _run(
                ["city", "train", str(city), "--preset", args.preset, "--stages", "stage1", "--workers", str(w),
                 *args.extra], work / f"city_w{w}.log",
            )  # fmt: skip
        else:  # trained by an earlier call: its measured time
            wall = float(before.get("city_train", {}).get(str(w), {}).get("wall_s", float("nan")))
        summary = json.loads((city / "city_train.json").read_text())
        res["city_train"][w] = {
            "wall_s": round(wall, 1),
            "driver_wall_s": summary["wall_s"],
            "ray_start_s": summary["ray_start_s"],
            "tile_wall_s": {n: t["wall_s"] for n, t in summary["tiles"].items()},
        }
        print(f"[bench] city train, {w} worker(s): {wall:.1f} s", flush=True)
    assert city is not None
    folder = CityFolder(city)
    t = time.perf_counter()
    exp = export_city(city, up="z", embedding="sat_00")
    res["export_s"] = round(time.perf_counter() - t, 1)
    res["merged"] = {"splats": exp.total, "dsm": exp.seams}

    run_single = work / "run_single"
    res["single_train_s"] = before.get("single_train_s")
    if not (run_single / "summary.json").is_file():
        res["single_train_s"] = round(
            _run(["train", "stage1", "--data", str(single_tile), "--out", str(run_single), "--preset", args.preset, "--overwrite",
                  *args.extra], work / "single.log"), 1,
        )  # fmt: skip
    d = export_dsm(run_single, progress=False)
    single_h = read_geotiff(d.path).heights.astype(np.float64)
    res["single"] = {"dsm": dsm_seam_report(city, (single_h, d.grid), write=False)}
    ply_single = export_run(run_single, "ply", up="z", embedding=0, out=work / "single_zup.ply").path

    # The picture: 45° views (ground truth, merged, single) and the DSM error maps.
    truth = SyntheticCity.generate(args.seed, side, args.style)
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    ext = max(x1 - x0, y1 - y0)
    px = 384
    eye = np.array([cx + 0.6 * ext, cy - 0.9 * ext, 1.1 * ext])
    import torch

    c2w = look_at(torch.tensor(eye), torch.tensor([cx, cy, 0.0]))
    cam = Cameras(c2w[None], intrinsics_from_fov(50.0, px, px), px, px)
    gt = (
        (truth.render(cam, date=None, supersample=2)["rgb"][0].clamp(0, 1).numpy() * 255)
        .round()
        .astype(np.uint8)
    )
    merged_img = _render_ply(folder.export_dir / "city.ply", cam)
    # the single tile cropped to the city, as the merge crops each tile to its core: same area shown
    s1 = read_ply(ply_single)
    keep = ownership_mask(s1.means, CityCell("city", 0, 0, manifest.bounds, 0.0), manifest.bounds)
    single_img = _render_ply(write_ply(work / "single_zup_city.ply", s1.subset(np.nonzero(keep)[0])), cam)
    # PSNR over the pixels whose true surface lies inside the city (the generated city has a margin)
    depth = truth.render(cam, date=None)["depth"][0].double().numpy()
    v, u = np.mgrid[0:px, 0:px]
    k = cam.Ks[0].numpy()
    ray = np.stack([(u + 0.5 - k[0, 2]) / k[0, 0], (v + 0.5 - k[1, 2]) / k[1, 1], np.ones_like(depth)], -1)
    world = (ray * np.where(np.isfinite(depth), depth, 0.0)[..., None]) @ c2w[:3, :3].numpy().T
    world = world + c2w[:3, 3].numpy()
    inside = (
        np.isfinite(depth) & (np.abs(world[..., 0] - cx) <= ext / 2) & (np.abs(world[..., 1] - cy) <= ext / 2)
    )
    res["view_psnr_db"] = {
        "merged": round(_psnr(merged_img, gt, inside), 2),
        "single": round(_psnr(single_img, gt, inside), 2),
        "pixels": int(inside.sum()),
    }
    err_m = _error_map(exp.dsm.heights, exp.dsm.grid, truth, manifest, px)
    err_s = _error_map(single_h, d.grid, truth, manifest, px)
    top = np.concatenate([gt, merged_img, single_img], 1)
    preview = np.asarray(Image.open(folder.export_dir / "dsm.png").convert("RGB").resize((px, px)))
    bottom = np.concatenate([err_m, err_s, preview], 1)
    sheet = Image.fromarray(np.concatenate([top, bottom], 0))
    draw = ImageDraw.Draw(sheet)
    md, sd = res["merged"]["dsm"], res["single"]["dsm"]
    labels = [
        (0, 0, "ground truth (45 deg; PSNR inside the city)"),
        (px, 0, f"merged {args.grid} city: {res['view_psnr_db']['merged']:.2f} dB"),
        (2 * px, 0, f"one tile, same area: {res['view_psnr_db']['single']:.2f} dB"),
        (
            0,
            px,
            f"merged |DSM - truth| 0-5 m; MAE {md['all']['mae_m']:.2f} m, seams {md['seam']['mae_m']:.2f} m",
        ),
        (px, px, f"one tile: MAE {sd['all']['mae_m']:.2f} m, seams {sd['seam']['mae_m']:.2f} m"),
        (2 * px, px, "merged DSM mosaic"),
    ]
    for x, y, text in labels:
        draw.rectangle([x, y, x + 6 * len(text) + 6, y + 13], fill=(0, 0, 0))
        draw.text((x + 3, y + 1), text, fill=(255, 255, 255))
    pic = args.picture or work / "city.png"
    pic.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(pic)
    res["picture"] = str(pic)
    (work / "bench_city.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()

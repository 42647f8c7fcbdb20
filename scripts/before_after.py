"""Render one ground-truth view of a synthetic tile with two checkpoints, beside the ground truth.

    python scripts/before_after.py RUN --before RUN/ckpts/ckpt_001500.pt --after RUN/ckpts/ckpt_003500.pt \
        --set orbit_e45_r250 --views 0 3 --out before_after.png

Writes a PNG grid (rows = views; columns = before, after, ground truth) with the PSNR of each render.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from skyfall.data.camera_path import read_camera_path
from skyfall.eval.image_metrics import psnr
from skyfall.eval.runner import load_scene
from skyfall.storage.run_dir import RunDir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--set", default="orbit_e45_r250", help="ground-truth view set under TILE/gt/views")
    ap.add_argument("--views", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    tile = Path(RunDir(args.run).load_config()["data"])
    gt_dir = tile / "gt" / "views" / args.set
    cams = read_camera_path(gt_dir / "camera_path.json")
    rows = []
    for label_ckpt in (args.before, args.after):
        scene, st = load_scene(label_ckpt)
        emb = scene.novel_embedding("mean")
        row = []
        for v in args.views:
            gt = (
                torch.from_numpy(
                    np.array(Image.open(gt_dir / "images" / f"{v:05d}.png").convert("RGB"))
                ).float()
                / 255
            )
            with torch.no_grad():
                img = scene.render(cams[v], emb, absgrad=False).colors[0].clamp(0, 1)
            row.append((img, psnr(img, gt), int(st["step"])))
        rows.append(row)
    tiles = []
    for i, v in enumerate(args.views):
        gt = np.array(Image.open(gt_dir / "images" / f"{v:05d}.png").convert("RGB"))
        cells = []
        for r, name in zip(rows, ("before", "after"), strict=True):
            img, p, step = r[i]
            im = Image.fromarray((img.numpy() * 255 + 0.5).astype(np.uint8))
            ImageDraw.Draw(im).text((4, 4), f"{name} (step {step}) {p:.1f} dB", fill=(255, 255, 0))
            cells.append(np.asarray(im))
        g = Image.fromarray(gt)
        ImageDraw.Draw(g).text((4, 4), "ground truth", fill=(255, 255, 0))
        cells.append(np.asarray(g))
        tiles.append(np.concatenate(cells, axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""What a web viewer shows: render exported PLYs (baked, as viewers blend them) from a 45° orbit view.

Each PLY is read back from disk (``skyfall export`` output, 3D filter and appearance baked in) and
alpha-blended with the torch rasteriser from one camera of the tile's 45° ground-truth orbit, next to
the ground-truth render of that camera; the images are stacked side by side with their labels and
the PSNR against the ground truth.

    skyfall export RUN --up z      # RUN/ply/export_zup.ply: the splats a viewer loads, in the tile frame
    python scripts/viewer_view.py --tile TILE --ply before_zup.ply after_zup.ply --labels before after --out view.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tile", type=Path, required=True, help="synthetic tile (its gt/ 45° orbit)")
    ap.add_argument("--ply", type=Path, nargs="+", required=True)
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--frame", type=int, default=0, help="orbit frame index")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from skyfall.data.camera_path import read_camera_path
    from skyfall.export.bake import render_splats
    from skyfall.export.formats import read_ply

    gt_dir = next(p for p in sorted((args.tile / "gt" / "views").iterdir()) if "e45" in p.name)
    cams = read_camera_path(gt_dir / "camera_path.json")
    cam = cams[args.frame]
    gt = np.asarray(Image.open(sorted((gt_dir / "images").glob("*.png"))[args.frame]).convert("RGB"))
    tiles, labels = [gt], ["ground truth"]
    for i, ply in enumerate(args.ply):
        s = read_ply(ply)
        img = render_splats(s, cam)[0]
        mse = np.mean((img.astype(np.float64) - gt) ** 2)
        name = args.labels[i] if args.labels and i < len(args.labels) else ply.parent.parent.name
        tiles.append(img)
        labels.append(f"{name}: {10 * np.log10(255.0**2 / max(mse, 1e-12)):.2f} dB, {len(s)} splats")
    strip = Image.fromarray(np.concatenate(tiles, 1))
    d = ImageDraw.Draw(strip)
    w = gt.shape[1]
    for i, text in enumerate(labels):
        d.rectangle([i * w, 0, i * w + 7 * len(text) + 6, 14], fill=(0, 0, 0))
        d.text((i * w + 3, 2), text, fill=(255, 255, 255))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out)
    print(json.dumps({"out": str(args.out), "labels": labels}))


if __name__ == "__main__":
    main()

"""Picture of a real-imagery chain: a training view, the Stage 1 render of it, the exported DSM and an
oblique render (what README's "Real imagery" figure shows).

    python scripts/real_chain_figure.py --tile TILE --run RUN --out assets/giza_real_chain.png

RUN must have been exported with ``skyfall export RUN --format dsm`` (its dsm/dsm.png is used).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from skyfall.data.camera_path import orbit_camtoworlds
from skyfall.data.cameras import Cameras, intrinsics_from_fov
from skyfall.data.tile import load_tile
from skyfall.export.run import load_run


def _u8(img: torch.Tensor) -> np.ndarray:  # [H, W, 3] in [0, 1]
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def _fit(a: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(a)
    s = size / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--view", type=int, default=0, help="training view to show")
    ap.add_argument("--elevation", type=float, default=55.0, help="oblique view elevation (degrees)")
    ap.add_argument("--size", type=int, default=384, help="panel size (pixels)")
    a = ap.parse_args()
    torch.set_num_threads(1)

    loaded = load_run(a.run)
    scene = loaded.scene
    tile = load_tile(a.tile, resolution=int(loaded.config.get("resolution", 1)))
    with torch.no_grad():
        gt = tile.train.images[a.view].numpy()
        render = scene.render(tile.train.cameras[a.view], a.view, absgrad=False).colors[0]
        pts = tile.points.double()
        centre = pts.median(dim=0).values
        half = float((pts[:, :2] - centre[:2]).abs().max())
        radius = 2.6 * half
        c2w = orbit_camtoworlds(tuple(centre.tolist()), radius, a.elevation, 8)[1:2]
        cam = Cameras(c2w, intrinsics_from_fov(45.0, a.size, a.size), a.size, a.size)
        oblique = scene.render(cam, scene.novel_embedding("mean"), absgrad=False).colors[0]
    dsm = np.asarray(Image.open(a.run / "dsm" / "dsm.png").convert("RGB"))
    panels = [
        ("training view", _fit(gt, a.size)),
        (f"Stage 1 render (step {loaded.step})", _fit(_u8(render), a.size)),
        ("exported DSM", _fit(dsm, a.size)),
        (f"{a.elevation:g} deg oblique render", _fit(_u8(oblique), a.size)),
    ]
    h = max(p.height for _, p in panels) + 22
    sheet = Image.new("RGB", (sum(p.width for _, p in panels) + 8 * (len(panels) - 1), h), "white")
    x = 0
    draw = ImageDraw.Draw(sheet)
    for title, p in panels:
        sheet.paste(p, (x, 22))
        draw.text((x + 4, 4), title, fill="black")
        x += p.width + 8
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    print(f"{a.out}: {sheet.width}x{sheet.height}, radius {radius:.0f} m, step {loaded.step}", flush=True)


if __name__ == "__main__":
    main()

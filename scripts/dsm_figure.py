"""Side-by-side picture of DSM GeoTIFFs against a truth DSM: heights on one colour scale, and each DSM's
error after the DFC2019 registration (``skyfall.eval.geometry.dsm_metrics``: NCC shift within +-5
cells, then the vertical offset), its MAE in the label.

    python scripts/dsm_figure.py city/rpc/dsm.tif tile/dense/dsm.tif run/dsm/dsm.tif \\
        --labels "stereo (prepare)" "Stage 1" --out dsms.png

The DSMs must share the truth's CRS and cell size with cell edges on the same lattice (what
``skyfall prepare``'s dense/dsm.tif and ``skyfall export --format dsm`` write on a UTM truth at 0.5 m);
they are cut to the cells all of them cover. Errors: blue = below the truth, red = above, +-``--err``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def common_window(rasters: list) -> list[np.ndarray]:  # noqa: ANN001 - skyfall.dsm.GeoRaster
    """Each raster's heights on the cells every raster covers (same CRS and lattice required)."""
    g0 = rasters[0].grid
    for r in rasters[1:]:
        g = r.grid
        off = ((g.x_min - g0.x_min) / g0.resolution, (g0.y_max - g.y_max) / g0.resolution)
        if (
            g.resolution != g0.resolution
            or any(abs(o - round(o)) > 1e-6 for o in off)
            or r.crs != rasters[0].crs
        ):
            raise SystemExit(f"{r.path}: not on the grid of {rasters[0].path} (CRS, cell or lattice differ)")
    x0 = max(r.grid.x_min for r in rasters)
    x1 = min(r.grid.x_max for r in rasters)
    y1 = min(r.grid.y_max for r in rasters)
    y0 = max(r.grid.y_min for r in rasters)
    res = g0.resolution
    w, h = round((x1 - x0) / res), round((y1 - y0) / res)
    if w <= 0 or h <= 0:
        raise SystemExit("the DSMs do not overlap")
    out = []
    for r in rasters:
        c, rr = round((x0 - r.grid.x_min) / res), round((r.grid.y_max - y1) / res)
        out.append(r.heights[rr : rr + h, c : c + w])
    return out


def _legend(shape: tuple[int, ...], err: float, colorize) -> np.ndarray:  # noqa: ANN001
    """The error colours as a bar with its ends labelled, on white, in a tile of ``shape``."""
    h, w = shape[:2]
    tile = np.full((h, w, 3), 255, np.uint8)
    bar = colorize(np.tile(np.linspace(-err, err, w - 20), (16, 1)), -err, err, "diverging")
    y = h // 2 - 8
    tile[y : y + 16, 10 : w - 10] = bar
    im = Image.fromarray(tile)
    d = ImageDraw.Draw(im)
    d.text((10, y - 28), "error after registration", fill=(0, 0, 0))
    d.text((10, y + 20), f"-{err:g} m (low)", fill=(0, 0, 0))
    d.text((w - 80, y + 20), f"+{err:g} m (high)", fill=(0, 0, 0))
    return np.asarray(im)


def figure(
    truth_path: Path, paths: list[Path], labels: list[str], err: float = 5.0, max_side: int = 400
) -> np.ndarray:
    from skyfall.dsm import colorize, read_geotiff
    from skyfall.eval.geometry import dsm_metrics, shift_image
    from skyfall.eval.report import label_image

    rasters = [read_geotiff(truth_path), *(read_geotiff(p) for p in paths)]
    truth, *preds = common_window(rasters)
    fin = np.isfinite(truth)
    lo, hi = np.percentile(truth[fin], 1), np.percentile(truth[fin], 99)
    step = max(1, int(np.ceil(max(truth.shape) / max_side)))
    top = [label_image(colorize(truth, lo, hi)[::step, ::step], "truth")]
    bottom = [_legend(top[0].shape, err, colorize)]
    for pred, label in zip(preds, labels, strict=True):
        m = dsm_metrics(pred, truth, radius=5, pyramid=False)
        reg = shift_image(pred, int(m["shift_rows"]), int(m["shift_cols"])) + m["dz_m"]
        top.append(label_image(colorize(pred, lo, hi)[::step, ::step], label))
        diff = colorize(reg - truth, -err, err, "diverging")[::step, ::step]
        bottom.append(label_image(diff, f"{label}: MAE {m['dsm_mae_m']:.2f} m"))
    gap = np.full((top[0].shape[0], 4, 3), 255, np.uint8)
    row = lambda tiles: np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)  # noqa: E731
    return np.concatenate([row(top), np.full((4, row(top).shape[1], 3), 255, np.uint8), row(bottom)], axis=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("truth", type=Path)
    p.add_argument("dsms", type=Path, nargs="+")
    p.add_argument("--labels", nargs="+", help="one per DSM (default: the file names)")
    p.add_argument("--err", type=float, default=5.0, help="error colour range +- metres")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    labels = a.labels or [d.name for d in a.dsms]
    if len(labels) != len(a.dsms):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(a.dsms)} DSMs")
    Image.fromarray(figure(a.truth, a.dsms, labels, a.err)).save(a.out)
    print(a.out)


if __name__ == "__main__":
    main()

"""``skyfall info``: a compact summary of a tile folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tyro

if TYPE_CHECKING:
    from torch import Tensor

    from skyfall.data.tile import Tile


@dataclass
class Info:
    """Summarise a tile folder: frames, image size, camera geometry (focal, distance, GSD), point cloud.

    Loads the tile exactly as training does, so a tile that passes ``skyfall info`` also loads for training.
    """

    tile: tyro.conf.Positional[Path]
    """The tile folder (holding transforms_train.json, images/, points3D.txt)."""
    resolution: int = 1
    """Downscale factor to load with: 1 = native, or a power of two."""

    def main(self) -> None:
        from skyfall.data.tile import load_tile

        tile = load_tile(self.tile, resolution=self.resolution)
        for line in summarize(tile):
            print(line)


def _range(values: Tensor, fmt: str = ".4g") -> str:
    lo, hi = float(values.min()), float(values.max())
    return (
        f"{lo:{fmt}}" if abs(hi - lo) <= 1e-12 * max(abs(lo), abs(hi), 1.0) else f"{lo:{fmt}} .. {hi:{fmt}}"
    )


def summarize(tile: Tile) -> list[str]:
    """Summary lines of a loaded ``skyfall.data.tile.Tile``.

    The camera distance is measured from each camera centre to the median point of the point cloud
    (a robust scene centre), and GSD ≈ distance / focal is the ground size of one pixel at that distance.
    """
    import torch

    train, test = tile.train, tile.test
    pts = tile.points
    cams = torch.cat([train.cameras.camtoworlds, test.cameras.camtoworlds])
    ks = torch.cat([train.cameras.Ks, test.cameras.Ks])
    focal = 0.5 * (ks[:, 0, 0] + ks[:, 1, 1])
    centre = pts.median(dim=0).values
    dist = (cams[:, :3, 3] - centre).norm(dim=-1)
    gsd = dist / focal
    w, h = tile.width, tile.height
    unit = "m" if tile.normalization is None else "units"  # normalised tiles lose the metre scale
    lines = [
        f"tile         {tile.root}",
        f"frames       train {len(train)}, test {len(test)}",
        f"image size   {w} x {h} px",
        f"valid pixels {train.masks.float().mean().item():.1%} (train masks)",
        f"focal        fx {_range(ks[:, 0, 0])}, fy {_range(ks[:, 1, 1])} px",
        f"pp offset    cx - W/2 {_range(ks[:, 0, 2] - w / 2)}, cy - H/2 {_range(ks[:, 1, 2] - h / 2)} px",
        f"distance     {_range(dist)} {unit} (camera centre to median point)",
        f"approx. GSD  {_range(gsd)} {unit}/px (distance / focal)",
        f"points       {len(pts)}, bbox min {_fmt_vec(pts.min(dim=0).values)} max {_fmt_vec(pts.max(dim=0).values)}",
    ]
    norm = tile.normalization
    if norm is None:
        lines.append("normalised   no (raw world frame)")
    else:
        lines.append(f"normalised   yes (R/T present): scale {norm['scale']:.6g}, z_min {norm['z_min']:.6g}")
    if tile.meta:
        lines.append(f"synthetic    {_fmt_meta(tile.meta)}")
    return lines + _prepared(Path(tile.root))


def _prepared(root: Path) -> list[str]:
    """What a tile made by ``skyfall prepare`` records: AOI and heights (``prepare.json``), the stereo
    DSM (``dense/dsm.json``), the truth DSM."""
    import json

    from skyfall.cli.prepare import dsm_summary

    path = root / "prepare.json"
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
        a = doc["aoi"]
        lines = [
            f"prepared     AOI {a['lon']:.6f},{a['lat']:.6f} {a['size_m']:g} m, heights "
            f"{a['alt_range'][0]:g}..{a['alt_range'][1]:g} m above the WGS84 ellipsoid ({path.name})"
        ]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return [f"prepared     {path}: unreadable ({type(e).__name__}: {e})"]
    meta = root / "dense" / "dsm.json"
    if meta.is_file():
        try:
            lines.append(f"stereo DSM   {dsm_summary(json.loads(meta.read_text()), root)}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            lines.append(f"stereo DSM   {meta}: unreadable ({type(e).__name__}: {e})")
    if doc.get("truth_dsm"):
        lines.append(f"truth DSM    {doc['truth_dsm']}")
    return lines


def _fmt_vec(v: Tensor) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _fmt_meta(meta: dict) -> str:
    """Top-level keys of synth.json, one line: scalars in full, containers by their size."""
    parts = []
    for key, value in meta.items():
        if isinstance(value, (list, tuple)):
            parts.append(f"{key}=[{len(value)} items]")
        elif isinstance(value, dict):
            parts.append(f"{key}={{{len(value)} keys}}")
        else:
            parts.append(f"{key}={value}")
    line = ", ".join(parts)
    return line if len(line) <= 300 else line[:297] + "..."

"""Evaluation outputs: per-view CSV, summary CSV, JSON, a PNG grid per checkpoint and an HTML report.

::

    OUT/eval.json            everything (options, unavailable metrics + reasons, per view/set/band, geometry)
    OUT/views.csv            one row per (checkpoint, view)
    OUT/summary.csv          one row per (checkpoint, group): set / altitude band / geometry source
    OUT/grid_<ckpt>.png      per GT set: reference | render | |error| | GT depth | depth | depth error
    OUT/dsm_<ckpt>.png       GT DSM | predicted DSMs | registered error
    OUT/dsm_truth_<ckpt>.tif      --dsm-truth: our DSM resampled onto the (cropped) truth grid, unregistered
    OUT/dsm_truth_diff_<ckpt>.tif --dsm-truth: registered prediction - truth, same grid and CRS as the truth
    OUT/dsm_truth_diff_<ckpt>.png   its preview (blue -5 m .. red +5 m)
    OUT/report.html          the tables and figures
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from skyfall.dsm import colorize, write_geotiff, write_preview
from skyfall.storage.atomic import atomic_write_text

SUMMARY_COLS = ("ckpt", "kind", "group", "n_views", "altitude_m", "psnr", "ssim", "lpips", "dreamsim",
                "depth_absrel", "coverage", "clip_fid", "cmmd", "dsm_mae_m", "dsm_rmse_m", "dsm_completeness",
                "dsm_mae_unregistered_m", "dsm_mae_subcell_m", "shift_rows", "shift_cols", "shift_rows_subcell",
                "shift_cols_subcell", "dz_m", "protocol")  # fmt: skip

# ----------------------------------------------------------------------------- metric protocols
# Two protocols score the same run differently, and both are printed: the trainers' summary
# (skyfall.train.stage1.evaluate: held-out PSNR with a fitted embedding, DSM unregistered) and
# `skyfall eval` (every view with one novel-view embedding, DSM registered). Every printed figure
# carries one of these labels, so that the two are never compared as if they were one.

REGISTERED = "NCC shift + mean vertical offset registered"
DSM_SUMMARY_PROTOCOL = "median depth seen straight down, unregistered"
"""The trainers' ``dsm_mae_m`` (``skyfall.eval.dsm.dsm_errors`` of ``render_dsm``)."""


def embedding_label(rule: object) -> str:
    """'mean embedding' or 'embedding of training image 6' for a novel-view embedding rule."""
    return "mean embedding" if str(rule) == "mean" else f"embedding of training image {rule}"


def heldout_protocol(eval_appearance: str, test_embedding: object = "mean", appearance: bool = True) -> str:
    """How the trainers' ``psnr_test`` was measured (``Stage1Config.eval_appearance``)."""
    if not appearance:
        return "no appearance model, whole image"
    if eval_appearance == "fit-left-half":
        return "appearance fitted on the left half, scored on the right"
    return f"{embedding_label(test_embedding)}, whole image"


def eval_image_protocol(rule: object, satellite: bool = False) -> str:
    """How ``skyfall eval`` scores images: one novel-view embedding on the whole view."""
    return f"{embedding_label(rule)}, whole image" + (" (valid pixels)" if satellite else "")


def eval_dsm_protocol(source: str, *, geometry_views: int = 0, shift_radius: int = 5) -> str:
    """How ``skyfall eval`` computes the DSM of geometry source ``source`` and scores it."""
    what = {
        "nadir": "median depth seen straight down",
        "nadir_expected": "expected (alpha-blended) depth seen straight down",
        "views": f"depth of {geometry_views} training views flattened (plyflatten r=1)",
        "truth": f"median depth resampled onto the truth grid, shift within +-{shift_radius} cells",
        "stereo": "the tile's stereo DSM (prepare's dense heights, before any training) resampled onto the "
        f"truth grid, shift within +-{shift_radius} cells",
    }.get(source, source)
    return f"{what}, {REGISTERED}"


# Report headings of metrics whose name is not an acronym.
METRIC_TITLES = {"dreamsim": "DreamSim"}

VIEW_COLS = ("ckpt", "set", "view", "band", "altitude_m", "psnr", "ssim", "lpips", "dreamsim", "depth_absrel",
             "coverage")  # fmt: skip


def _clean(x: object) -> object:
    """JSON-safe copy: NaN/inf -> null, numpy scalars -> Python, paths -> str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def summary_rows(doc: dict) -> list[dict]:
    """Flatten the per-set, per-band and geometry results of every checkpoint to table rows."""
    rows = []
    for ck in doc["checkpoints"]:
        for kind, key in (("set", "by_set"), ("band", "by_band")):
            for g, vals in ck[key].items():
                rows.append({"ckpt": ck["label"], "kind": kind, "group": g, **vals})
        allg = ck["distribution"].get("all", {}).get("gt_views")
        if allg:
            rows.append({"ckpt": ck["label"], "kind": "all", "group": "gt_views", **allg})
        for src, vals in ck["geometry"].items():
            rows.append({"ckpt": ck["label"], "kind": "geometry", "group": f"dsm_{src}", **vals})
    if doc.get("stereo_dsm"):
        rows.append({"ckpt": "prepare", "kind": "geometry", "group": "dsm_stereo", **doc["stereo_dsm"]})
    return rows


def _write_csv(path: Path, rows: list[dict], cols: tuple[str, ...]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in cols])


def label_image(img: np.ndarray, text: str) -> np.ndarray:
    """``img`` (uint8 RGB) with ``text`` in white on a black band at its top left."""
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, min(im.width, 7 * len(text) + 6), 12], fill=(0, 0, 0))
    d.text((3, 0), text, fill=(255, 255, 255))
    return np.asarray(im)


def _grid_png(path: Path, samples: dict[str, dict]) -> None:
    """One row per view set: reference | render | |error| | GT depth | rendered depth | depth error."""
    rows = []
    size = max(160, max(max(s["gt"].shape[:2]) for s in samples.values()))  # room for the labels
    for name, s in samples.items():
        gt, pred = s["gt"], s["pred"]
        err = np.abs(gt.astype(np.float64) - pred.astype(np.float64)).mean(-1) / 255.0
        tiles = [label_image(gt, f"{name} GT"), label_image(pred, "render " + " ".join(f"{k} {v:.3f}" for k, v in s["metrics"].items())),
                 label_image(colorize(err, 0, 0.5, "inferno"), "|err| 0-0.5")]  # fmt: skip
        dgt, dpr = s["gt_depth"], s["depth"]
        if dgt is not None:
            fin = np.isfinite(dgt)
            lo, hi = (np.percentile(dgt[fin], 2), np.percentile(dgt[fin], 98)) if fin.any() else (0, 1)
            derr = np.abs(dpr - dgt) / np.where(fin, dgt, np.nan)
            tiles += [label_image(colorize(dgt, lo, hi), "GT depth"), label_image(colorize(dpr, lo, hi), "depth"),
                      label_image(colorize(derr, 0, 0.2, "inferno"), "|rel err| 0-0.2")]  # fmt: skip
        else:
            fin = np.isfinite(dpr)
            lo, hi = (np.percentile(dpr[fin], 2), np.percentile(dpr[fin], 98)) if fin.any() else (0, 1)
            blank = np.full_like(gt, 40)
            tiles += [blank, label_image(colorize(dpr, lo, hi), "depth"), blank]
        tiles = [np.asarray(Image.fromarray(t).resize((size, size), Image.NEAREST)) for t in tiles]
        rows.append(np.concatenate(tiles, 1))
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def _dsm_png(path: Path, maps: dict[str, np.ndarray], geometry: dict[str, dict]) -> None:
    gt = maps["gt"]
    fin = np.isfinite(gt)
    lo, hi = np.percentile(gt[fin], 1), np.percentile(gt[fin], 99)
    tiles = [label_image(colorize(gt, lo, hi), "GT DSM")]
    for name, pred in maps.items():
        if name == "gt":
            continue
        g = geometry.get(name, {})
        tiles.append(
            label_image(colorize(pred, lo, hi), f"{name} MAE {g.get('dsm_mae_m', float('nan')):.2f} m")
        )
        from skyfall.eval.geometry import shift_image

        reg = shift_image(pred, int(g.get("shift_rows", 0)), int(g.get("shift_cols", 0))) + g.get("dz_m", 0.0)
        tiles.append(label_image(colorize(np.abs(reg - gt), 0, 5, "inferno"), f"{name} |err| 0-5 m"))
    Image.fromarray(np.concatenate(tiles, 1)).save(path)


def _table(rows: list[dict], cols: tuple[str, ...]) -> str:
    cols = tuple(c for c in cols if any(_fmt(r.get(c)) for r in rows))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def band_comparison(doc: dict, metric: str = "psnr") -> list[dict]:
    """One row per altitude band, one column per checkpoint: Stage 1 vs Stage 2 at a glance."""
    bands: dict[str, dict] = {}
    for ck in doc["checkpoints"]:
        for b, vals in ck["by_band"].items():
            bands.setdefault(b, {"band": b, "altitude_m": vals.get("altitude_m")})[ck["label"]] = vals.get(
                metric
            )
    return sorted(bands.values(), key=lambda r: -(r["altitude_m"] or 0))


def write_outputs(out: Path, doc: dict) -> None:
    """Write eval.json, views.csv, summary.csv, PNG figures and report.html under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for ck in doc["checkpoints"]:
        safe = ck["label"].replace("@", "_").replace("/", "_")
        samples, maps = ck.pop("_samples", {}), ck.pop("_dsm", {})
        ts = ck.pop("_truth", None)
        if ts is not None:
            tags = {"SKYFALL_SOURCE": ck["label"], "SKYFALL_TRUTH": ck["geometry"]["truth"].get("file", "")}
            write_geotiff(out / f"dsm_truth_{safe}.tif", ts.pred, ts.grid, ts.crs, tags=tags)
            write_geotiff(out / f"dsm_truth_diff_{safe}.tif", ts.diff, ts.grid, ts.crs, tags=tags,
                          description="registered prediction - truth")  # fmt: skip
            write_preview(out / f"dsm_truth_diff_{safe}.png", ts.diff, diverging=5.0)
            figures.append(
                (ck["label"] + " DSM - truth (registered, -5..+5 m)", f"dsm_truth_diff_{safe}.png")
            )
        if samples:
            _grid_png(out / f"grid_{safe}.png", samples)
            figures.append((ck["label"], f"grid_{safe}.png"))
        if "gt" in maps and len(maps) > 1:
            _dsm_png(out / f"dsm_{safe}.png", maps, ck["geometry"])
            figures.append((ck["label"] + " DSM", f"dsm_{safe}.png"))
    doc["figures"] = [f for _, f in figures]
    atomic_write_text(out / "eval.json", json.dumps(_clean(doc), indent=1))
    _write_csv(out / "views.csv", [r for ck in doc["checkpoints"] for r in ck["views"]], VIEW_COLS)
    rows = summary_rows(doc)
    _write_csv(out / "summary.csv", rows, SUMMARY_COLS)

    labels = [ck["label"] for ck in doc["checkpoints"]]
    parts = [
        "<html><head><meta charset='utf-8'><title>skyfall eval</title><style>"
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>skyfall eval: {html.escape(doc['run'])}</h1>",
        f"<p>tile {html.escape(str(doc['data']))}; embedding {html.escape(doc['embedding'])}; "
        f"checkpoints {html.escape(', '.join(labels))}; {doc['wall_s']:.1f} s</p>",
        "<p>" + "<br>".join(html.escape(line) for line in protocol_lines(doc)) + "</p>",
    ]
    if doc["unavailable"]:
        items = "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in doc["unavailable"].items()
        )
        parts.append(f"<h2>Unavailable metrics</h2><ul>{items}</ul>")
    for metric in ("psnr", "ssim", "lpips", "dreamsim", "cmmd"):
        comp = band_comparison(doc, metric)
        if any(r.get(lab) is not None for r in comp for lab in labels):
            title = METRIC_TITLES.get(metric, metric.upper())
            parts.append(
                f"<h2>{title} per altitude band ({html.escape(eval_image_protocol(doc['embedding']))})</h2>"
                + _table(comp, ("band", "altitude_m", *labels))
            )
    parts.append("<h2>Summary</h2>" + _table(rows, SUMMARY_COLS))
    for title, f in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{html.escape(f)}'>")
    parts.append("<h2>Protocol</h2><ul>" + "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in doc["protocol"].items()) + "</ul>")  # fmt: skip
    parts.append("</body></html>")
    atomic_write_text(out / "report.html", "\n".join(parts))


def markdown_table(doc: dict) -> str:
    """A compact Markdown table of the summary (for terminals and notes); each row names its protocol."""
    cols = ("ckpt", "kind", "group", "altitude_m", "psnr", "ssim", "lpips", "dreamsim", "depth_absrel",
            "coverage", "cmmd", "clip_fid", "dsm_mae_m", "dsm_rmse_m", "dsm_completeness",
            "dsm_mae_unregistered_m", "dsm_mae_subcell_m", "protocol")  # fmt: skip
    rows = summary_rows(doc)
    cols = tuple(c for c in cols if any(_fmt(r.get(c)) for r in rows))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def protocol_lines(doc: dict) -> list[str]:
    """What the printed figures mean, and how they differ from the training summary's."""
    rule = doc["embedding"]
    trained = heldout_protocol(doc.get("train_eval_appearance", "fit-left-half"), rule)
    return [
        f"psnr/ssim/lpips/dreamsim: {eval_image_protocol(rule)} (satellite views: their valid pixels); the "
        f"training summary's psnr_test: {trained}",
        f"dsm_mae_m: {REGISTERED}; dsm_mae_unregistered_m: the same DSM unregistered (dsm_nadir's is the "
        f"training summary's dsm_mae_m, '{DSM_SUMMARY_PROTOCOL}'); dsm_mae_subcell_m: the registration's "
        "shift refined to a fraction of a cell (NCC parabola), steadier between near-identical runs",
    ]

"""Stage 2 with FlowEdit vs Top2Ground (each conditioning on and off) from one Stage 1 run: the eval table.

For users with the weights (FLUX.1-dev, FLUX.1-Depth-dev, FLUX.1-Redux-dev in the HF cache, a GPU):

    python scripts/ablate_refiner.py --run runs/jax004 --out ablations/jax004 --preset paper-jax

Each variant continues a copy of the Stage 1 run (OUT/<variant>) with ``skyfall train stage2``, then
``skyfall eval`` scores it; the table prints, per variant and view group (ground-truth sets by
altitude band, held-out satellite views, DSM), PSNR / SSIM / LPIPS and the registered DSM error,
and is saved as OUT/ablation.csv. Finished variants are not run again (their eval/summary.csv is
read), so an interrupted ablation continues where it stopped.

Variants (``--variants``, comma-separated):
    flowedit             the paper's refiner: the render and a text prompt
    top2ground           height-map control + satellite (Redux) semantics
    top2ground-depth     depth-map control instead of the height map, + semantics
    top2ground-geometry  height-map control only (semantics off)
    top2ground-semantics satellite semantics only (geometry off)

Arguments after ``--`` go to every ``train stage2`` call (e.g. ``-- --stage2.max-episodes 1``);
``--eval-args`` to every ``eval`` call.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "flowedit": ["--stage2.refiner", "flowedit"],
    "top2ground": ["--stage2.refiner", "top2ground", "--stage2.top2ground.geometry", "height"],
    "top2ground-depth": ["--stage2.refiner", "top2ground", "--stage2.top2ground.geometry", "depth"],
    "top2ground-geometry": [
        "--stage2.refiner", "top2ground", "--stage2.top2ground.geometry", "height",
        "--stage2.top2ground.no-semantics",
    ],
    "top2ground-semantics": ["--stage2.refiner", "top2ground", "--stage2.top2ground.geometry", "none"],
}  # fmt: skip
"""Variant name -> the ``train stage2`` options that make it."""

COLUMNS = ("psnr", "ssim", "lpips", "dsm_mae_m")


def run_variant(
    name: str, stage1: Path, out: Path, preset: str, extra: list[str], eval_args: list[str]
) -> Path:
    """Stage 2 + eval of one variant in OUT/<name> (skipped when its eval already exists)."""
    folder = out / name
    summary = folder / "eval" / "summary.csv"
    if summary.is_file():
        print(f"[ablate] {name}: done before, reading {summary}", flush=True)
        return summary
    if not folder.exists():
        shutil.copytree(stage1, folder, ignore=shutil.ignore_patterns(".lock", "idu", "eval"))
    train = [sys.executable, "-m", "skyfall", "train", "stage2", "--run", str(folder), "--preset", preset]
    train += VARIANTS[name] + extra
    evaluate = [sys.executable, "-m", "skyfall", "eval", str(folder), *eval_args]
    for cmd in (train, evaluate):
        print(f"[ablate] {name}: {shlex.join(cmd[1:])}", flush=True)
        res = subprocess.run(cmd)
        if res.returncode != 0:
            raise SystemExit(f"[ablate] {name}: `{shlex.join(cmd[1:])}` exited with {res.returncode}")
    return summary


def read_rows(summary: Path) -> list[dict[str, str]]:
    """The last checkpoint's rows of an eval summary.csv."""
    with open(summary, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    last = rows[-1]["ckpt"]
    return [r for r in rows if r["ckpt"] == last]


def table(results: dict[str, list[dict[str, str]]]) -> list[dict[str, str]]:
    """One row per (variant, group) with the compared columns."""
    out = []
    for name, rows in results.items():
        for r in rows:
            out.append({"variant": name, "group": r["group"], **{c: r.get(c, "") for c in COLUMNS}})
    return out


def print_table(rows: list[dict[str, str]]) -> None:
    def fmt(v: str) -> str:
        try:
            return f"{float(v):.3f}"
        except ValueError:
            return v or "-"

    head = ("variant", "group", *COLUMNS)
    widths = [max(len(h), *(len(fmt(r[h]) if h in COLUMNS else r[h]) for r in rows)) for h in head]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        cells = [r["variant"], r["group"], *(fmt(r[c]) for c in COLUMNS)]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished Stage 1 run folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for the variants' runs and the table")
    ap.add_argument("--preset", default="paper-jax", help="Stage 2 preset of every variant")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS)
    )
    ap.add_argument("--eval-args", default="", help="extra `skyfall eval` options, one string")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not (args.run / "config.yml").is_file():
        ap.error(f"--run {args.run}: not a skyfall run folder (no config.yml)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        n: read_rows(run_variant(n, args.run, args.out, args.preset, extra, shlex.split(args.eval_args)))
        for n in names
    }
    rows = table(results)
    with open(args.out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "group", *COLUMNS])
        w.writeheader()
        w.writerows(rows)
    print_table(rows)
    print(f"[ablate] table: {args.out / 'ablation.csv'}")


if __name__ == "__main__":
    main()

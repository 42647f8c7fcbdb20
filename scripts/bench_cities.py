"""Stage 1 on a family of synthetic cities: tune on some, report on others.

For every city (``style:seed``) the script writes the synthetic tile once (cached under ``--cache``),
runs ``skyfall train stage1`` through the CLI with a preset and optional overrides, and prints one
row per city: DSM MAE from the median depth and from the expected (alpha-blended, what a viewer
shows) depth, completeness, the share of the blended weight from near-opaque Gaussians, held-out
PSNR, Gaussian count and wall time; then the mean over the tuning cities and over the held-out
cities. Presets are tuned on the ``--tune`` cities only; the ``--heldout`` ones are the judgement.

    python scripts/bench_cities.py --preset demo --tune default:0,downtown:1 \\
        --heldout suburb:2,mixed:3,downtown:4 -- --stage1.pseudo.no-enabled

Arguments after ``--`` are passed to ``skyfall train stage1`` (overrides). Results are also
written as JSON lines to ``--out/results.jsonl`` so that runs can be compared later.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = (
    ("dsm_mae_m", "DSM MAE median (m)", "{:.2f}"),
    ("dsm_mae_expected_depth_m", "DSM MAE expected (m)", "{:.2f}"),
    ("dsm_completeness", "completeness", "{:.3f}"),
    ("opaque_weight_share", "opaque weight", "{:.3f}"),
    ("psnr_test", "held-out PSNR (dB)", "{:.2f}"),
    ("num_gaussians", "Gaussians", "{:d}"),
    ("wall_s", "wall (s)", "{:.0f}"),
)


def parse_cities(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        style, _, seed = item.partition(":")
        out.append((style, int(seed or 0)))
    return out


def city_tile(cache: Path, style: str, seed: int) -> Path:
    tile = cache / f"{style}_{seed}"
    if not (tile / "synth.json").exists():
        from skyfall.synth import write_synthetic_tile

        t0 = time.perf_counter()
        write_synthetic_tile(tile, preset="default", seed=seed, style=style, overwrite=True)
        print(f"[bench] synthesized {tile} in {time.perf_counter() - t0:.0f} s", flush=True)
    return tile


def run_city(tile: Path, run: Path, preset: str, threads: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "skyfall", "--threads", str(threads), "train", "stage1"]
    cmd += ["--data", str(tile), "--out", str(run), "--preset", preset, "--no-export", *extra]
    if (run / "summary.json").exists():
        return json.loads((run / "summary.json").read_text())["stage1"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
    )
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    s1 = json.loads((run / "summary.json").read_text())["stage1"]
    s1.setdefault("wall_s", time.perf_counter() - t0)
    return s1


def table(rows: list[tuple[str, str, dict]]) -> str:
    head = "| city | set | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, group, r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append("" if v is None else fmt.format(int(v) if fmt == "{:d}" else v))
        lines.append(f"| {name} | {group} | " + " | ".join(cells) + " |")
    for group in ("tune", "held-out"):
        sel = [r for _, g, r in rows if g == group]
        if not sel:
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            vals = [r[key] for r in sel if r.get(key) is not None]
            cells.append(
                ""
                if not vals
                else fmt.format(int(sum(vals) / len(vals)) if fmt == "{:d}" else sum(vals) / len(vals))
            )
        lines.append(f"| **mean** | {group} | " + " | ".join(cells) + " |")
    worst = [r["dsm_mae_m"] for _, g, r in rows if g == "held-out"]
    if worst:
        lines.append(f"\nworst held-out DSM MAE (median depth): {max(worst):.2f} m")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--tune", default="default:0", help="tuning cities, style:seed,...")
    ap.add_argument(
        "--heldout", default="downtown:11,suburb:12,mixed:13", help="held-out cities, style:seed,..."
    )
    ap.add_argument("--cache", type=Path, default=Path("bench_cities/tiles"), help="synthetic tiles (reused)")
    ap.add_argument("--out", type=Path, default=Path("bench_cities/runs"), help="runs and results.jsonl")
    ap.add_argument("--tag", default="", help="name of this configuration (run folder suffix)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    tag = args.tag or (
        args.preset + ("_" + "_".join(a.lstrip("-").replace(".", "-") for a in extra) if extra else "")
    )
    rows = []
    for group, spec in (("tune", args.tune), ("held-out", args.heldout)):
        for style, seed in parse_cities(spec):
            tile = city_tile(args.cache, style, seed)
            run = args.out / tag / f"{style}_{seed}"
            r = run_city(tile, run, args.preset, args.threads, extra)
            rows.append((f"{style}:{seed}", group, r))
            rec = {
                "tag": tag,
                "city": f"{style}:{seed}",
                "set": group,
                "preset": args.preset,
                "overrides": extra,
            }
            rec.update({k: r.get(k) for k, _, _ in COLUMNS})
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "results.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(
                f"[bench] {tag} {style}:{seed}: " + json.dumps({k: rec[k] for k, _, _ in COLUMNS}), flush=True
            )
    print(f"\n### {tag}\n")
    print(table(rows))


if __name__ == "__main__":
    main()

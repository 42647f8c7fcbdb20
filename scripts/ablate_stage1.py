"""Stage 1 ablations on a tile: appearance, opacity regularisation and pseudo depth on/off.

Runs the chosen preset once per variant (sequentially) and prints one JSON line per run plus a
Markdown table (held-out satellite PSNR, DSM MAE, Gaussian count, wall time).

    python scripts/ablate_stage1.py --data outputs/demo/tile --out outputs/ablate --preset demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

VARIANTS = {
    "full": lambda c: c,
    "no-appearance": lambda c: dataclasses.replace(
        c, appearance=dataclasses.replace(c.appearance, enabled=False)
    ),
    "no-opacity-reg": lambda c: dataclasses.replace(c, lambda_opacity=0.0),
    "no-pseudo-depth": lambda c: dataclasses.replace(c, pseudo=dataclasses.replace(c.pseudo, enabled=False)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="tile folder")
    ap.add_argument("--out", type=Path, required=True, help="parent folder of the runs")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    from skyfall.presets import get_preset
    from skyfall.train.stage1 import train_stage1

    rows = []
    for name in args.variants:
        cfg = VARIANTS[name](get_preset(args.preset))
        if args.steps is not None:
            cfg = dataclasses.replace(cfg, steps=args.steps)
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        s = train_stage1(cfg, args.data, out, progress=False)["stage1"]
        nan = float("nan")
        row = {
            "variant": name,
            "psnr_test": s.get("psnr_test", nan),
            "psnr_test_novel_embedding": s.get("psnr_test_novel_embedding", nan),
            "dsm_mae_m": s.get("dsm_mae_m", nan),
            "dsm_completeness": s.get("dsm_completeness", nan),
            "dsm_mae_expected_depth_m": s.get("dsm_mae_expected_depth_m", nan),
            "num_gaussians": s["num_gaussians"],
            "wall_s": s["wall_s"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)

    print(
        "\n| variant | held-out PSNR, fitted / mean embedding (dB) | DSM MAE, median / expected depth (m) "
        "| DSM completeness | Gaussians | wall (s) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['psnr_test']:.2f} / {r['psnr_test_novel_embedding']:.2f} "
            f"| {r['dsm_mae_m']:.2f} / {r['dsm_mae_expected_depth_m']:.2f} | {r['dsm_completeness']:.3f} "
            f"| {r['num_gaussians']:,} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()

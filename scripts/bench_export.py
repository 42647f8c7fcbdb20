"""Benchmark: bake + rotate + write 1M Gaussians (SH degree 1) in every export format.

    OMP_NUM_THREADS=1 python scripts/bench_export.py [--n 1000000] [--degree 1] [--out /tmp/bench_export]

Prints one line per stage/format: seconds, size, bytes per splat.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--degree", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_export"))
    a = ap.parse_args()
    from skyfall.export import FORMATS, bake, sanitize, to_up_axis, write_splats

    torch.manual_seed(0)
    n, k = a.n, (a.degree + 1) ** 2
    params = {
        "means": torch.randn(n, 3) * 100,
        "quats": torch.randn(n, 4),
        "scales": torch.log(torch.rand(n, 3) * 0.5 + 0.01),
        "opacities": torch.randn(n) * 2,
        "sh0": torch.randn(n, 1, 3) * 0.5,
        "shN": torch.randn(n, k - 1, 3) * 0.1,
    }
    params["opacities"][0] = math.nan  # the exporter must drop exactly this one
    filt = torch.rand(n) * 0.1
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splats, dropped = sanitize(bake(params, filt))
    t1 = time.perf_counter()
    splats = to_up_axis(splats, "y")
    t2 = time.perf_counter()
    print(
        f"N={n} sh_degree={a.degree}: bake+sanitize {t1 - t0:.2f} s ({dropped} dropped), up-axis {t2 - t1:.2f} s"
    )
    for fmt, ext in FORMATS.items():
        if fmt == "raw-ply":
            continue
        t = time.perf_counter()
        path = write_splats(a.out / f"bench{ext}", splats, fmt)
        dt = time.perf_counter() - t
        size = path.stat().st_size
        print(f"  {fmt:15s} {dt:6.2f} s  {size / 1e6:8.1f} MB  {size / len(splats):6.1f} B/splat")


if __name__ == "__main__":
    main()

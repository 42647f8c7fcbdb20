"""Torch CPU threads: one thread vs all cores, on an idle machine and under load.

Runs a tiny Stage 1 (the ``tiny`` preset on the tiny synthetic tile) through the CLI with
``--threads 1`` and ``--threads <cores>`` and with the default choice, first as the machine is, then
with ``--spinners`` busy processes (pure-Python loops) competing for the cores, and prints one JSON
line per run (wall seconds, threads, load average at the start) plus a Markdown table.

    python scripts/bench_threads.py --steps 60 --spinners 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _spin() -> None:
    while True:
        pass


def _run(tile: Path, out: Path, steps: int, threads: int | None) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "skyfall", "train", "stage1", "--data", str(tile), "--out", str(out)]
    cmd += ["--preset", "tiny", "--no-export", "--stage1.steps", str(steps)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    return wall, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="Stage 1 steps per run")
    ap.add_argument(
        "--spinners", type=int, default=None, help="busy processes for the loaded case (default: cores + 1)"
    )
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    spinners = args.spinners if args.spinners is not None else cores + 1

    from skyfall.synth import write_synthetic_tile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tile = write_synthetic_tile(Path(tmp) / "tile", preset="tiny", seed=0)
        for loaded in (False, True):
            procs = [mp.Process(target=_spin, daemon=True) for _ in range(spinners if loaded else 0)]
            for p in procs:
                p.start()
            if loaded:
                time.sleep(5)  # let the load average see the spinners
            try:
                for threads in (1, cores, None):
                    load = os.getloadavg()[0]
                    wall, first = _run(tile, Path(tmp) / f"run_{loaded}_{threads}", args.steps, threads)
                    row = {
                        "machine": f"busy ({spinners} spinners)" if loaded else "as is",
                        "threads": threads if threads is not None else "default",
                        "load_at_start": round(load, 2),
                        "wall_s": round(wall, 2),
                        "choice": first.removeprefix("[skyfall] "),
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                for p in procs:
                    p.terminate()
    print(f"\n| machine | --threads | load at start | tiny Stage 1 ({args.steps} steps) wall |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['machine']} | {r['threads']} | {r['load_at_start']} | {r['wall_s']} s |")


if __name__ == "__main__":
    main()

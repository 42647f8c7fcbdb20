"""Stage 1 step time and host synchronisations per step, by kind of step.

    OMP_NUM_THREADS=1 python scripts/bench_step.py --preset tiny
    OMP_NUM_THREADS=1 python scripts/bench_step.py --preset demo --tile TILE --start 200 --steps 100
    python scripts/bench_step.py --preset paper-jax --tile TILE --start 1000 --steps 300 --depth random-large  # GPU

Trains ``--start`` steps through ``Trainer.train`` (warm-up, not measured), runs the next
``--count-steps`` under `skyfall.train.syncs.SyncCounter` (a CPU stands in for a GPU there; the mode
slows every torch call, so that window is not timed), then times ``--steps`` more through the same
loop (logging included, no checkpoints, no evaluation). Without ``--tile`` a synthetic tile is
written to a temporary folder (``tiny`` for the tiny preset, else ``default``, about a minute).

Output: total ms/step over the timed window (with a final device synchronisation), the median and
minimum ms of its plain steps (host time on a GPU, where the host runs ahead; the minimum is the
least disturbed by other load on the machine), the syncs per step for each kind of step: plain, log,
pseudo (pseudo-camera depth), strategy (densification, pruning, opacity reset or 3D-filter refresh),
and with ``--profile N`` torch.profiler's top ops over N more steps. On CUDA also the
synchronisations ``torch.cuda.set_sync_debug_mode`` reports per step, which include the
host-to-device copies the CPU stand-in cannot see.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_kind(trainer, phase, it: int) -> str:  # noqa: ANN001
    """'plain', or the '+'-joined reasons a step does more: log, pseudo, strategy."""
    kinds = []
    if it % trainer.cfg.log_every == 0 or it == phase.end:
        kinds.append("log")
    if phase.pseudo is not None and phase.pseudo.pose(it) is not None:
        kinds.append("pseudo")
    plain = getattr(phase.strategy, "plain", None)
    if plain is not None and not plain(it):
        kinds.append("strategy")
    return "+".join(kinds) or "plain"


def run_window(trainer, phase, end: int, on_step=None) -> None:  # noqa: ANN001
    """Train to global step ``end`` through the loop; ``on_step(it)`` before each step."""
    from skyfall.train.loop import Trainer

    phase.end = end
    if on_step is not None:
        original = Trainer.train_step

        def wrapped(self, it, ph):  # noqa: ANN001, ANN202
            on_step(it)
            return original(self, it, ph)

        trainer.train_step = wrapped.__get__(trainer)
    try:
        trainer.train(phase, first=0, desc="bench", checkpoint_every=10**9, save_at_end=False)
    finally:
        trainer.__dict__.pop("train_step", None)


def _random_depth(device: str):  # noqa: ANN202
    """Depth Anything V2 Large with random weights (scripts/bench_flowedit.py's), float32 on ``device``."""
    import importlib.util

    import torch

    from skyfall.devices import resolve_device
    from skyfall.priors.depth_backends import DepthAnythingDepth

    spec = importlib.util.spec_from_file_location(
        "bench_flowedit", Path(__file__).with_name("bench_flowedit.py")
    )
    bf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bf)  # type: ignore[union-attr]
    dev = resolve_device(device)
    with torch.device(dev):  # the default init of 335 M parameters takes seconds on a CPU
        net, _ = bf.build_depth_net(bf.build_parser().parse_args(["--random-weights"]))
    return DepthAnythingDepth.from_module(net, device=str(dev))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tile", type=Path, help="tile folder (default: a synthetic one in a temp folder)")
    ap.add_argument("--start", type=int, default=None, help="warm-up steps (default: 10 tiny, 210 else)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps")
    ap.add_argument("--count-steps", type=int, default=30, help="steps run under the sync counter")
    ap.add_argument("--device", default=None, help="override the preset's device")
    ap.add_argument("--profile", type=int, default=0, help="profile this many more steps (torch.profiler)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument(
        "--depth",
        choices=("preset", "random-large", "ground-truth"),
        default="preset",
        help="pseudo-depth prior: the preset's estimator (weights from the local cache), Depth Anything V2 "
        "Large with random weights (the paper's cost without a download; scripts/bench_flowedit.py's "
        "network), or the synthetic tile's exact depth",
    )
    args = ap.parse_args(argv)

    import dataclasses

    import torch

    from skyfall.config import load_config
    from skyfall.train.loop import Trainer
    from skyfall.train.stage1 import stage1_phase
    from skyfall.train.syncs import SyncCounter

    cfg = load_config(args.preset).stage1
    start = args.start if args.start is not None else (10 if args.preset == "tiny" else 210)
    total = start + args.steps + args.count_steps + args.profile + 20  # + the CUDA sync-debug window
    cfg = dataclasses.replace(cfg, steps=max(cfg.steps, total))
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if args.depth == "ground-truth":
        cfg = dataclasses.replace(cfg, pseudo=dataclasses.replace(cfg.pseudo, estimator="ground-truth"))
    estimator = _random_depth(cfg.device) if args.depth == "random-large" else None
    with tempfile.TemporaryDirectory() as tmp:
        tile = args.tile
        if tile is None:
            from skyfall.synth import write_synthetic_tile

            tile = write_synthetic_tile(
                Path(tmp) / "tile", preset="tiny" if args.preset == "tiny" else "default", seed=0
            )
        trainer = Trainer(cfg, tile, Path(tmp) / "run", depth_estimator=estimator, progress=False)
        trainer.run_dir.create()
        trainer.init_from_points()
        phase = stage1_phase(trainer)
        dev = trainer.device
        run_window(trainer, phase, start)
        _sync(dev)

        # ---- counted window
        counter = SyncCounter(stand_in=dev.type != "cuda")

        def label(it: int) -> None:
            counter.label = it

        with counter:
            run_window(trainer, phase, start + args.count_steps, on_step=label)
        per_kind: dict[str, list[int]] = {}
        counts = counter.by_label()
        for it in range(start + 1, start + args.count_steps + 1):
            per_kind.setdefault(step_kind(trainer, phase, it), []).append(counts.get(it, 0))

        # ---- timed window
        stamps: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        run_window(
            trainer,
            phase,
            start + args.count_steps + args.steps,
            on_step=lambda it: stamps.append((it, time.perf_counter())),
        )
        _sync(dev)
        wall = time.perf_counter() - t0
        ends = [t for _, t in stamps[1:]] + [t0 + wall]
        plain_ms = [
            1e3 * (e - s)
            for (it, s), e in zip(stamps, ends, strict=True)
            if step_kind(trainer, phase, it) == "plain"
        ]

        table = None
        if args.profile:
            table = _profile(trainer, phase, start + args.count_steps + args.steps, args.profile)
        cuda_syncs = None
        if dev.type == "cuda":
            cuda_syncs = _cuda_sync_counts(
                trainer, phase, start + args.count_steps + args.steps + args.profile
            )

    res = {
        "preset": args.preset,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "counted": [start + 1, start + args.count_steps],
        "timed": [start + args.count_steps + 1, start + args.count_steps + args.steps],
        "gaussians": trainer.model.num_gaussians,
        "ms_per_step": round(1e3 * wall / args.steps, 2),
        "plain_ms_median": round(statistics.median(plain_ms), 2) if plain_ms else None,
        "plain_ms_min": round(min(plain_ms), 2) if plain_ms else None,
        "plain_steps_timed": len(plain_ms),
        "syncs_per_step": {
            k: {"steps": len(v), "mean": round(sum(v) / len(v), 2), "max": max(v)}
            for k, v in sorted(per_kind.items())
        },
        "cuda_sync_debug_per_step": cuda_syncs,
    }
    print(f"{args.preset} on {dev} ({res['threads']} thread(s)), {res['gaussians']} Gaussians, steps "
          f"{res['timed'][0]}..{res['timed'][1]}: {res['ms_per_step']} ms/step; plain steps median "
          f"{res['plain_ms_median']} ms, min {res['plain_ms_min']} ms ({len(plain_ms)} steps)")  # fmt: skip
    for k, v in res["syncs_per_step"].items():
        print(f"  syncs/step {k:<22} mean {v['mean']:6.2f}  max {v['max']:3d}  ({v['steps']} steps)")
    if cuda_syncs is not None:
        print(f"  CUDA sync-debug synchronisations per step: {cuda_syncs}")
    plain = [e for e in counter.events if step_kind(trainer, phase, e.label) == "plain"]
    if plain:
        print("  syncs of plain steps:")
        print("\n".join("    " + ln for ln in _lines(plain)))
    if table is not None:
        print(table)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


def _lines(events) -> list[str]:  # noqa: ANN001
    from collections import Counter

    c = Counter((e.kind, e.op, e.where) for e in events)
    return [f"{n:4d}  {k:<21} {op:<12} {w}" for (k, op, w), n in c.most_common()]


def _profile(trainer, phase, first: int, n: int) -> str:  # noqa: ANN001
    """torch.profiler's top 10 ops by self time (CUDA time on a GPU, else CPU) over ``n`` steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run_window(trainer, phase, first + n)
        _sync(trainer.device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    head = f"torch.profiler, steps {first + 1}..{first + n}, top 10 by {key}:"
    return head + "\n" + prof.key_averages().table(sort_by=key, row_limit=10)


def _cuda_sync_counts(trainer, phase, first: int, n: int = 20) -> dict[str, float]:  # noqa: ANN001
    """Mean number of synchronising CUDA calls (``torch.cuda.set_sync_debug_mode``) per step, by kind,
    over ``n`` steps after global step ``first``."""
    import torch

    marks: list[tuple[int, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_window(trainer, phase, first + n, on_step=lambda it: marks.append((it, len(caught))))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        total = len(caught)
    per_kind: dict[str, list[int]] = {}
    for (it, c0), c1 in zip(marks, [c for _, c in marks[1:]] + [total], strict=True):
        n_sync = sum(1 for w in caught[c0:c1] if "synchroniz" in str(w.message))
        per_kind.setdefault(step_kind(trainer, phase, it), []).append(n_sync)
    return {k: round(sum(v) / len(v), 2) for k, v in sorted(per_kind.items())}


if __name__ == "__main__":
    main()

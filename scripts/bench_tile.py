"""Measure every component of a paper-configuration tile and project the wall time and peak memory of a
JAX-configuration tile (Stage 1 30k steps + five IDU episodes of 108 refinements and 10k steps).

    # GPU, full size (at most --budget-s seconds, 300 by default; random full-size weights, no download):
    python scripts/bench_tile.py --json bench_tile.json
    python scripts/bench_tile.py --tile .gpu/tile --refiner-modes gpu,fp8,cpu-offload --budget-s 420
    # CPU (automatic there): --reduced shrinks everything, < 60 s on 2 cores; the JSON says reduced: true
    OMP_NUM_THREADS=1 python scripts/bench_tile.py --reduced

Phases, each in its own subprocess with its own deadline (a phase that fails or runs out of time is
reported with its error; the others still run), inside a total budget of --budget-s:

  stage1       Stage 1 it/s at the paper-jax preset on the synthetic default tile (512^2 views, pseudo
               views 1024^2 every 10 steps with a random-weight Depth Anything V2 Large as the depth
               prior), timed over steps 1001.. (pseudo depth, densification and SH degree 1 all active)
               at the tile's initial Gaussian count; then again at --final-gaussians (the reference's
               Stage 1 ends at 1.65M) from step 21001 on (densification and pseudo depth over).
  stage1_2048  the same early window on the default tile's views upsampled x4 (bicubic) to 2048^2,
               intrinsics x4: the per-pixel cost (the city is not re-rendered at 2048 px).
  stage2       Stage 2 training it/s: the real episode phase (75 % refined 1024^2 orbit views, 25 %
               satellite views, pseudo depth, densification) on 108 orbit views of the middle jax_v1
               episode, at --stage2-gaussians (the reference's Stage 2 runs from 1.65M to 2.1M).
  refiner      FlowEdit FLUX.1-dev s/image per memory mode (scripts/bench_flowedit.py's random
               full-size weights, T 28, n_max 10 = the slowest draw of U{4..10}, 1024^2).
  depth        Depth Anything V2 Large s/image at 1024^2 (bench_flowedit's depth part).

Each window runs warm-up steps first (10; reduced 2), then times steps for up to 12 s (400 steps).
Peak memory per phase: torch.cuda.max_memory_allocated (and _reserved) on CUDA, the phase process's
peak RSS on CPU. stdout: a table, then the JSON document as the last line (also --json FILE).

Projection (`project`), per refiner mode, with the reference's JAX numbers (JAX_TILE):
  time = 30000 * t1 + 5 * (108 * s_refine + 10000 / stage2 it/s), t1 = mean of the Stage 1 step
         times at the initial and the final count;
  peak = max over the phases (refiner and trainer never resident together), and with the refiner
         kept loaded through the episodes (CUDA: its resident memory + the Stage 2 peak, or its peak
         + the trainer's resident memory).

On a GPU machine gsplat's CUDA code is compiled (first import) in the background while the refiner
and depth phases run, and the synthetic tile is written meanwhile (--serial, and always on a CPU:
one thing at a time). Set MAX_JOBS / TORCH_CUDA_ARCH_LIST for that build as usual. Needs diffusers
(refiner), transformers (depth), gsplat (else the torch rasteriser, far too slow for full size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T_START = time.monotonic()  # the budget counts from here: the parent's own imports are part of it

HERE = Path(__file__).resolve().parent

# The JAX configuration of the reference (docs: reference-pipeline.md). Stage 1: 30 000 iterations
# (§2.5 "Iterations and optimiser"); Stage 2: the jax_v1 curriculum's 5 episodes (§3.1), each
# refining 9 targets x 6 azimuths x 2 samples = 108 renders (§3.2 item 2; 540 per tile, §3.4) and
# training 10 000 iterations (§3.3). The paper-jax preset holds the same values (tests check it).
# No depth prediction per refined image: lambda_depth is 0 in every reference config (§3.3 Losses),
# so skyfall predicts none (Stage2Config.lambda_depth); pseudo depth is inside the training steps.
JAX_TILE = {"stage1_steps": 30_000, "episodes": 5, "refinements_per_episode": 108, "episode_steps": 10_000}
# The reference's own figures for one JAX tile on one RTX A6000 48 GB (anchors.md, "Runtime, memory,
# scale": JAX_214 Stage 1 1 h 35 + Stage 2 5 h 10 = 6 h 45; peak 42-43 GB (authors) to 46 GB (paper);
# Gaussian count 1.65M -> 2.1M through Stage 2).
REFERENCE = {"gpu": "RTX A6000 48 GB", "stage1_s": 95 * 60, "stage2_s": 310 * 60, "total_s": 405 * 60,
             "peak_gb": [42, 46], "source": "shared/docs/anchors.md, Runtime, memory, scale"}  # fmt: skip
STAGE1_FINAL_GAUSSIANS = 1_650_000
STAGE2_GAUSSIANS = 1_875_000  # the middle of 1.65M -> 2.1M: step time is ~linear in the count

# Per-phase time caps (s) and the least a phase needs to be worth starting; the phase deadlines are
# these, shortened so that the phases still to come keep their minimum inside --budget-s.
CAPS = {
    False: {"prep": 170, "gsplat": 240, "refiner:gpu": 70, "refiner:fp8": 90, "refiner:cpu-offload": 180,
            "depth": 40, "stage1": 80, "stage1_2048": 50, "stage2": 80},
    True: {"prep": 30, "gsplat": 30, "refiner:gpu": 20, "refiner:fp8": 20, "refiner:cpu-offload": 20,
           "depth": 15, "stage1": 25, "stage1_2048": 20, "stage2": 25},
}  # fmt: skip
MIN_S = {False: 15.0, True: 4.0}
# Timed windows (seconds of measurement, at most this many steps) per mode; warm-up steps before each.
WINDOWS = {
    False: {"warmup": 10, "steps": 400, "measure_s": 12.0, "stage2_measure_s": 15.0},
    True: {"warmup": 2, "steps": 12, "measure_s": 1.5, "stage2_measure_s": 1.5},
}


# ---------------------------------------------------------------------------------------------- workers
# Each worker runs in its own process (fresh CUDA context, its own peak memory, killable at its deadline)
# and prints one JSON line.


def _bench_flowedit():  # noqa: ANN202 - the scripts/ module, imported by path (scripts is no package)
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_flowedit", HERE / "bench_flowedit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _peak(device: Any) -> dict[str, float]:
    import torch

    if device.type == "cuda":
        return {
            "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
        }
    return {"peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _depth_estimator(spec: dict, device: Any):  # noqa: ANN202
    """The pseudo-depth prior of the training phases: bench_flowedit's random-weight Depth Anything V2
    Large (MoGe v1's backbone size) or its tiny stand-in, in the config's dtype, as a real run holds it."""
    import torch

    from skyfall.priors.depth_backends import DepthAnythingDepth

    bf = _bench_flowedit()
    bf_args = bf.build_parser().parse_args(spec["bf_args"])
    try:
        # built on the device: the default init of 335M parameters takes seconds on a CPU
        with torch.device(device):
            net, label = bf.build_depth_net(bf_args)
    except Exception:  # noqa: BLE001 - a module that refuses the device context is built on the CPU
        net, label = bf.build_depth_net(bf_args)
    return DepthAnythingDepth.from_module(net, device=str(device), dtype=spec["depth_dtype"]), label


def _stage1_config(spec: dict):  # noqa: ANN202
    import dataclasses

    from skyfall.config.presets import load_config

    cfg = load_config("paper-jax")
    c1, c2 = cfg.stage1, cfg.stage2
    c1 = dataclasses.replace(c1, device=spec["device"])
    if spec["reduced"]:
        # views of tens of pixels: pseudo and orbit views at the tile's size, everything else as paper-jax
        c1 = dataclasses.replace(c1, pseudo=dataclasses.replace(c1.pseudo, size=spec["view_px"]))
        c2 = dataclasses.replace(c2, render_size=spec["view_px"], pseudo_size=spec["view_px"])
    return c1, c2


@contextlib.contextmanager
def _stop_at(deadline: float):  # noqa: ANN202
    """Raise TimeoutError in this process shortly before the parent would kill it, so that what was
    measured so far is still reported."""

    def handler(signum: int, frame: Any) -> None:
        raise TimeoutError("phase deadline reached")

    left = deadline - time.time()
    if left <= 0:
        raise TimeoutError("phase deadline reached before it started")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _time_steps(trainer: Any, phase: Any, first: int, spec: dict, measure_s: float) -> dict:
    """``warmup`` steps after global step ``first``, then steps timed until ``steps`` or ``measure_s``
    (or the phase deadline) is reached; a plain train_step reads nothing from the device, so the
    window ends with a device synchronisation."""
    device = trainer.device
    it = first
    for _ in range(spec["warmup"]):
        it += 1
        trainer.train_step(it, phase)
    _sync(device)
    n0 = trainer.model.num_gaussians
    stop = min(
        time.perf_counter() + measure_s, time.perf_counter() + spec["deadline"] - time.time() - spec["margin"]
    )
    t0 = time.perf_counter()
    n = 0
    while n < spec["steps"] and (n == 0 or time.perf_counter() < stop):
        it += 1
        trainer.train_step(it, phase)
        n += 1
    _sync(device)
    dt = time.perf_counter() - t0
    return {
        "its": round(n / dt, 3),
        "steps": n,
        "seconds": round(dt, 3),
        "window": [first + spec["warmup"] + 1, it],
        "gaussians_start": n0,
        "gaussians_end": trainer.model.num_gaussians,
    }


def grow_model(trainer: Any, target: int, seed: int = 0) -> None:
    """Replace the trainer's model by ``target`` Gaussians made from its own, to time steps at a late
    stage's count without training there: each Gaussian is repeated k = ceil(target / n) times, the
    copies scattered over its extent (N(0, scale) per axis) and shrunk to keep its volume (scale / k^1/3,
    as repeated splits would), then a fresh optimizer and the 3D filter."""
    import torch

    from skyfall.gaussians.model import GaussianModel

    old, cfg = trainer.model, trainer.cfg
    n = old.num_gaussians
    if target <= n:
        return
    k = math.ceil(target / n)
    with torch.no_grad():
        idx = torch.arange(target, device=old.device) % n
        new = {name: p.detach()[idx].clone() for name, p in old.params.items()}
        g = torch.Generator(device=old.device).manual_seed(seed)
        noise = torch.randn(new["means"].shape, generator=g, device=old.device)
        new["means"] += noise * new["scales"].exp()
        new["scales"] -= math.log(k) / 3
    degree = old.active_sh_degree
    trainer.model = None
    del old
    trainer.model = GaussianModel(
        new,
        cfg.optim,
        scene_extent=cfg.scene_extent,
        app_features_lr=cfg.appearance.gaussian_lr,
        sh_degree_interval=cfg.sh_increase_every,
        device=trainer.device,
    )
    trainer.model.active_sh_degree = degree
    del new
    trainer.recompute_filter()


def _reset_peak(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def worker_stage1(spec: dict) -> dict:
    """Stage 1 steps at paper-jax settings (one window early, one late at the final count)."""
    import torch

    from skyfall.render import resolve_backend
    from skyfall.train.loop import Trainer
    from skyfall.train.stage1 import stage1_phase

    device = torch.device(spec["device"])
    c1, _ = _stage1_config(spec)
    est, label = _depth_estimator(spec, device)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(c1, spec["tile"], out, depth_estimator=est, progress=False)
        trainer.init_from_points()
        res: dict[str, Any] = {
            "view_px": trainer.cameras.width,
            "train_views": len(trainer.tile.train),
            "pseudo_px": c1.pseudo.size,
            "depth_prior": label,
            "render_backend": resolve_backend("auto", device),
        }
        phase = stage1_phase(trainer)
        trainer.strategy_state = phase.strategy.initialize_state()
        # Early Stage 1: the pseudo-depth window (every 10 steps), densification (every 100) and SH
        # degree 1 start after step 1000 in the reference schedule.
        early = _time_steps(trainer, phase, c1.pseudo.start, spec, spec["measure_s"])
        res.update(early)
        res.update(_peak(device))
        final = spec.get("final_gaussians", 0)
        if final:
            try:
                _reset_peak(device)
                grow_model(trainer, final)
                trainer.strategy_state = phase.strategy.initialize_state()
                # Late Stage 1 (after densify.until): no densification, no pseudo depth, the 3D filter
                # recomputed every 100 steps, at the count the reference ends with.
                late = _time_steps(trainer, phase, c1.densify.until, spec, spec["measure_s"])
                res["final"] = {**late, **_peak(device)}
            except Exception as e:  # noqa: BLE001 - the early window is still a result
                res["final"] = {"error": f"{type(e).__name__}: {e}"}
    for key in ("peak_mem_mb", "peak_reserved_mb"):
        if key in res and isinstance(res.get("final"), dict) and key in res["final"]:
            res[key] = max(res[key], res["final"][key])
    return res


def worker_stage2(spec: dict) -> dict:
    """Stage 2 training steps: the episode phase of skyfall.train.stage2 on refined orbit views."""
    import gc

    import torch

    from skyfall.render import resolve_backend
    from skyfall.train.loop import Trainer
    from skyfall.train.stage2 import IterativeDatasetUpdate, episodes_from_config, idu_cameras, resolve_scale

    device = torch.device(spec["device"])
    c1, c2 = _stage1_config(spec)
    est, label = _depth_estimator(spec, device)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(c1, spec["tile"], out, depth_estimator=est, progress=False)
        trainer.init_from_points()
        grow_model(trainer, spec["stage2_gaussians"])
        # The real episode phase and view sampler (IterativeDatasetUpdate.phase / sample_view) without
        # a Stage 1 run folder: only the attributes those two methods read are set.
        idu = IterativeDatasetUpdate.__new__(IterativeDatasetUpdate)
        idu.trainer, idu.cfg, idu.cfg2 = trainer, c1, c2
        idu.scale = resolve_scale(c2, trainer.tile.points)
        episodes = episodes_from_config(c2, idu.scale)
        ep = episodes[len(episodes) // 2]
        cams, view_index = idu_cameras(ep, c2, idu.scale)
        # Stand-ins for the refined images: the renders themselves (a training step's cost does not
        # depend on the pixels), one tensor per sample as Stage 2 holds them.
        scene = trainer.scene
        emb = scene.novel_embedding(c1.appearance.test_embedding)
        renders: dict[int, Any] = {}
        with torch.no_grad():
            for i, v in enumerate(view_index):
                if v not in renders:
                    out_v = scene.render(cams[i], emb, absgrad=False)
                    renders[v] = out_v.colors[0].clamp(0, 1).permute(2, 0, 1).contiguous()
                    del out_v
        idu.idu_cams = cams
        idu.idu_images = [renders[v].clone() for v in view_index]
        idu.idu_depths = []
        del renders
        idu.first_step = c1.steps
        idu.idu_stack = []
        phase = idu.phase(ep)
        # As IterativeDatasetUpdate._run at an episode's start
        trainer.filter_cameras = [trainer.cameras, cams]
        trainer.model.restart_position_lr(idu.first_step, c2.episode_steps)
        trainer.recompute_filter()
        trainer.strategy_state = phase.strategy.initialize_state()
        res: dict[str, Any] = {
            "view_px": c2.render_size,
            "refined_views": len(cams),
            "episode": ep.name,
            "idu_ratio": c2.idu_ratio,
            "pseudo_px": c2.pseudo_size or c1.pseudo.size,
            "depth_prior": label,
            "render_backend": resolve_backend("auto", device),
        }
        res.update(_time_steps(trainer, phase, idu.first_step, spec, spec["stage2_measure_s"]))
        res.update(_peak(device))
        gc.collect()
        # What stays allocated between steps (model, optimizer, satellite and refined images, depth
        # model): shares the GPU with the refiner when the refiner is kept loaded.
        if device.type == "cuda":
            res["resident_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
    return res


def worker_refiner(spec: dict) -> dict:
    """One memory mode of bench_flowedit (random full-size FLUX.1-dev weights, or --tiny)."""
    import torch
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    bf = _bench_flowedit()
    args = bf.build_parser().parse_args(spec["bf_args"])
    row = bf.bench_flowedit(args, spec["mode"], torch.device(spec["device"]))
    if row.get("seconds") is None:
        return {"status": "skipped", "error": row.get("skipped", "no timing"), **row}
    return row


def worker_depth(spec: dict) -> dict:
    """bench_flowedit's depth part: Depth Anything V2 Large (random weights) or the tiny stand-in."""
    import torch

    bf = _bench_flowedit()
    args = bf.build_parser().parse_args(spec["bf_args"])
    rows = bf.bench_depth(args, torch.device(spec["device"]))
    row = dict(rows[0])
    notes = [r["skipped"] for r in rows[1:] if r.get("skipped")]
    if notes:
        row["note"] = "; ".join(notes)
    return row


def upsample_tile(src: Path, dst: Path, factor: int) -> Path:
    """``src`` with every view upsampled ``factor`` x (bicubic; masks nearest), intrinsics scaled to
    match (`Cameras.scaled`) and the same points: the same city seen at ``factor`` x the pixels."""
    import numpy as np
    from PIL import Image

    from skyfall.data.tile import load_tile, transforms_document

    tile = load_tile(src)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(exist_ok=True)
    for split, name in ((tile.train, "train"), (tile.test, "test")):
        if len(split) == 0:
            continue
        cams = split.cameras.scaled(factor)
        for i, stem in enumerate(split.names):
            img = Image.fromarray(split.images[i].numpy())
            img = img.resize((cams.width, cams.height), Image.BICUBIC)
            img.save(dst / "images" / f"{stem}.png", compress_level=1)
            mask = split.masks[i].numpy().astype(np.uint8)
            np.save(dst / "masks" / f"{stem}.npy", mask.repeat(factor, 0).repeat(factor, 1))
        (dst / f"transforms_{name}.json").write_text(json.dumps(transforms_document(cams, split.names)))
    shutil.copy(src / "points3D.txt", dst / "points3D.txt")
    return dst


def worker_prep(spec: dict) -> dict:
    """The tiles: the synthetic default (tiny when reduced) unless --tile, and its x4 variant."""
    res: dict[str, Any] = {}
    tile = Path(spec["tile"]) if spec.get("tile") else None
    work = Path(spec["work"])
    if tile is None:
        from skyfall.synth import write_synthetic_tile

        t0 = time.perf_counter()
        tile = write_synthetic_tile(work / "tile", preset=spec["synth_preset"], seed=0, overwrite=True)
        res["synth_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    x4 = work / "tile_x4"
    if x4.exists():
        shutil.rmtree(x4)
    upsample_tile(tile, x4, 4)
    res.update(tile=str(tile), tile_x4=str(x4), upsample_s=round(time.perf_counter() - t0, 2))
    return res


WORKERS = {
    "stage1": worker_stage1,
    "stage2": worker_stage2,
    "refiner": worker_refiner,
    "depth": worker_depth,
    "prep": worker_prep,
}


def run_worker(name: str, spec: dict) -> None:
    """Entry point of a phase process: one JSON line on stdout, whatever happens."""
    t0 = time.perf_counter()
    try:
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        with _stop_at(spec["deadline"] - spec["margin"] / 2):
            res = WORKERS[name](spec)
        res.setdefault("status", "ok")
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which carries on
        tb = traceback.format_exc(limit=-3)
        res = {"status": "timeout" if isinstance(e, TimeoutError) else "error",
               "error": f"{type(e).__name__}: {e}", "traceback": tb[-1500:]}  # fmt: skip
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------- parent


class Budget:
    def __init__(self, total: float, reduced: bool):
        self.t0 = T_START
        self.total = total
        self.reduced = reduced

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()

    def timeout(self, key: str, still_to_come: int) -> float:
        """The deadline of phase ``key``: its cap, less what the phases after it need at least."""
        reserve = still_to_come * MIN_S[self.reduced] + 2.0
        return min(CAPS[self.reduced][key], self.left() - reserve)


def _log(msg: str) -> None:
    print(f"[bench_tile] {msg}", file=sys.stderr, flush=True)


def _spawn(name: str, spec: dict, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", json.dumps(spec)]
    err = open(log, "w")  # noqa: SIM115 - closed with the process in _collect
    # own session: on timeout the whole process group (the phase and anything it started) is killed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    proc._bench_log = (err, log)  # type: ignore[attr-defined]
    return proc


def _collect(proc: subprocess.Popen, timeout: float) -> dict:
    err, log = proc._bench_log  # type: ignore[attr-defined]
    try:
        out, _ = proc.communicate(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        res = {"status": "timeout", "error": f"killed at its deadline ({timeout:.0f} s)"}
    else:
        lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
        if lines:
            res = json.loads(lines[-1])
        else:
            res = {"status": "error", "error": f"exit code {proc.returncode}, no result"}
    err.close()
    if res.get("status") != "ok":
        tail = log.read_text(errors="replace")[-1200:] if log.exists() else ""
        if tail.strip() and "traceback" not in res:
            res["stderr_tail"] = tail
    return res


def _run(name: str, spec: dict, timeout: float, work: Path, key: str) -> dict:
    if timeout < MIN_S[spec["reduced"]]:
        return {"status": "skipped", "error": f"budget exhausted ({timeout:.0f} s left for it)"}
    _log(f"{key}: up to {timeout:.0f} s")
    spec = {**spec, "deadline": time.time() + timeout, "margin": min(5.0, 0.15 * timeout)}
    return _collect(_spawn(name, spec, work / f"{key.replace(':', '_')}.log"), timeout + 2)


def _bf_args(reduced: bool, warmup: int = 1) -> list[str]:
    if reduced:
        return ["--random-weights", "--tiny", "--size", "64", "--warmup", str(warmup)]
    return ["--random-weights", "--size", "1024", "--warmup", str(warmup), "--n-max", "10", "--n-min", "4",
            "--seq-len", "512", "--dtype", "bfloat16"]  # fmt: skip


def measure(args: argparse.Namespace) -> dict:
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    reduced = bool(args.reduced or device == "cpu")
    budget = Budget(args.budget_s, reduced)
    w = WINDOWS[reduced]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_tile_"))
    work.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.refiner_modes.split(",") if m.strip()]
    doc: dict[str, Any] = {
        "bench": "scripts/bench_tile.py",
        "reduced": reduced,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads(),
        "budget_s": args.budget_s,
        "work": str(work),
        "phases": {},
    }
    if reduced:
        doc["note"] = (
            "reduced: tiny tile, few steps, tiny FLUX/depth stand-ins; timings measure the code path, "
            "not a GPU tile"
        )
    base = {"device": device, "reduced": reduced, "threads": args.threads}
    # Background work that the GPU-only phases do not need: gsplat's first-import CUDA build and the tiles.
    import importlib.util

    background: dict[str, tuple[subprocess.Popen, float]] = {}
    prep_spec = {
        **base,
        "tile": str(Path(args.tile).resolve()) if args.tile else None,
        "work": str(work),
        "synth_preset": "tiny" if reduced else "default",
    }
    prep_timeout = budget.timeout("prep", 0)
    prep_spec.update(deadline=time.time() + prep_timeout, margin=2.0)
    background["prep"] = (_spawn("prep", prep_spec, work / "prep.log"), time.monotonic() + prep_timeout)
    if device.startswith("cuda") and importlib.util.find_spec("gsplat") is not None:
        cmd = [
            sys.executable,
            "-c",
            "from gsplat.cuda._backend import _C; print('gsplat built', _C is not None)",
        ]
        log = open(work / "gsplat_build.log", "w")  # noqa: SIM115
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        p._bench_log = (log, work / "gsplat_build.log")  # type: ignore[attr-defined]
        background["gsplat"] = (p, time.monotonic() + CAPS[reduced]["gsplat"])
    if device.startswith("cuda"):
        doc["gsplat"] = "installed" if "gsplat" in background else "absent: the torch rasteriser on CUDA"
    else:
        doc["gsplat"] = "not used on cpu"

    def wait_background(key: str) -> dict | None:
        if key not in background:
            return None
        proc, until = background.pop(key)
        t0 = time.monotonic()
        if key == "prep":
            res = _collect(proc, min(until - time.monotonic(), budget.left() - 3 * MIN_S[reduced]))
        else:
            try:
                proc.wait(timeout=max(0.1, min(until - time.monotonic(), budget.left() - 3 * MIN_S[reduced])))
                res = {"status": "ok" if proc.returncode == 0 else "error", "exit_code": proc.returncode}
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                res = {"status": "timeout"}
            proc._bench_log[0].close()  # type: ignore[attr-defined]
        res["waited_s"] = round(time.monotonic() - t0, 2)
        return res

    # On a CPU the phases would share the cores with the background work: one thing at a time there.
    if args.serial or not device.startswith("cuda"):
        doc["prep"] = wait_background("prep")
        doc["gsplat_build"] = wait_background("gsplat")

    # GPU-only phases first: they overlap the background work.
    todo = len(modes) + 1 + 3
    refiner: dict[str, Any] = {}
    for mode in modes:
        todo -= 1
        spec = {**base, "mode": mode, "bf_args": _bf_args(reduced)}
        refiner[mode] = _run(
            "refiner", spec, budget.timeout(f"refiner:{mode}", todo), work, f"refiner:{mode}"
        )
    doc["phases"]["refiner"] = refiner
    todo -= 1
    spec = {**base, "bf_args": _bf_args(reduced)}
    doc["phases"]["depth"] = _run("depth", spec, budget.timeout("depth", todo), work, "depth")

    if "prep" not in doc:
        doc["prep"] = wait_background("prep")
        doc["gsplat_build"] = wait_background("gsplat")
    prep = doc["prep"] or {}
    stage_base = {
        **base,
        "bf_args": _bf_args(reduced),
        "depth_dtype": "float32",  # DepthModelConfig's default: what a paper-jax run holds
        "warmup": w["warmup"],
        "steps": w["steps"],
        "measure_s": w["measure_s"],
        "stage2_measure_s": w["stage2_measure_s"],
    }
    no_tile = {"status": "error", "error": f"no tile: {prep.get('error', prep.get('status'))}"}
    tile, tile_x4 = prep.get("tile"), prep.get("tile_x4")
    for key, tile_dir, extra in (
        ("stage1", tile, {"final_gaussians": args.final_gaussians}),
        ("stage1_2048", tile_x4, {"final_gaussians": 0}),
        ("stage2", tile, {"stage2_gaussians": args.stage2_gaussians}),
    ):
        todo -= 1
        if not tile_dir:
            doc["phases"][key] = dict(no_tile)
            continue
        spec = {**stage_base, "tile": tile_dir, "view_px": 64, **extra}  # view_px: reduced sizes only
        worker = "stage2" if key == "stage2" else "stage1"
        doc["phases"][key] = _run(worker, spec, budget.timeout(key, todo), work, key)
    if doc["phases"]["stage1_2048"].get("status") == "ok":
        doc["phases"]["stage1_2048"]["variant"] = (
            "the default tile's views upsampled x4 (bicubic), intrinsics x4"
        )
    doc["projection"] = project(doc["phases"])
    doc["reference"] = REFERENCE
    doc["wall_s"] = round(budget.elapsed(), 1)
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return doc


# ---------------------------------------------------------------------------------------------- projection


def _ok(row: Any) -> bool:
    return isinstance(row, dict) and row.get("status") == "ok"


def stage1_step_s(s1: dict) -> float | None:
    """Mean Stage 1 step time: the mean of the early (initial count) and late (final count) step times
    when both were measured (the count grows between them), else the early one's."""
    if not _ok(s1):
        return None
    times = [1.0 / s1["its"]]
    fin = s1.get("final")
    if isinstance(fin, dict) and fin.get("its"):
        times.append(1.0 / fin["its"])
    return sum(times) / len(times)


def project(phases: dict, tile: dict = JAX_TILE) -> dict:
    """Wall time and peak memory of a JAX-configuration tile from the measured phases.

    time(mode) = stage1_steps * t1 + episodes * (refinements * s_refine(mode) + episode_steps / its2)
    where t1 = `stage1_step_s`. Peak memory (MB):
      sequential(mode) = max(stage1, stage2, refiner(mode), depth peaks): refiner and trainer never
        resident together (the low-memory bound);
      kept_loaded(mode) = max(stage1 peak, refiner(mode) peak + stage2 resident, refiner(mode) resident
        + stage2 peak): the refiner stays loaded through the episodes, as skyfall's Stage 2 keeps it
        (CUDA only: needs the resident figures).
    """
    s1, s2, dep = phases.get("stage1"), phases.get("stage2"), phases.get("depth")
    t1 = stage1_step_s(s1)
    res: dict[str, Any] = {
        "config": dict(tile),
        "formula": "stage1_steps * t1 + episodes * (refinements_per_episode * s_refine + episode_steps / stage2_its); "
        "t1 = mean(1/stage1.its, 1/stage1.final.its)",
        "stage1_step_s": t1,
        "stage1_s": None if t1 is None else tile["stage1_steps"] * t1,
        "stage2_its": s2["its"] if _ok(s2) else None,
        "modes": {},
        "mode": None,
        "stage2_s": None,
        "total_s": None,
    }
    train_ep = tile["episode_steps"] / s2["its"] if _ok(s2) else None
    for mode, row in (phases.get("refiner") or {}).items():
        if not _ok(row):
            continue
        refine_ep = tile["refinements_per_episode"] * row["seconds"]
        stage2_s = None if train_ep is None else tile["episodes"] * (refine_ep + train_ep)
        total = None if stage2_s is None or res["stage1_s"] is None else res["stage1_s"] + stage2_s
        peaks = [p["peak_mem_mb"] for p in (s1, s2, row, dep) if _ok(p) and p.get("peak_mem_mb") is not None]
        kept = None
        if _ok(s1) and _ok(s2) and row.get("resident_mb") is not None and s2.get("resident_mb") is not None:
            kept = max(
                s1["peak_mem_mb"],
                row["peak_mem_mb"] + s2["resident_mb"],
                row["resident_mb"] + s2["peak_mem_mb"],
            )
        res["modes"][mode] = {
            "s_refine": row["seconds"],
            "refine_per_episode_s": refine_ep,
            "train_per_episode_s": train_ep,
            "stage2_s": stage2_s,
            "total_s": total,
            "peak_sequential_mb": max(peaks) if peaks else None,
            "peak_kept_loaded_mb": kept,
        }
    ok_modes = [m for m in ("gpu", "fp8", "cpu-offload") if m in res["modes"]] + [
        m for m in res["modes"] if m not in ("gpu", "fp8", "cpu-offload")
    ]
    res["mode"] = ok_modes[0] if ok_modes else None
    if res["mode"]:
        res.update({k: res["modes"][res["mode"]][k] for k in ("stage2_s", "total_s")})
    return res


# ---------------------------------------------------------------------------------------------- output


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.3g} s"


def _fmt_mb(mb: float | None) -> str:
    return "-" if mb is None else (f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB")


def table(doc: dict) -> str:
    ph = doc["phases"]
    kind = "allocated" if doc["device"].startswith("cuda") else "peak RSS"
    lines = [
        f"skyfall bench_tile: {doc['device_name']} ({doc['device']}), torch {doc['torch']}, gsplat {doc['gsplat']}, "
        f"reduced={doc['reduced']}, {doc['wall_s']} s of {doc['budget_s']} s",
        "",
        f"| phase | measured | Gaussians | views | peak mem ({kind}) | wall |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, r: dict, cells: Any) -> None:
        """One table row; ``cells(r)`` -> (measured, Gaussians, views) for a phase that ran."""
        if _ok(r):
            what, gauss, views = cells(r)
        else:
            what, gauss, views = f"{r.get('status', 'error').upper()}: {r.get('error', '')}"[:120], "", ""
        lines.append(
            f"| {name} | {what} | {gauss} | {views} | {_fmt_mb(r.get('peak_mem_mb'))} | {_fmt_s(r.get('wall_s'))} |"
        )

    def steps_cells(r: dict) -> tuple[str, str, str]:
        return (
            f"{r['its']:.2f} it/s (steps {r['window'][0]}-{r['window'][1]})",
            f"{r['gaussians_start']:,} -> {r['gaussians_end']:,}",
            f"{r['view_px']}^2, pseudo {r['pseudo_px']}^2",
        )

    for key in ("stage1", "stage1_2048", "stage2"):
        r = ph.get(key, {})
        row(key, r, steps_cells)
        fin = r.get("final") if _ok(r) else None
        if isinstance(fin, dict):
            if "error" in fin:
                lines.append(f"| {key}, final count | ERROR: {fin['error'][:100]} | | | | |")
            else:
                what, gauss, _ = steps_cells({**r, **fin})
                lines.append(
                    f"| {key}, final count | {what} | {gauss} | | {_fmt_mb(fin.get('peak_mem_mb'))} | |"
                )
    for mode, r in ph.get("refiner", {}).items():
        row(f"refiner {mode}", r, lambda r: (
            f"{r['seconds']:.3f} s/image ({r.get('dtype', '')}, {r.get('transformer_calls', '?')} transformer calls)",
            "", f"{r['size']}^2"))  # fmt: skip
    row(
        "depth",
        ph.get("depth", {}),
        lambda r: (f"{r['seconds']:.4f} s/image ({r['what']})", "", f"{r['size']}^2"),
    )
    p = doc["projection"]
    c = p["config"]
    lines += [
        "",
        f"Projected JAX-configuration tile ({c['stage1_steps']:,} Stage 1 steps + {c['episodes']} episodes x "
        f"({c['refinements_per_episode']} refinements + {c['episode_steps']:,} steps)):",
        "",
        "| refiner mode | Stage 1 | refine / episode | train / episode | Stage 2 | total "
        "| peak, never resident together | peak, refiner kept loaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in p["modes"].items():
        lines.append(
            f"| {mode} | {_fmt_s(p['stage1_s'])} | {_fmt_s(m['refine_per_episode_s'])} | "
            f"{_fmt_s(m['train_per_episode_s'])} | {_fmt_s(m['stage2_s'])} | {_fmt_s(m['total_s'])} | "
            f"{_fmt_mb(m['peak_sequential_mb'])} | {_fmt_mb(m['peak_kept_loaded_mb'])} |"
        )
    if not p["modes"]:
        lines.append("| (no refiner mode measured) | " + _fmt_s(p["stage1_s"]) + " | | | | | | |")
    ref = doc["reference"]
    lines.append(
        f"| reference ({ref['gpu']}) | {_fmt_s(ref['stage1_s'])} | | | {_fmt_s(ref['stage2_s'])} | "
        f"{_fmt_s(ref['total_s'])} | {ref['peak_gb'][0]}-{ref['peak_gb'][1]} GB | |"
    )
    if doc["reduced"]:
        lines += ["", "REDUCED run (CPU stand-ins): these numbers are not a GPU tile's."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=300.0, help="total wall-time budget (s)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    ap.add_argument("--reduced", action="store_true", help="tiny stand-ins everywhere (automatic on CPU)")
    ap.add_argument("--tile", default=None, help="reuse this tile instead of synthesizing the default one")
    ap.add_argument("--refiner-modes", default="gpu,fp8",
                    help="bench_flowedit memory modes: gpu, fp8, cpu-offload (slow to build: 12B params on the CPU)")  # fmt: skip
    ap.add_argument("--final-gaussians", type=int, default=None,
                    help=f"Gaussian count of the late Stage 1 window (default {STAGE1_FINAL_GAUSSIANS:,}; "
                    "reduced 2,000; 0 = skip)")  # fmt: skip
    ap.add_argument("--stage2-gaussians", type=int, default=None,
                    help=f"Gaussian count of the Stage 2 window (default {STAGE2_GAUSSIANS:,}; reduced 2,000)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in the phases")
    ap.add_argument("--serial", action="store_true", help="no background work during the GPU phases")
    ap.add_argument("--work", default=None, help="work folder (kept); default a temporary one")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder (logs, tiles)")
    ap.add_argument("--json", default=None, help="also write the JSON document here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker, json.loads(args.spec))
        return
    reduced_default = args.reduced or args.device == "cpu"
    if not reduced_default and args.device == "auto":
        import torch

        reduced_default = not torch.cuda.is_available()
    if args.final_gaussians is None:
        # reduced: a few times the tiny tile's initial count exercises the same code
        args.final_gaussians = 2_000 if reduced_default else STAGE1_FINAL_GAUSSIANS
    if args.stage2_gaussians is None:
        args.stage2_gaussians = 2_000 if reduced_default else STAGE2_GAUSSIANS
    doc = measure(args)
    text = json.dumps(doc)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc), flush=True)
    print(text, flush=True)


if __name__ == "__main__":
    main()

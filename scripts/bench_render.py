"""Benchmark ``skyfall.render.render``: forward/backward medians and peak memory per backend.

Scene: N random Gaussians filling the frustum of
one camera at the origin, z in [2, 6], world scales log-uniform in [0.01, 0.1], random rotations,
opacities uniform in [0.05, 0.95], fx = fy = W, **SH degree 1** colours (K = 4), antialiased with
eps2d 0.1, RGB+D outputs; loss = L1(colours, random target) + 0.01 * mean depth.

Prints one JSON line per (backend, case) with backend, device, threads, n, width, height,
forward_s, backward_s (medians over --reps after one warm-up), peak_mem_mb (CPU: process peak RSS
increase over the pre-run baseline, VmHWM reset per case where the kernel allows it; GPU:
torch.cuda.max_memory_allocated), plus the per-rep times, visible count and load average.

Usage: OMP_NUM_THREADS=1 python scripts/bench_render.py --threads 1 --reps 5 --cases 10k@256 50k@512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _parse_case(text: str) -> tuple[int, int]:
    n, size = text.lower().split("@")
    n_val = int(float(n[:-1]) * 1000) if n.endswith("k") else int(n)
    return n_val, int(size)


def bench(backend: str, device: str, n: int, size: int, reps: int) -> dict:
    import torch

    from skyfall.render import render

    W = H = size
    g = torch.Generator().manual_seed(0)
    z = 2 + 4 * torch.rand(n, generator=g)
    xy = (torch.rand(n, 2, generator=g) - 0.5) * z[:, None] * torch.tensor([1.0, H / W])
    means = torch.cat([xy, z[:, None]], 1)
    quats = torch.randn(n, 4, generator=g)
    scales = math.log(0.01) + (math.log(0.1) - math.log(0.01)) * torch.rand(n, 3, generator=g)
    opac = torch.logit(0.05 + 0.9 * torch.rand(n, generator=g))
    sh = 0.3 * torch.randn(n, 4, 3, generator=g)
    K = torch.tensor([[W * 1.0, 0, W / 2], [0, W * 1.0, H / 2], [0, 0, 1]], dtype=torch.float64)[None]
    vm = torch.eye(4, dtype=torch.float64)[None]
    target = torch.rand(1, H, W, 3, generator=g)
    params = [p.to(device).requires_grad_(True) for p in (means, quats, scales, opac, sh)]
    vm, K, target = vm.to(device), K.to(device), target.to(device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fw, bw = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        hwm_reset = _reset_hwm()
        base = _rss_kib("VmRSS") if hwm_reset else _rss_kib("VmHWM")
    n_vis = 0
    for rep in range(reps + 1):  # rep 0 = warm-up
        for p in params:
            p.grad = None
        sync()
        t0 = time.perf_counter()
        out = render(*params, vm, K, W, H, sh_degree=1, backend=backend)
        loss = (out.colors - target).abs().mean() + 0.01 * out.depths.mean()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        if rep > 0:
            fw.append(t1 - t0)
            bw.append(t2 - t1)
        n_vis = int(out.visible.sum())
        del out, loss
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (_rss_kib("VmHWM") - base) / 1024
    return {
        "backend": backend,
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "n": n,
        "width": W,
        "height": H,
        "forward_s": round(statistics.median(fw), 4),
        "backward_s": round(statistics.median(bw), 4),
        "forward_all_s": [round(x, 4) for x in fw],
        "backward_all_s": [round(x, 4) for x in bw],
        "peak_mem_mb": round(peak_mb, 1),
        "visible": n_vis,
        "sh_degree": 1,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (also set OMP_NUM_THREADS)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=["10k@256", "50k@512"], help="N@size, e.g. 10k@256")
    ap.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    args = ap.parse_args()

    import torch

    from skyfall.render import gsplat_available

    torch.set_num_threads(args.threads)
    backends = args.backends
    if backends is None:
        backends = ["torch"]
        if torch.cuda.is_available() and gsplat_available():
            backends.append("gsplat")
    for case in args.cases:
        n, size = _parse_case(case)
        for backend in backends:
            device = "cuda" if backend == "gsplat" else "cpu"
            print(json.dumps(bench(backend, device, n, size, args.reps)), flush=True)


if __name__ == "__main__":
    main()

"""Choosing the torch device and the number of CPU threads."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from skyfall.errors import ConfigError


def resolve_device(device: str | None, option: str = "device") -> torch.device:
    """A usable torch device: None or 'auto' = CUDA when available, else CPU.

    A device that is not auto, cpu, cuda or cuda:N, or an explicit CUDA request without a GPU, is a
    ConfigError naming ``option`` (rather than a crash at the first tensor).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option} must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} {device}: no CUDA GPU is available (torch.cuda.is_available() is False)")
    return dev


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads torch uses, and why."""

    threads: int
    cores: int
    busy: float
    """Cores busy with other work when the choice was made (NaN when not measured)."""
    reason: str

    def describe(self) -> str:
        busy = "" if math.isnan(self.busy) else f", {self.busy:.1f} busy"
        return (
            f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} for torch ({self.reason}; "
            f"{self.cores} cores{busy}; --threads N to choose)"
        )


def busy_cores(sample_s: float = 0.25) -> float:
    """Cores in use by all processes right now: CPU time not idle over ``sample_s`` (Linux
    /proc/stat), else the 1-minute load average (which lags minutes behind a change)."""

    def snapshot() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = snapshot()
    if first is not None:
        time.sleep(sample_s)
        second = snapshot()
        if second is not None and second[0] > first[0]:
            total, idle = second[0] - first[0], second[1] - first[1]
            return _cores() * (1.0 - idle / total)
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count for this process: ``requested``, else OMP_NUM_THREADS, else the idle cores.

    OpenMP threads spin while they wait for each other, so on a machine whose cores are busy every
    extra thread makes a torch step slower, not faster: one thread is many times faster than two on
    a loaded 2-core machine. The default is therefore the number of cores that other processes
    leave idle right now (``busy_cores``), at least one.
    """
    cores = _cores()
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads must be >= 1, got {requested}")
        return ThreadChoice(requested, cores, float("nan"), "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return ThreadChoice(max(1, int(env)), cores, float("nan"), "OMP_NUM_THREADS")
        except ValueError:
            raise ConfigError(f"OMP_NUM_THREADS must be an integer, got {env!r}") from None
    busy = busy_cores()
    idle = max(1, min(cores, math.floor(cores - busy + 0.5)))
    return ThreadChoice(idle, cores, busy, "the cores other processes leave idle")


def apply_threads(choice: ThreadChoice) -> None:
    """Set torch's intra-op thread count."""
    torch.set_num_threads(choice.threads)

"""Choosing the torch device and the number of CPU threads."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from skyfall.errors import ConfigError


def resolve_device(device: str | None) -> torch.device:
    """A usable torch device: None or 'auto' = CUDA when available, else CPU.

    An explicit CUDA request without a GPU is a ConfigError (rather than a crash at the first tensor).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but no CUDA GPU is available (torch.cuda.is_available() is False)"
        )
    return dev


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads torch uses, and why."""

    threads: int
    cores: int
    load: float
    reason: str

    def describe(self) -> str:
        return (
            f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} for torch ({self.reason}; "
            f"{self.cores} cores, load {self.load:.1f}; --threads N to choose)"
        )


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count for this process: ``requested``, else OMP_NUM_THREADS, else the idle cores.

    OpenMP threads spin while they wait for each other, so on a machine whose cores are busy
    (load average at or above the core count) every extra thread makes a torch step slower, not
    faster: one thread is many times faster than two on a loaded 2-core machine. The default is
    therefore the number of cores that the 1-minute load average leaves idle, at least one.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads must be >= 1, got {requested}")
        return ThreadChoice(requested, cores, load, "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return ThreadChoice(max(1, int(env)), cores, load, "OMP_NUM_THREADS")
        except ValueError:
            raise ConfigError(f"OMP_NUM_THREADS must be an integer, got {env!r}") from None
    idle = max(1, min(cores, math.floor(cores - load + 0.5)))
    return ThreadChoice(idle, cores, load, "cores left idle by the load average")


def apply_threads(choice: ThreadChoice) -> None:
    """Set torch's intra-op thread count."""
    torch.set_num_threads(choice.threads)

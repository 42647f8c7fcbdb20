"""Counting the host reads that would stall a GPU, on any device (tests and ``scripts/bench_step.py``).

CUDA runs asynchronously: the host queues kernels and moves on, so a training step costs what its
kernels cost only while the host never waits for the device. Every read of a device value on the
host (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``, ``.cpu()``) waits for everything queued
before it, and so do the operations whose output size depends on the data (``nonzero``, boolean-mask
indexing, ``unique``, ...): the host needs the size to allocate. One such wait per step is enough to
leave the GPU idle between steps.

`SyncCounter` is a ``TorchFunctionMode`` that records those calls. On a CUDA device it counts only
what touches CUDA tensors. On a CPU, where nothing is asynchronous, it stands in for a GPU run:
every tensor counts as a device tensor, except

* reads inside `host_reads` blocks: values that live on the host in every run (draws of the CPU
  generator);
* paths known to be host-side or CPU-only (`STAND_IN_EXEMPT`): optimizers' step counters and the
  torch rasteriser, which stands in for gsplat on CPUs.

What the CPU stand-in cannot see: copies of host tensors to the device (``x.to(device)`` is a no-op on
a CPU), which synchronise too; on a GPU they are counted (and ``torch.cuda.set_sync_debug_mode``
sees everything).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_SCALAR_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "__format__",
                 "is_nonzero", "equal", "allclose", "__contains__"}  # fmt: skip
_HOST_COPIES = {"tolist", "numpy", "cpu", "__array__"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
_FROM_PYTHON = {"tensor", "as_tensor", "new_tensor"}

STAND_IN_EXEMPT: tuple[tuple[str, str], ...] = (
    ("torch/optim/", "optimizer step counters are host tensors (non-capturable optimizers)"),
    ("skyfall/render/composite.py", "the torch rasteriser (CPU stand-in for gsplat)"),
    ("skyfall/render/torch_backend.py", "the torch rasteriser (CPU stand-in for gsplat)"),
)
"""(path fragment, why) of code whose reads are not device synchronisations in a GPU run.

gsplat itself synchronises once per forward (it sizes its tile-intersection buffer on the host).
"""

_HERE = str(Path(__file__).resolve())
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_host_depth = 0


@contextlib.contextmanager
def host_reads() -> Iterator[None]:
    """Mark reads of tensors that live on the host in every run (not counted by `SyncCounter`)."""
    global _host_depth
    _host_depth += 1
    try:
        yield
    finally:
        _host_depth -= 1


@dataclass(frozen=True)
class SyncEvent:
    """One call that would synchronise: its kind, the torch function and where it was called from."""

    kind: str
    """'scalar read', 'host copy', 'data-dependent shape', 'boolean mask', 'transfer' or 'from python'."""
    op: str
    where: str
    """file:line (function) of the innermost caller outside torch."""
    label: object = None
    """`SyncCounter.label` when it happened (e.g. the training step)."""


def _is_bool_index(idx: object) -> bool:
    if isinstance(idx, Tensor):
        return idx.dtype in (torch.bool, torch.uint8)
    if isinstance(idx, (tuple, list)):
        return any(_is_bool_index(i) for i in idx)
    return False


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a ``Tensor.to`` call names, if any."""
    for a in (*args[1:], kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, (str, torch.device)):
            try:
                return torch.device(a)
            except (RuntimeError, TypeError):
                continue  # a dtype spelled as a string is not a device
        if isinstance(a, Tensor):
            return a.device
    return None


class SyncCounter(TorchFunctionMode):
    """Record the torch calls that would make the host wait for the device.

    Args:
        stand_in: count every tensor as a device tensor (a CPU run standing in for a GPU run);
            None: when CUDA is not available.
        exempt: (path fragment, why) pairs; a call with a frame in such a file is not counted (it is
            tallied in ``exempted``). Defaults to `STAND_IN_EXEMPT`.

    Attributes:
        events: the counted `SyncEvent`s, in order.
        exempted: how many calls each exemption reason absorbed.
        label: attached to each event (set it to the current step).
    """

    def __init__(
        self, *, stand_in: bool | None = None, exempt: tuple[tuple[str, str], ...] = STAND_IN_EXEMPT
    ):
        super().__init__()
        self.stand_in = (not torch.cuda.is_available()) if stand_in is None else stand_in
        self.exempt = exempt
        self.events: list[SyncEvent] = []
        self.exempted: Counter[str] = Counter()
        self.label: object = None

    # ------------------------------------------------------------------ queries

    def count(self, label: object = ...) -> int:
        """Counted events (with ``label`` only, when given)."""
        return sum(1 for e in self.events if label is ... or e.label == label)

    def by_label(self) -> Counter:
        return Counter(e.label for e in self.events)

    def summary(self, label: object = ...) -> str:
        """One line per distinct (kind, op, where), most frequent first."""
        c = Counter((e.kind, e.op, e.where) for e in self.events if label is ... or e.label == label)
        return "\n".join(f"{n:5d}  {k:<21} {op:<14} {w}" for (k, op, w), n in c.most_common())

    # ------------------------------------------------------------------ the mode

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if _host_depth == 0:
            kind = self._classify(getattr(func, "__name__", ""), args, kwargs)
            if kind is not None:
                self._record(kind, getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def _on_device(self, t: Tensor) -> bool:
        return self.stand_in or t.device.type != "cpu"

    def _classify(self, name: str, args: tuple, kwargs: dict) -> str | None:
        tensors = _tensors(args, kwargs)
        if name in _SCALAR_READS:
            return "scalar read" if any(self._on_device(t) for t in tensors) else None
        if name in _HOST_COPIES:
            return "host copy" if tensors and self._on_device(tensors[0]) else None
        if name in _DATA_DEPENDENT:
            return "data-dependent shape" if any(self._on_device(t) for t in tensors) else None
        if name == "where" and len(args) + len(kwargs) == 1:
            return "data-dependent shape" if self._on_device(tensors[0]) else None
        if name == "repeat_interleave" and "output_size" not in kwargs:
            reps = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
            if isinstance(reps, Tensor) and self._on_device(reps):
                return "data-dependent shape"
            return None
        if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices")
            return "boolean mask" if _is_bool_index(idx) and self._on_device(args[0]) else None
        if name in ("to", "copy_") and tensors:
            src = tensors[1] if name == "copy_" and len(tensors) > 1 else tensors[0]
            dst = tensors[0].device if name == "copy_" else _target_device(args, kwargs)
            if dst is None:
                return None
            if dst != src.device and "cuda" in (dst.type, src.device.type):
                return "transfer"
            # a CPU run standing in for a GPU: an explicit copy to "cpu" is a copy to the host
            spelled = args[1] if len(args) > 1 else kwargs.get("device")
            if self.stand_in and name == "to" and spelled == "cpu":
                return "host copy"
            return None
        if name in _FROM_PYTHON:
            data = args[1] if name == "new_tensor" else (args[0] if args else kwargs.get("data"))
            if isinstance(data, Tensor):
                return None
            if name == "new_tensor":
                return "from python" if self._on_device(args[0]) else None
            dev = kwargs.get("device")
            if dev is not None and (torch.device(dev).type != "cpu" or self.stand_in):
                return "from python"
        return None

    def _record(self, kind: str, op: str) -> None:
        where = None
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if path != _HERE:
                for fragment, why in self.exempt:
                    if fragment in path.replace("\\", "/"):
                        self.exempted[why] += 1
                        return
                if where is None and not path.startswith(_TORCH_DIR):
                    where = f"{_short(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        self.events.append(SyncEvent(kind, op, where or "?", self.label))


def _short(path: str) -> str:
    p = path.replace("\\", "/")
    for root in ("/skyfall/", "/tests/", "/scripts/"):
        i = p.rfind(root)
        if i >= 0:
            return p[i + 1 :]
    return p

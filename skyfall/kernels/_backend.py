"""Lazy loader of the ``skyfall`` CUDA extension: prebuilt -> JIT build -> None (torch fallback).

Nothing is imported or compiled at import time. The first call on a CUDA machine tries, in order:

1. ``import skyfall._cuda`` (an ahead-of-time build, see ``cuda_ext/README.md``);
2. ``torch.utils.cpp_extension.load(name="skyfall_cuda", ...)`` on ``cuda_ext/csrc`` (a JIT build,
   cached by torch under ``TORCH_EXTENSIONS_DIR``). ``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST`` are
   read by torch itself, so we pass no arch flags.

The outcome, success or failure, is cached for the process; a failure warns once with the reason.

Environment variable ``SKYFALL_KERNELS``: ``auto`` (default), ``torch`` (never load, always use the
torch reference) or ``cuda`` (a missing extension is an error, so GPU CI cannot silently fall back).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

ENV_VAR = "SKYFALL_KERNELS"
KernelsMode = Literal["auto", "torch", "cuda"]
_SOURCES = ("ext.cpp", "ssim.cu")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _LoadResult:
    module: ModuleType | None
    source: Literal["prebuilt", "jit"] | None
    error: str | None


def kernels_mode() -> KernelsMode:
    """The ``SKYFALL_KERNELS`` setting, validated (read on every call so tests can change it)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "torch", "cuda"):
        raise ValueError(f"{ENV_VAR} must be one of auto, torch, cuda; got {mode!r}")
    return mode  # type: ignore[return-value]


def _source_paths() -> list[str]:
    from skyfall.cuda_ext import CSRC

    return [str(CSRC / name) for name in _SOURCES]


@functools.cache
def _load() -> _LoadResult:
    """Try the prebuilt module, then a JIT build; cached, so a failed build is attempted only once."""
    import torch

    # Checking for a GPU first avoids a doomed (and slow) JIT build on CPU-only torch.
    if not torch.cuda.is_available():
        return _LoadResult(None, None, "torch.cuda.is_available() is False")
    try:
        from skyfall import _cuda  # type: ignore[attr-defined]

        return _LoadResult(_cuda, "prebuilt", None)
    except ImportError as prebuilt_err:
        prebuilt_reason = str(prebuilt_err)
    try:
        from torch.utils.cpp_extension import load

        _log.warning("Building the skyfall CUDA extension (first use only; cached by torch afterwards)...")
        module = load(
            name="skyfall_cuda",
            sources=_source_paths(),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math"],
            verbose=bool(os.environ.get("SKYFALL_KERNELS_VERBOSE")),
        )
        return _LoadResult(module, "jit", None)
    except Exception as err:  # noqa: BLE001 - any build failure means "use the torch fallback"
        reason = f"{type(err).__name__}: {err}".strip()
        warnings.warn(
            "skyfall CUDA extension unavailable, using the (slower) torch reference kernels. "
            f"Prebuilt import failed ({prebuilt_reason}); JIT build failed ({reason}). "
            "Run `skyfall doctor` for details.",
            RuntimeWarning,
            stacklevel=3,
        )
        return _LoadResult(None, None, reason)


def get_extension() -> ModuleType | None:
    """The loaded extension module, or None when the torch fallback must be used.

    Raises:
        RuntimeError: ``SKYFALL_KERNELS=cuda`` and the extension could not be loaded.
    """
    mode = kernels_mode()
    if mode == "torch":
        return None
    result = _load()
    if result.module is None and mode == "cuda":
        raise RuntimeError(
            f"{ENV_VAR}=cuda but the skyfall CUDA extension is unavailable: {result.error}. "
            "Run `skyfall doctor` for details."
        )
    return result.module


def extension_status(load: bool = False) -> dict[str, Any]:
    """A report for ``skyfall doctor``.

    Args:
        load: attempt the load/build now (otherwise only report what has happened so far).

    Returns:
        ``{"mode", "cuda_available", "attempted", "loaded", "source", "error", "sources"}`` where
        ``source`` is ``"prebuilt"``, ``"jit"`` or None.
    """
    import torch

    mode = kernels_mode()
    attempted = _load.cache_info().currsize > 0
    if load and mode != "torch" and not attempted:
        _load()
        attempted = True
    result = _load() if attempted else None
    return {
        "mode": mode,
        "cuda_available": torch.cuda.is_available(),
        "attempted": attempted,
        "loaded": result is not None and result.module is not None,
        "source": result.source if result is not None else None,
        "error": result.error if result is not None else None,
        "sources": _source_paths(),
    }

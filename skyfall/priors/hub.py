"""Locating model weights (Hub id or local folder) and turning "not found" into one actionable error.

Models load the way users load them: ``from_pretrained(<hub id or local dir>, local_files_only=...,
cache_dir=...)``. When that fails because the weights are absent or gated, the libraries raise long
``OSError`` chains; :func:`load_weights` replaces them with one :class:`WeightsNotFoundError` that
names the model id, where it looked and how to fix it (the CLI prints it as one line, exit code 2).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from skyfall.errors import MissingDependencyError

T = TypeVar("T")


class WeightsNotFoundError(MissingDependencyError):
    """Model weights are neither in the given local folder nor in the Hugging Face cache (or are gated)."""


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache folder in use (``cache_dir`` or HF_HUB_CACHE / HF_HOME/hub)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    # constants are read at import time; re-read the variables so a changed environment is honoured
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def looks_like_path(model: str) -> bool:
    """True for strings meant as local paths (absolute, ./, ~, or existing), not Hub ids ``owner/name``."""
    return (
        Path(model).expanduser().exists()
        or model.startswith((".", "/", "~"))
        or "\\" in model
        or model.count("/") > 1
    )


def _is_gated(err: BaseException) -> bool:
    from huggingface_hub.errors import GatedRepoError

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, GatedRepoError) or "gated" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def weights_error(
    model: str,
    what: str,
    *,
    local_files_only: bool,
    cache_dir: str | Path | None,
    cause: BaseException | None,
) -> WeightsNotFoundError:
    """Build the one-line error for missing/gated weights of ``model`` (a Hub id or a local path)."""
    if looks_like_path(model):
        path = Path(model).expanduser()
        where = f"local folder {path} ({'exists' if path.exists() else 'does not exist'})"
        fix = f"point to a folder holding a complete copy of {what} (as written by save_pretrained / `hf download`)"
    else:
        where = f"Hugging Face cache {hub_cache_dir(cache_dir)}" + (
            " (local_files_only: the Hub was not contacted)" if local_files_only else " and the Hub"
        )
        gated = cause is not None and _is_gated(cause)
        fix = (
            f"{'the repo is gated: ' if gated else ''}accept its licence at https://huggingface.co/{model}, "
            f"run `hf auth login`, then `hf download {model}`; or pass a local copy's folder instead of the id"
        )
    detail = f" [{type(cause).__name__}: {str(cause).splitlines()[0][:160]}]" if cause is not None else ""
    return WeightsNotFoundError(f"{what} weights {model!r} not found in {where}. Fix: {fix}.{detail}")


def load_weights(
    loader: Callable[[], T], model: str, what: str, *, local_files_only: bool, cache_dir: str | Path | None
) -> T:
    """Run ``loader()`` (a ``from_pretrained`` call); missing or gated weights -> :class:`WeightsNotFoundError`.

    Only "not found"-type failures are translated (``OSError`` and the huggingface_hub HTTP/entry
    errors, which include gated repos); other exceptions keep their tracebacks.
    """
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return loader()
    except (OSError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError) as e:
        if isinstance(e, WeightsNotFoundError):
            raise
        raise weights_error(
            model, what, local_files_only=local_files_only, cache_dir=cache_dir, cause=e
        ) from e


def resolve_file(
    model: str,
    filename: str,
    what: str,
    *,
    local_files_only: bool,
    cache_dir: str | Path | None,
    revision: str | None = None,
) -> Path:
    """A single weights file: ``model`` may be the file itself, a folder holding ``filename``, or a Hub id."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise weights_error(
            model, what, local_files_only=local_files_only, cache_dir=cache_dir,
            cause=FileNotFoundError(f"{path / filename} is missing"),
        )  # fmt: skip
    if looks_like_path(model):
        raise weights_error(model, what, local_files_only=local_files_only, cache_dir=cache_dir, cause=None)
    from huggingface_hub import hf_hub_download

    return Path(
        load_weights(
            lambda: hf_hub_download(
                model, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
            ),
            model,
            what,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
        )  # fmt: skip
    )


def cached_repos(cache_dir: str | Path | None = None) -> dict[str, dict]:
    """Model repos in the local Hugging Face cache: ``{repo_id: {"size_bytes", "files", "path"}}``.

    ``files`` is the union of the file paths over the cached revisions (e.g. "transformer/config.json").
    An absent cache folder gives an empty dict.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hub_cache_dir(cache_dir))
    except CacheNotFound:
        return {}
    out = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        files: set[str] = set()
        for rev in repo.revisions:
            for f in rev.files:
                files.add(str(f.file_path.relative_to(rev.snapshot_path)))
        out[repo.repo_id] = {"size_bytes": repo.size_on_disk, "files": files, "path": repo.repo_path}
    return out


def transformers_dtype_kwargs(dtype: object) -> dict:
    """``{"dtype": dtype}`` for transformers >= 4.56 (which deprecates ``torch_dtype``), else ``torch_dtype``."""
    from importlib.metadata import version

    from packaging.version import Version

    return {"dtype": dtype} if Version(version("transformers")) >= Version("4.56") else {"torch_dtype": dtype}

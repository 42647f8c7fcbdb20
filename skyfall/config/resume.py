"""What a resumed run may change: the comparison of a command line with the run's config.yml.

A resumed run continues one model: the tile, the model's shape, the seed and every setting that
shapes the optimisation must be the ones the run started with, or the checkpoints, config.yml and
summary.json would describe different runs. What only decides how the run is watched or where it
runs (logging, checkpoint and evaluation cadence, device, model caches) may change, and so may the
length of the run (more steps, more episodes: the run continues from where it is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skyfall.errors import ConfigError

SAFE_TO_CHANGE: dict[str, frozenset[str]] = {
    "stage1": frozenset(
        {
            "steps",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every",
            "eval_appearance",
            "eval_fit_steps",
            "log_every",
            "tensorboard",
            "device",
        }
    ),
    "stage2": frozenset({"checkpoint_every", "max_episodes"}),
}
"""Per config section, the dotted fields a resume may change."""

SAFE_LEAVES = frozenset(
    {"device", "cache_dir", "local_files_only", "prompt_cache_dir", "batch_size", "compile", "attention"}
)
"""Field names that may change wherever they sit: where a model is found and which device runs it,
and the refiners' speed options (batching, compiled blocks, attention kernel), whose effect on a
refinement is float rounding (tests/test_flux_speed.py, tests/test_difix.py). The block cache is not
one of them: it changes the output."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def config_differences(section: str, saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Dotted fields of ``section`` whose values differ and may not change on resume."""
    a, b = flatten(saved), flatten(given)
    safe = SAFE_TO_CHANGE.get(section, frozenset())
    # A field the saved config lacks is newer than the run: it did not exist when the run started.
    return [
        key
        for key in sorted(set(a) | set(b))
        if key in a
        and key not in safe
        and key.rsplit(".", 1)[-1] not in SAFE_LEAVES
        and not _same(a.get(key), b.get(key))
    ]


def check_resume(section: str, saved: dict[str, Any], given: dict[str, Any], config_path: Path) -> None:
    """Raise `ConfigError` naming the first field where the command line and config.yml differ."""
    diff = config_differences(section, saved, given)
    if not diff:
        return
    key = diff[0]
    a, b = flatten(saved).get(key), flatten(given).get(key)
    more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
    flag = "--" + section + "." + key.replace("_", "-")
    raise ConfigError(
        f"--resume: {flag} is {b!r} here but {a!r} in {config_path}{more}; a resumed run keeps its settings "
        f"(resume without --preset/--config to use the run's own, or start a new run folder)"
    )


def check_same_tile(saved_tile: Path | None, given: Path, config_path: Path) -> None:
    """Raise `ConfigError` when ``--data`` is not the tile the run was trained on."""
    if saved_tile is None:
        return
    try:
        same = Path(given).resolve().samefile(saved_tile.resolve())
    except OSError:
        same = False
    if not same:
        raise ConfigError(
            f"--resume: --data {given} is not the tile of this run ({saved_tile}, from {config_path}); "
            "a resumed run keeps its tile"
        )

"""Presets and user config files: YAML layered onto the config dataclasses.

Layers, later wins: dataclass defaults < preset (``configs/NAME.yaml``) < ``--config FILE`` <
command-line flags (the last applied by tyro). A file holds a ``stage1:`` and/or a ``stage2:``
section, each a partial override; ``description:`` (one line for ``--help``) and the run metadata
that a run's own ``config.yml`` carries (``data``, ``stage``) are allowed and ignored, so
``--config RUN/config.yml`` reruns a run with its resolved values. Unknown keys and values of the
wrong type are errors naming the file and the key. YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyfall.config.training import Stage1Config, Stage2Config
from skyfall.errors import ConfigError

DEFAULT_PRESET = "paper-jax"
# A run's config.yml and a city's city_train.yml also hold these; they are not training settings.
_IGNORED_KEYS = ("description", "data", "data_relative", "stage", "city")


@dataclass
class TrainingConfig:
    """Both stages' configs, as a preset file or a run's config.yml holds them."""

    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)


def presets_dir() -> Path:
    """The folder of the preset YAML files (``configs/``, installed as ``skyfall.configs``)."""
    import importlib.util

    spec = importlib.util.find_spec("skyfall.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "configs"


@functools.cache
def preset_names() -> tuple[str, ...]:
    """Names of the shipped presets (file stems), in a fixed order: paper presets first."""
    names = sorted(p.stem for p in presets_dir().glob("*.yaml"))
    return tuple(sorted(names, key=lambda n: (not n.startswith("paper"), n)))


def preset_description(name: str) -> str:
    """The preset file's ``description:`` line ('' when it has none)."""
    return str(read_yaml(preset_path(name)).get("description", ""))


def preset_path(name: str) -> Path:
    """``configs/NAME.yaml``; ConfigError naming the choices for an unknown preset."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return presets_dir() / f"{name}.yaml"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """``yaml.safe_load`` of a config file that must hold a mapping (empty file = {})."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping with stage1:/stage2: sections")
    return data


def load_config(preset: str | None = DEFAULT_PRESET, config_file: str | Path | None = None) -> TrainingConfig:
    """Defaults < ``preset`` < ``config_file``: the resolved configs of both stages."""
    cfg = TrainingConfig()
    for path in ([preset_path(preset)] if preset else []) + ([Path(config_file)] if config_file else []):
        data = {k: v for k, v in read_yaml(path).items() if k not in _IGNORED_KEYS}
        cfg = merge(cfg, data, where=str(path))
    return cfg


def merge(cfg: Any, data: dict[str, Any], *, where: str = "config") -> Any:
    """A copy of dataclass ``cfg`` with ``data`` (nested dicts for nested configs) applied.

    Unknown keys and values that do not fit the field's type raise ConfigError naming ``where`` and
    the dotted key.
    """
    return _merge(cfg, data, where, "")


def _merge(cfg: Any, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = _type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key {dotted!r} (known: {', '.join(sorted(names))})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value if value is not None else {}, where, f"{dotted}.")
        else:
            changes[key] = _check_value(value, hints[key], where, dotted)
    return dataclasses.replace(cfg, **changes)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(value: Any, tp: Any, where: str, key: str) -> Any:
    """``value`` converted to ``tp`` (int -> float, list -> tuple) or ConfigError."""
    ok, out = _fits(value, tp)
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} is not a valid {_type_name(tp)}")
    return out


def _fits(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _fits(value, arg)
            if ok:
                return True, out
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not ... and len(value) != len(args)):
            return False, value
        if args and args[-1] is ...:
            args = (args[0],) * len(value)
        items = [_fits(v, a) for v, a in zip(value, args or (Any,) * len(value), strict=True)]
        return all(ok for ok, _ in items), tuple(out for _, out in items)
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "choice of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict:
    """Plain-dict form of a config dataclass (for YAML/JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, *, where: str = "config") -> Any:
    """Rebuild a config dataclass from ``to_dict`` output (missing keys keep their defaults)."""
    return merge(cls(), data, where=where)

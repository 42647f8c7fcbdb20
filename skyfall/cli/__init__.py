"""The ``skyfall`` command line.

Each command is a dataclass (its docstring and field docstrings are the ``--help`` text) with a
``main()`` method, in its own module under ``skyfall.cli``; tyro parses one union of all of them,
command groups (``skyfall train stage1``) as nested unions. Command modules must not import torch or
other heavy libraries at module level, so ``skyfall --help`` answers instantly; heavy imports live
inside ``main()``.

Presets: a command with ``preset`` and ``config`` fields takes its ``stage1``/``stage2`` defaults
from ``configs/PRESET.yaml`` and the user's YAML file (``command_defaults``); the two options are
read before tyro parses, so that the defaults tyro shows and applies are the merged ones.

``--threads N`` (any command, anywhere on the line) sets torch's CPU thread count; by default it is
the number of cores the load average leaves idle (``skyfall.devices.choose_threads``), and commands
that compute say their choice in their first line.

User errors (``skyfall.errors.SkyfallError``: bad tile files, bad options, bad config files) and
failed file operations (a full disk, a folder that cannot be written: ``OSError``) print one line and
exit with code 2 (``SKYFALL_TRACEBACK=1`` shows the traceback too). SIGINT, SIGTERM and SIGHUP stop a
training run at the next step boundary with a checkpoint (``skyfall.interrupts``), other commands at
once; the exit code is 128 + the signal number (130, 143, 129).

``--resume`` without ``--preset``/``--config`` takes its defaults from the run's own config.yml, so
that resuming needs no memory of the options a run started with.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

# name -> (module, class), or a group: name -> (help line, {subcommand: (module, class)}).
# Order is the order shown in --help.
COMMANDS: dict[str, Any] = {
    "demo": ("skyfall.cli.demo", "Demo"),
    "synth": ("skyfall.cli.synth", "Synth"),
    "info": ("skyfall.cli.info", "Info"),
    "doctor": ("skyfall.cli.doctor", "Doctor"),
    "train": (
        "Train a reconstruction: `skyfall train stage1|stage2|all ...` (`--preset demo` for CPU runs).",
        {
            "stage1": ("skyfall.cli.train", "TrainStage1"),
            "stage2": ("skyfall.cli.train", "TrainStage2"),
            "all": ("skyfall.cli.train", "TrainAll"),
        },
    ),
    "eval": ("skyfall.cli.eval", "Eval"),
    "export": ("skyfall.cli.export", "Export"),
    "export-views": ("skyfall.cli.export_views", "ExportViews"),
    "render": ("skyfall.cli.render", "Render"),
    "view": ("skyfall.cli.view", "View"),
    "path": (
        "Write camera-path JSON files: `skyfall path orbit --target X Y Z --radius R --out PATH.json`.",
        {"orbit": ("skyfall.cli.path", "PathOrbit")},
    ),
    "prepare": ("skyfall.cli.prepare", "Prepare"),
    "city": (
        "Many tiles of one city on Ray: `skyfall city prepare|train|export CITY ...`.",
        {
            "prepare": ("skyfall.cli.city_prepare", "CityPrepare"),
            "train": ("skyfall.cli.city_train", "CityTrain"),
            "export": ("skyfall.cli.city_export", "CityExportCommand"),
        },
    ),
}


def _load(module: str, cls_name: str) -> type:
    return getattr(importlib.import_module(module), cls_name)


def _first_paragraph(cls: type) -> str:
    return (cls.__doc__ or "").strip().split("\n\n")[0]


def command_defaults(cls: type, preset: str | None, config: Path | None) -> Any:
    """An instance of command ``cls`` whose ``stage1``/``stage2`` fields hold the resolved configs.

    ``preset`` None keeps the command's own default preset. Required fields stay ``tyro.MISSING``.
    """
    import tyro

    from skyfall.config.presets import load_config

    fields = {f.name: f for f in dataclasses.fields(cls)}
    if preset is None:
        preset = fields["preset"].default
    resolved = load_config(preset, config)
    kwargs: dict[str, Any] = {
        name: tyro.MISSING
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    kwargs.update({stage: getattr(resolved, stage) for stage in ("stage1", "stage2") if stage in fields})
    return cls(**kwargs, preset=preset, config=config)


def thread_option(argv: list[str]) -> tuple[int | None, list[str]]:
    """``--threads N`` (global: read here, not by the commands) and ``argv`` without it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int)
    known, rest = pre.parse_known_args(argv)
    return known.threads, rest


# Commands that only read or write small files: no thread line for them.
_NO_TORCH = {"info", "doctor", "path"}


def preset_options(argv: list[str]) -> tuple[str | None, Path | None]:
    """``--preset`` and ``--config`` wherever they appear in ``argv`` (the rest is tyro's)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    return known.preset, known.config


def resume_config(argv: list[str]) -> Path | None:
    """The run's config.yml that a resuming command takes its defaults from, or None.

    ``train stage1|all --resume`` and ``demo --resume`` read OUT/config.yml (demo: OUT/run/),
    ``train stage2`` reads RUN/config.yml once it holds a stage2 section, and ``city train CITY``
    reads CITY/city_train.yml, unless ``--preset`` or ``--config`` is given.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--out", type=Path)
    pre.add_argument("--run", type=Path)
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(argv)
    words = [w for w in argv if not w.startswith("-")][:2]
    path = None
    if known.resume and known.out is not None and words in (["train", "stage1"], ["train", "all"]):
        path = known.out / "config.yml"
    elif known.resume and words[:1] == ["demo"]:
        path = (known.out or Path("outputs/demo")) / "run" / "config.yml"
    elif words == ["city", "train"]:
        # the city folder is the first positional after the command; its settings file, if any
        city = next((Path(w) for w in argv[2:] if not w.startswith("-") and Path(w).is_dir()), None)
        path = None if city is None else city / "city_train.yml"
    elif words == ["train", "stage2"] and known.run is not None:
        path = known.run / "config.yml"
        try:
            import yaml

            if "stage2" not in (yaml.safe_load(path.read_text()) or {}):
                path = None
        except (OSError, ValueError, AttributeError):
            path = None
    return path if path is not None and path.is_file() else None


def _subcommand(name: str, cls: type, preset: str | None, config: Path | None, chosen: bool) -> Any:
    import tyro

    default = None
    # Only the chosen command resolves its presets (YAML reads): the others are never parsed, and
    # their --preset could mean something else (`synth --preset` is a city preset).
    if chosen and {"preset", "config"} <= {f.name for f in dataclasses.fields(cls)}:
        default = command_defaults(cls, preset, config)
    spec = tyro.conf.subcommand(name, default=default, description=_first_paragraph(cls))
    return Annotated[cls, spec]


def _single_member_group(name: str, help_line: str, sub: str, cls: type) -> type:
    """A one-command group (``skyfall path orbit``): tyro collapses one-member unions, so the member
    is wrapped with a positional naming it."""
    import tyro

    def main(self: Any) -> None:
        self.command.main()

    return dataclasses.make_dataclass(
        f"{name.capitalize()}Group",
        [
            ("kind", tyro.conf.Positional[Literal[sub]], dataclasses.field(default=sub)),  # type: ignore[valid-type]
            ("command", Annotated[cls, tyro.conf.arg(name="")], dataclasses.field(default_factory=cls)),
        ],
        namespace={"__doc__": help_line, "main": main},
    )


def command_union(argv: list[str]) -> Any:
    """The union of every command (groups nested) with preset-resolved defaults for ``argv``."""
    import tyro

    preset, config = preset_options(argv)
    if preset is None and config is None:
        config = resume_config(argv)
    members = []
    words = [w for w in argv if not w.startswith("-")][:2]
    for name, entry in COMMANDS.items():
        if isinstance(entry[1], dict):
            help_line, subs = entry
            loaded = {sub: _load(*where) for sub, where in subs.items()}
            if len(loaded) == 1:
                ((sub, cls),) = loaded.items()
                group = _single_member_group(name, help_line, sub, cls)
                members.append(Annotated[group, tyro.conf.subcommand(name, description=help_line)])
                continue
            inner = Union[  # type: ignore[valid-type]
                tuple(
                    _subcommand(sub, cls, preset, config, chosen=words == [name, sub])
                    for sub, cls in loaded.items()
                )
            ]
            members.append(Annotated[inner, tyro.conf.subcommand(name, description=help_line)])
        else:
            members.append(_subcommand(name, _load(*entry), preset, config, chosen=words[:1] == [name]))
    return Union[tuple(members)]  # type: ignore[valid-type]


def entrypoint(argv: list[str] | None = None) -> None:
    """Console-script entry point: parse the command line and run the chosen command."""
    import os

    from skyfall import interrupts
    from skyfall.errors import SkyfallError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with interrupts.handlers():
            _run(argv)
    except SkyfallError as e:
        print(f"skyfall: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if os.environ.get("SKYFALL_TRACEBACK"):
            raise
        print(
            f"skyfall: error: {_os_error_line(e)} (completed work and checkpoints are kept)", file=sys.stderr
        )
        sys.exit(2)
    except interrupts.StopRequested as e:
        detail = f"; {e.detail}" if e.detail else " (completed work and checkpoints are kept)"
        print(f"skyfall: stopped by {interrupts.signal_name(e.signum)}{detail}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("skyfall: interrupted (completed work and checkpoints are kept)", file=sys.stderr)
        sys.exit(130)


def _os_error_line(e: OSError) -> str:
    """``PATH: No space left on device`` (``PATH -> PATH2: ...`` for two-path errors) from any OSError."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return what
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return f"{where}: {what}"


def _run(argv: list[str]) -> None:
    import tyro

    threads, argv = thread_option(argv)
    commands = command_union(argv)
    cmd = tyro.cli(
        commands,
        args=argv,
        prog="skyfall",
        description="skyfall: satellite images of a city tile -> explorable 3D Gaussian-splat scene. "
        "Global option: --threads N (torch CPU threads; default: the cores the load leaves idle).",
    )
    if not argv or argv[0] not in _NO_TORCH:
        from skyfall.devices import apply_threads, choose_threads

        choice = choose_threads(threads)
        apply_threads(choice)
        print(f"[skyfall] {choice.describe()}", flush=True)
    if preset_options(argv) == (None, None) and (used := resume_config(argv)) is not None:
        print(f"[skyfall] settings from {used} (the run's own)", flush=True)
    cmd.main()

"""The ``skyfall`` command line.

Each command is a dataclass (its docstring and field docstrings are the ``--help`` text) with a
``main()`` method, in its own module under ``skyfall.cli``. Command modules must not import torch
or other heavy libraries at module level, so ``skyfall --help`` answers instantly; heavy imports
live inside ``main()``.

User errors (``skyfall.errors.SkyfallError``: bad tile files, bad options) print one line and exit
with code 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Union

# name -> (module, class). Order is the order shown in --help.
# A command class may define ``preset_default(argv) -> instance`` to supply preset-dependent defaults.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("skyfall.cli.demo", "Demo"),
    "synth": ("skyfall.cli.synth", "Synth"),
    "info": ("skyfall.cli.info", "Info"),
    "doctor": ("skyfall.cli.doctor", "Doctor"),
    "eval": ("skyfall.cli.eval", "Eval"),
    "export": ("skyfall.cli.export", "Export"),
    "render": ("skyfall.cli.render", "Render"),
    "view": ("skyfall.cli.view", "View"),
    "prepare": ("skyfall.cli.prepare", "Prepare"),
}


# Command groups (``skyfall train stage1``): group -> (help line, {subcommand: (module, class)}).
# tyro collapses a one-member Union, so groups are dispatched here rather than by nesting types.
GROUPS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "train": (
        "Train a reconstruction: `skyfall train stage1|stage2|all ...` (`--preset demo` for CPU runs).",
        {
            "stage1": ("skyfall.cli.train", "TrainStage1"),
            "stage2": ("skyfall.cli.train", "TrainStage2"),
            "all": ("skyfall.cli.train", "TrainAll"),
        },
    ),
    "path": (
        "Write camera-path JSON files: `skyfall path orbit --target X Y Z --radius R --out PATH.json`.",
        {"orbit": ("skyfall.cli.path", "PathOrbit")},
    ),
}


def _load(module: str, cls_name: str) -> type:
    return getattr(importlib.import_module(module), cls_name)


def _first_paragraph(cls: type) -> str:
    return (cls.__doc__ or "").strip().split("\n\n")[0]


def _group_placeholder(name: str, help_line: str) -> type:
    """A field-less dataclass standing for a group in the top-level ``--help``."""
    import dataclasses

    return dataclasses.make_dataclass(name.capitalize(), [], namespace={"__doc__": help_line})


def _command_types() -> list:
    import tyro

    types = []
    for name, (module, cls_name) in COMMANDS.items():
        cls = _load(module, cls_name)
        types.append(Annotated[cls, tyro.conf.subcommand(name, description=_first_paragraph(cls))])
    for name, (help_line, subs) in GROUPS.items():
        for module, cls_name in subs.values():
            _load(module, cls_name)  # import check (and keeps the "no heavy imports" test honest)
        types.append(
            Annotated[_group_placeholder(name, help_line), tyro.conf.subcommand(name, description=help_line)]
        )
    return types


def _parse_group(group: str, argv: list[str]):  # noqa: ANN202
    """Parse ``skyfall GROUP SUB [options]``; prints the group's help for ``skyfall GROUP [--help]``."""
    import tyro

    help_line, subs = GROUPS[group]
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(f"usage: skyfall {group} {{{','.join(subs)}}} [OPTIONS]\n\n{help_line}\n")
        for sub, (module, cls_name) in subs.items():
            print(f"  {sub:10s} {_first_paragraph(_load(module, cls_name))}")
        sys.exit(0 if len(argv) >= 2 else 2)
    sub = argv[1]
    if sub not in subs:
        print(
            f"skyfall {group}: error: unknown subcommand {sub!r}; choose from {', '.join(subs)}",
            file=sys.stderr,
        )
        sys.exit(2)
    cls = _load(*subs[sub])
    default = cls.preset_default(argv[2:]) if hasattr(cls, "preset_default") else None
    return tyro.cli(
        cls, args=argv[2:], prog=f"skyfall {group} {sub}", default=default, description=cls.__doc__
    )


def _parse_top(argv: list[str]):  # noqa: ANN202
    import tyro

    return tyro.cli(
        Union[tuple(_command_types())],  # type: ignore[valid-type]
        args=argv,
        prog="skyfall",
        description="skyfall: satellite images of a city tile -> explorable 3D Gaussian-splat scene.",
    )


def entrypoint(argv: list[str] | None = None) -> None:
    """Console-script entry point: parse the command line and run the chosen command."""
    from skyfall.errors import SkyfallError

    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = _parse_group(argv[0], argv) if argv and argv[0] in GROUPS else _parse_top(argv)
    if not hasattr(cmd, "main"):  # a group placeholder chosen without a subcommand
        _parse_group(type(cmd).__name__.lower(), [type(cmd).__name__.lower()])
    try:
        cmd.main()
    except SkyfallError as e:
        print(f"skyfall: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("skyfall: interrupted (completed work and checkpoints are kept)", file=sys.stderr)
        sys.exit(130)

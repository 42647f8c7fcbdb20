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
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("skyfall.cli.demo", "Demo"),
    "synth": ("skyfall.cli.synth", "Synth"),
    "info": ("skyfall.cli.info", "Info"),
}


def _command_types() -> list:
    import tyro

    types = []
    for name, (module, cls_name) in COMMANDS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        types.append(Annotated[cls, tyro.conf.subcommand(name, description=doc)])
    return types


def entrypoint(argv: list[str] | None = None) -> None:
    """Console-script entry point: parse the command line and run the chosen command."""
    import tyro

    from skyfall.errors import SkyfallError

    types = _command_types()
    cmd = tyro.cli(
        Union[tuple(types)],  # type: ignore[valid-type]
        args=argv,
        prog="skyfall",
        description="skyfall: satellite images of a city tile -> explorable 3D Gaussian-splat scene.",
    )
    try:
        cmd.main()
    except SkyfallError as e:
        print(f"skyfall: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("skyfall: interrupted (completed work and checkpoints are kept)", file=sys.stderr)
        sys.exit(130)

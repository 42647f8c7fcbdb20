"""Named presets as YAML, shipped inside the package as ``skyfall.configs`` (see pyproject.toml).

One file per preset with a ``stage1:`` and a ``stage2:`` section; each is a partial override of
the dataclass defaults in ``skyfall.config.training``. Loaded by ``skyfall.config.presets``.
"""

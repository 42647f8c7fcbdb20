"""Export trained scenes for viewers: bake (3D filter, appearance), up-axis rotation, file formats,
videos. See ``skyfall export`` / ``skyfall render`` / ``skyfall view``."""

from __future__ import annotations

from skyfall.export.bake import Splats, bake, sanitize, splats_from_params
from skyfall.export.formats import (
    FORMATS,
    read_ply,
    read_ply_compressed,
    read_splat,
    read_spz,
    write_ply,
    write_ply_compressed,
    write_splat,
    write_splats,
    write_spz,
)
from skyfall.export.run import ExportResult, LoadedRun, baked_splats, export_run, load_run
from skyfall.export.upaxis import rotate_splats, to_up_axis, up_rotation

__all__ = [
    "FORMATS",
    "ExportResult",
    "LoadedRun",
    "Splats",
    "bake",
    "baked_splats",
    "export_run",
    "load_run",
    "read_ply",
    "read_ply_compressed",
    "read_splat",
    "read_spz",
    "rotate_splats",
    "sanitize",
    "splats_from_params",
    "to_up_axis",
    "up_rotation",
    "write_ply",
    "write_ply_compressed",
    "write_splat",
    "write_splats",
    "write_spz",
]

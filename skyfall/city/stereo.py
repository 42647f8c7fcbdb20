"""A city's stereo DSM: the dense heights of its prepared tiles as one mosaic (``CITY/stereo/``).

::

    CITY/stereo/dsm.tif, dsm.png, dsm.json     the mosaic (the grid, CRS and ownership rule of
                                               ``skyfall city export``'s DSM), cells without dense
                                               heights listed in dsm.json ``missing``

``skyfall city prepare`` writes it after the last tile: each cell's ``dense/field.npz``
(``skyfall.prepare.dense_field``) sampled on the cells of the city grid its core owns, exactly as the
trained DSM mosaic samples each cell's model (``skyfall.city.export.DsmMosaic``). So a city has a
DSM within minutes of its images, hours before its tiles are trained, and the two mosaics compare
cell for cell.
"""

from __future__ import annotations

from pathlib import Path

from skyfall.city.export import CityDsm, DsmMosaic, georeference
from skyfall.city.folders import CityFolder
from skyfall.dsm import field_sampler
from skyfall.prepare.dense_field import load_field

STEREO_DIR = "stereo"


def stereo_mosaic(
    city: str | Path | CityFolder, *, resolution: float = 0.5, oversample: int = 2
) -> CityDsm | None:
    """Write ``CITY/stereo/dsm.{tif,png,json}`` from the tiles' dense heights (module docstring).

    Returns:
        The mosaic, or None when no tile has dense heights (nothing is written then).

    Raises:
        TileFormatError: a tile's ``dense/field.npz`` is unreadable (naming it).
        MissingDependencyError: rasterio / pyproj are not installed.
    """
    folder = city if isinstance(city, CityFolder) else CityFolder(city)
    manifest = folder.manifest()
    mosaic = DsmMosaic(manifest, resolution, georeference(manifest), oversample)
    missing: dict[str, str] = {}
    for cell in manifest.cells:
        field = load_field(folder.tile(cell))
        if field is None:
            missing[cell.name] = f"{folder.tile(cell)}: no dense/field.npz (not prepared, or --no-dense)"
            continue
        mosaic.add(cell, field_sampler(field))
    if not mosaic.cells:
        return None
    out = folder.root / STEREO_DIR
    out.mkdir(parents=True, exist_ok=True)
    return mosaic.write(out, {"missing": missing})

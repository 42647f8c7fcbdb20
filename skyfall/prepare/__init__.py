"""Real satellite input: RPC images (GeoTIFF, NITF, OSSIM .geom, RPB, DIMAP) -> a skyfall tile.

``prepare_tile(images, out, PrepareConfig(aoi=(lon, lat, size_m), alt_range=(lo, hi)))`` reads the
RPC camera models, crops the area of interest, fits one OpenCV pinhole per view in a local ENU
frame, matches features between all pairs of views for a joint bundle adjustment and initial points, and writes the tile
format that `skyfall.data.tile` reads (the reference's "Satellite" scene layout). The CLI is ``skyfall prepare``.
"""

from __future__ import annotations

from skyfall.prepare.geodesy import ENUFrame
from skyfall.prepare.pinhole import PinholeFit, fit_pinhole
from skyfall.prepare.pipeline import AOIError, PrepareConfig, aoi_from_geojson, prepare_tile
from skyfall.prepare.raster import ImageReadError, SatelliteImage, read_satellite_image
from skyfall.prepare.rpc import RPCError, RPCModel, read_rpc_file

__all__ = [
    "AOIError",
    "ENUFrame",
    "ImageReadError",
    "PinholeFit",
    "PrepareConfig",
    "RPCError",
    "RPCModel",
    "SatelliteImage",
    "aoi_from_geojson",
    "fit_pinhole",
    "prepare_tile",
    "read_rpc_file",
    "read_satellite_image",
]

"""Read a satellite image with its RPC model: pixels, validity, and where its pixels sit in the RPC frame.

Supported inputs:

* **GeoTIFF / TIFF** (tifffile when installed, else Pillow for simple strips): RPC from the GDAL
  ``RPCCoefficientTag`` (50844) or from a sidecar. Sensor-geometry crops such as the CNES Pléiades
  samples carry their position inside the full scene as a ``ModelTransformationTag`` (34264) or a
  tie point + pixel scale (33922/33550) *without* a CRS; that affine maps file pixels to the full
  scene's pixels, i.e. the RPC frame. An image with a CRS (GeoKeyDirectory 34735) is map-projected
  and no longer follows its RPC: refused.
* **NITF** (.ntf/.nitf): RPC from the ``RPC00B`` TRE (parsed here); pixels need rasterio (GDAL).
* **Anything Pillow opens** (PNG, JPEG, ...), with an RPC sidecar.

Sidecars, looked up next to the image: ``STEM.geom``, ``STEM.RPB``, ``STEM_RPC.TXT``,
``STEM.json`` (Sat-NeRF) and a single ``RPC_*.XML`` (DIMAP) in the folder.

No-data: NaN, the GDAL_NODATA tag (42113) value, and for integer images without that tag, pixels
whose bands are all 0 (DFC2019 padding; the reference's mask rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skyfall.errors import MissingDependencyError, SkyfallError
from skyfall.prepare.rpc import (
    GEOTIFF_RPC_TAG,
    RPCError,
    RPCModel,
    read_rpc_file,
    rpc_from_array,
    rpc_from_nitf,
)

_TAG_NODATA = 42113
_TAG_MODEL_TRANSFORM = 34264
_TAG_TIEPOINT = 33922
_TAG_PIXEL_SCALE = 33550
_TAG_GEOKEYS = 34735
_SIDECAR_SUFFIXES = (".geom", ".GEOM", ".RPB", ".rpb", "_RPC.TXT", "_rpc.txt", ".json")


class ImageReadError(SkyfallError):
    """An input image cannot be read or used."""

    def __init__(self, file: str | Path, message: str):
        self.file = Path(file)
        super().__init__(f"{file}: {message}")


@dataclass
class SatelliteImage:
    """One input view.

    Attributes:
        path: the image file.
        pixels: [H, W, C] float64 (C = 1 panchromatic or 3 RGB).
        valid: [H, W] bool, True where the pixel has data.
        rpc: its RPC model.
        rpc_source: where the RPC came from (file or tag), for the summary.
        file_from_rpc: [2, 3] affine mapping RPC (col, row, 1) to file pixel coordinates in the
            gsplat convention (the first pixel's centre is (0.5, 0.5)).
    """

    path: Path
    pixels: np.ndarray
    valid: np.ndarray
    rpc: RPCModel
    rpc_source: str
    file_from_rpc: np.ndarray

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    def rpc_to_file(self, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RPC pixel coordinates -> file pixel coordinates (gsplat convention)."""
        a = self.file_from_rpc
        return a[0, 0] * col + a[0, 1] * row + a[0, 2], a[1, 0] * col + a[1, 1] * row + a[1, 2]


def find_sidecar(image: Path) -> Path | None:
    """The RPC sidecar of ``image`` (see the module docstring), or None."""
    for suffix in _SIDECAR_SUFFIXES:
        cand = image.with_name(image.stem + suffix)
        if cand.is_file() and cand != image:
            return cand
    dimap = sorted(image.parent.glob("RPC_*.XML")) + sorted(image.parent.glob("RPC_*.xml"))
    return dimap[0] if len(dimap) == 1 else None


def read_satellite_image(path: str | Path, rpc_file: str | Path | None = None) -> SatelliteImage:
    """Read pixels, validity mask, RPC and RPC->file mapping of one view.

    Args:
        path: the image file.
        rpc_file: an explicit RPC file; otherwise embedded tags, then sidecars.

    Raises:
        ImageReadError: the file is missing, unreadable or map-projected.
        RPCError: no RPC model was found, or it is malformed.
        MissingDependencyError: a NITF image without rasterio installed.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "the image file does not exist.")
    suffix = path.suffix.lower()
    embedded: RPCModel | None = None
    tags: dict[int, object] = {}
    if suffix in (".ntf", ".nitf"):
        try:
            embedded = rpc_from_nitf(path.read_bytes(), path)
        except OSError as e:
            raise ImageReadError(path, f"the file cannot be read ({e.strerror or e}).") from e
        pixels = _read_with_rasterio(path)
    elif suffix in (".tif", ".tiff"):
        pixels, tags = _read_tiff(path)
        if GEOTIFF_RPC_TAG in tags:
            embedded = rpc_from_array(np.asarray(tags[GEOTIFF_RPC_TAG]), path)
    else:
        pixels = _read_pillow(path)

    if rpc_file is not None:
        rpc, source = read_rpc_file(rpc_file), str(rpc_file)
    elif embedded is not None:
        rpc, source = embedded, f"{path.name} (embedded)"
    else:
        sidecar = find_sidecar(path)
        if sidecar is None:
            raise RPCError(
                path,
                None,
                "no RPC camera model found: no RPC tag in the file and no sidecar "
                f"({', '.join('STEM' + s for s in _SIDECAR_SUFFIXES)}, RPC_*.XML); pass --rpc.",
            )
        rpc, source = read_rpc_file(sidecar), str(sidecar)

    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] >= 3:
        pixels = pixels[:, :, :3]
    elif pixels.shape[2] == 2:  # grey + alpha
        pixels = pixels[:, :, :1]
    valid = _valid_mask(pixels, tags.get(_TAG_NODATA))
    pixels = np.where(valid[..., None], pixels.astype(np.float64), 0.0)
    return SatelliteImage(
        path=path,
        pixels=pixels,
        valid=valid,
        rpc=rpc,
        rpc_source=source,
        file_from_rpc=_file_from_rpc(tags, path, embedded is not None and rpc_file is None),
    )


def _valid_mask(pixels: np.ndarray, nodata: object) -> np.ndarray:
    valid = np.isfinite(pixels).all(axis=2)
    if nodata is not None:
        try:
            value = float(str(nodata).strip().strip("\x00"))
            valid &= ~(pixels == value).all(axis=2)
        except ValueError:
            pass
    elif np.issubdtype(pixels.dtype, np.integer):
        valid &= pixels.any(axis=2)
    return valid


def _file_from_rpc(tags: dict[int, object], path: Path, rpc_embedded: bool) -> np.ndarray:
    """[2, 3] RPC (col, row, 1) -> file pixel coordinates with pixel centres at +0.5."""
    identity = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    if rpc_embedded:
        return identity  # GDAL writes tag 50844 already adjusted to this raster
    if _TAG_GEOKEYS in tags:
        raise ImageReadError(
            path,
            "the image is map-projected (it has a GeoTIFF CRS), so its RPC no longer describes its "
            "pixels; use the sensor-geometry (level 1 / ORStandard2A 'raw') product.",
        )
    if _TAG_MODEL_TRANSFORM in tags:
        m = np.asarray(tags[_TAG_MODEL_TRANSFORM], np.float64).reshape(4, 4)
        g = np.array([[m[0, 0], m[0, 1], m[0, 3]], [m[1, 0], m[1, 1], m[1, 3]]])
    elif _TAG_TIEPOINT in tags and _TAG_PIXEL_SCALE in tags:
        tp = np.asarray(tags[_TAG_TIEPOINT], np.float64)
        sc = np.asarray(tags[_TAG_PIXEL_SCALE], np.float64)
        # Without a CRS the tie point/scale are in full-scene pixels; y grows downwards there.
        sy = sc[1] if tp[4] == 0 else -sc[1]
        g = np.array([[sc[0], 0.0, tp[3] - tp[0] * sc[0]], [0.0, abs(sy), tp[4] - tp[1] * abs(sy)]])
    else:
        return identity
    # g maps file area coordinates (x, y) to full-scene area coordinates (X, Y); RPC centre
    # coordinates are area coordinates - 0.5, and file pixel coordinates here are area coordinates.
    lin = g[:, :2]
    if abs(np.linalg.det(lin)) < 1e-12:
        raise ImageReadError(path, "the image-to-scene transform tag is singular.")
    inv = np.linalg.inv(lin)
    # X - 0.5 = col  =>  (X, Y) = (col + 0.5, row + 0.5); (x, y) = inv @ ((X, Y) - g[:, 2])
    shift = inv @ (np.array([0.5, 0.5]) - g[:, 2])
    return np.concatenate([inv, shift[:, None]], axis=1)


def _read_tiff(path: Path) -> tuple[np.ndarray, dict[int, object]]:
    try:
        import tifffile
    except ImportError:
        return _read_tiff_pillow(path)
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            tags = {t.code: t.value for t in page.tags.values()}
            pixels = page.asarray()
    except Exception as e:  # tifffile raises many types for corrupt files  # noqa: BLE001
        raise ImageReadError(path, f"the TIFF cannot be decoded ({type(e).__name__}: {e}).") from e
    if pixels.ndim == 3 and pixels.shape[0] < pixels.shape[-1] and pixels.shape[0] <= 16:
        pixels = np.moveaxis(pixels, 0, -1)  # planar-separate bands -> H, W, C
    return pixels, tags


def _read_tiff_pillow(path: Path) -> tuple[np.ndarray, dict[int, object]]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            tags = dict(im.tag_v2)
            pixels = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(
            path,
            f"the TIFF cannot be decoded with Pillow ({e}); install the 'prepare' extra "
            "(pip install 'skyfall[prepare]') for tifffile.",
        ) from e
    return pixels, tags


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(path, f"the image cannot be decoded ({e}).") from e


def _read_with_rasterio(path: Path) -> np.ndarray:
    try:
        import rasterio
    except ImportError:
        raise MissingDependencyError(
            f"{path}: reading NITF pixels needs GDAL through rasterio (pip install rasterio); "
            "alternatively convert it to GeoTIFF with gdal_translate, which keeps the RPC tag."
        ) from None
    try:
        with rasterio.open(path) as ds:
            return np.moveaxis(ds.read(), 0, -1)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(path, f"rasterio cannot read the image ({e}).") from e

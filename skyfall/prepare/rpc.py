"""RPC00B rational polynomial camera models: projection, localisation and file readers.

An RPC maps a geodetic point (longitude, latitude in degrees, height in metres above the WGS84
ellipsoid) to an image position (column, row) in pixels::

    col = SAMP_NUM(P, L, H) / SAMP_DEN(P, L, H) * samp_scale + samp_off
    row = LINE_NUM(P, L, H) / LINE_DEN(P, L, H) * line_scale + line_off

with the normalised coordinates ``L = (lon - lon_off) / lon_scale``, ``P = (lat - lat_off) /
lat_scale``, ``H = (h - h_off) / h_scale`` and twenty cubic terms per polynomial in the RPC00B
order (NITF STDI-0002, also OSSIM's ``polynomial_format: B`` and GeoTIFF tag 50844)::

    1, L, P, H, LP, LH, PH, L², P², H², PLH, L³, LP², LH², L²P, P³, PH², L²H, P²H, H³

**Pixel convention.** Integer RPC coordinates are pixel *centres* (column 0 is the centre of the
first column), as in GDAL's RPC metadata, OSSIM and rpcm. skyfall's cameras put the first pixel's
centre at 0.5 (gsplat), so a crop starting at RPC column ``c0`` has ``u = col − c0 + 0.5``.

Readers (each returns an :class:`RPCModel` or raises :class:`RPCError` naming file and field):
OSSIM ``.geom`` keyword lists, DigitalGlobe/Maxar ``.RPB``, Pléiades/SPOT DIMAP ``RPC_*.XML``,
GeoTIFF ``RPCCoefficientTag`` (50844), NITF ``RPC00B`` TREs and Sat-NeRF/rpcm JSON dictionaries.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from skyfall.errors import SkyfallError

GEOTIFF_RPC_TAG = 50844  # RPCCoefficientTag: 92 doubles (2 errors, 10 offsets/scales, 80 coefficients)


class RPCError(SkyfallError):
    """An RPC model is missing, malformed or cannot be used for the request."""

    def __init__(self, file: str | Path | None, field: str | None, message: str):
        self.file = None if file is None else Path(file)
        self.field = field
        where = "" if file is None else f"{file}" + (f" [{field}]" if field else "") + ": "
        super().__init__(f"{where}{message}")


@dataclass(frozen=True)
class RPCModel:
    """An RPC00B camera model (float64).

    Attributes:
        line_num, line_den, samp_num, samp_den: [20] coefficient vectors in RPC00B term order.
        lon_off, lon_scale, lat_off, lat_scale: degrees.
        h_off, h_scale: metres above the WGS84 ellipsoid.
        line_off, line_scale, samp_off, samp_scale: pixels (integer = pixel centre).
        col_shift, row_shift: image-space corrections added to every projection, in pixels (the
            bias corrections of a bundle adjustment; 0 for a model as delivered).
        source: the file it was read from (for messages).
    """

    line_num: np.ndarray
    line_den: np.ndarray
    samp_num: np.ndarray
    samp_den: np.ndarray
    lon_off: float
    lon_scale: float
    lat_off: float
    lat_scale: float
    h_off: float
    h_scale: float
    line_off: float
    line_scale: float
    samp_off: float
    samp_scale: float
    col_shift: float = 0.0
    row_shift: float = 0.0
    source: str = ""

    def shifted(self, dcol: float, drow: float) -> RPCModel:
        """The same model with an extra image-space offset (bundle-adjustment correction)."""
        return replace(self, col_shift=self.col_shift + dcol, row_shift=self.row_shift + drow)

    def project(self, lon: np.ndarray, lat: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Geodetic points -> image (col, row) in RPC pixels.

        Args:
            lon, lat: [...] degrees; h: [...] metres (ellipsoidal). Broadcast together.

        Returns:
            (col, row), each [...] float64.
        """
        L = (np.asarray(lon, np.float64) - self.lon_off) / self.lon_scale
        P = (np.asarray(lat, np.float64) - self.lat_off) / self.lat_scale
        H = (np.asarray(h, np.float64) - self.h_off) / self.h_scale
        L, P, H = np.broadcast_arrays(L, P, H)
        terms = rpc_terms(L, P, H)
        col = (terms @ self.samp_num) / (terms @ self.samp_den) * self.samp_scale + self.samp_off
        row = (terms @ self.line_num) / (terms @ self.line_den) * self.line_scale + self.line_off
        return col + self.col_shift, row + self.row_shift

    def localize(
        self, col: np.ndarray, row: np.ndarray, h: np.ndarray, *, tol_px: float = 1e-7, max_iter: int = 30
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image (col, row) at height h -> (lon, lat): Newton iterations on :meth:`project`.

        The Jacobian is taken by central differences in normalised coordinates (RPCs are smooth
        cubic ratios, so 1e-4 of the normalised range is exact to ~1e-9 px).

        Args:
            col, row, h: [...] RPC pixels and metres, broadcast together.

        Returns:
            (lon, lat) in degrees, [...] float64.
        """
        col, row, h = (np.asarray(a, np.float64) for a in np.broadcast_arrays(col, row, h))
        lon = np.full(col.shape, self.lon_off)
        lat = np.full(col.shape, self.lat_off)
        dl, dp = 1e-4 * self.lon_scale, 1e-4 * self.lat_scale
        for _ in range(max_iter):
            c0, r0 = self.project(lon, lat, h)
            ec, er = col - c0, row - r0
            if max(np.abs(ec).max(initial=0.0), np.abs(er).max(initial=0.0)) < tol_px:
                break
            cp, rp = self.project(lon + dl, lat, h)
            cm, rm = self.project(lon - dl, lat, h)
            a, c = (cp - cm) / (2 * dl), (rp - rm) / (2 * dl)
            cp, rp = self.project(lon, lat + dp, h)
            cm, rm = self.project(lon, lat - dp, h)
            b, d = (cp - cm) / (2 * dp), (rp - rm) / (2 * dp)
            det = a * d - b * c
            lon = lon + (d * ec - b * er) / det
            lat = lat + (-c * ec + a * er) / det
        return lon, lat


def rpc_terms(L: np.ndarray, P: np.ndarray, H: np.ndarray) -> np.ndarray:
    """[..., 20] RPC00B monomials of normalised (L=lon, P=lat, H=height)."""
    one = np.ones_like(L)
    return np.stack(
        [
            one, L, P, H, L * P, L * H, P * H, L * L, P * P, H * H,
            P * L * H, L**3, L * P * P, L * H * H, L * L * P, P**3, P * H * H, L * L * H, P * P * H, H**3,
        ],
        axis=-1,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# readers

_SCALARS = ("lon_off", "lon_scale", "lat_off", "lat_scale", "h_off", "h_scale")
_PIXEL_SCALARS = ("line_off", "line_scale", "samp_off", "samp_scale")


def _build(values: dict[str, object], file: Path, names: dict[str, str]) -> RPCModel:
    """Check and assemble a model; ``names`` maps our field names to the file's names for messages."""
    kw: dict[str, object] = {}
    for key in _SCALARS + _PIXEL_SCALARS:
        if key not in values:
            raise RPCError(file, names.get(key, key), "the RPC field is missing.")
        try:
            v = float(values[key])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise RPCError(file, names.get(key, key), f"expected a number, got {values[key]!r}.") from None
        if not np.isfinite(v):
            raise RPCError(file, names.get(key, key), f"the value {v} is not finite.")
        if key.endswith("scale") and v == 0:
            raise RPCError(file, names.get(key, key), "the scale must be non-zero.")
        kw[key] = v
    for key in ("line_num", "line_den", "samp_num", "samp_den"):
        if key not in values:
            raise RPCError(file, names.get(key, key), "the RPC coefficients are missing.")
        try:
            arr = np.asarray(values[key], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise RPCError(file, names.get(key, key), "the coefficients are not numbers.") from None
        if arr.shape != (20,) or not np.isfinite(arr).all():
            raise RPCError(file, names.get(key, key), f"expected 20 finite coefficients, got {arr.size}.")
        kw[key] = arr
    return RPCModel(source=str(file), **kw)  # type: ignore[arg-type]


def read_geom(path: str | Path) -> RPCModel:
    """Read an OSSIM keyword-list ``.geom`` (``type: ossimRpcModel``, ``polynomial_format: B``)."""
    path = Path(path)
    kv = _read_keyword_list(path, sep=":")
    if kv.get("type", "ossimRpcModel") not in ("ossimRpcModel", "ossimRpcProjection"):
        raise RPCError(path, "type", f"not an OSSIM RPC model (type {kv.get('type')!r}).")
    if kv.get("polynomial_format", "B") != "B":
        raise RPCError(path, "polynomial_format", "only RPC00B (format B) coefficients are supported.")
    values: dict[str, object] = {
        "lon_off": kv.get("long_off"),
        "lon_scale": kv.get("long_scale"),
        "lat_off": kv.get("lat_off"),
        "lat_scale": kv.get("lat_scale"),
        "h_off": kv.get("height_off"),
        "h_scale": kv.get("height_scale"),
        "line_off": kv.get("line_off"),
        "line_scale": kv.get("line_scale"),
        "samp_off": kv.get("samp_off"),
        "samp_scale": kv.get("samp_scale"),
    }
    values = {k: v for k, v in values.items() if v is not None}
    names = {
        "lon_off": "long_off",
        "lon_scale": "long_scale",
        "h_off": "height_off",
        "h_scale": "height_scale",
    }
    for key in ("line_num", "line_den", "samp_num", "samp_den"):
        coeffs = [kv.get(f"{key}_coeff_{i:02d}") for i in range(20)]
        names[key] = f"{key}_coeff_00..19"
        if all(c is not None for c in coeffs):
            values[key] = coeffs
    return _build(values, path, names)


def read_rpb(path: str | Path) -> RPCModel:
    """Read a DigitalGlobe/Maxar ``.RPB`` file (``lineOffset = ...;`` and ``lineNumCoef = (...);``)."""
    path = Path(path)
    text = _read_text(path)
    kv: dict[str, str] = {}
    for m in re.finditer(r"(\w+)[ \t]*=[ \t]*(\([^)]*\)|[^;\n]*);", text):
        kv[m.group(1)] = m.group(2).strip()
    mapping = {
        "lon_off": "longOffset", "lon_scale": "longScale", "lat_off": "latOffset", "lat_scale": "latScale",
        "h_off": "heightOffset", "h_scale": "heightScale", "line_off": "lineOffset",
        "line_scale": "lineScale", "samp_off": "sampOffset", "samp_scale": "sampScale",
        "line_num": "lineNumCoef", "line_den": "lineDenCoef", "samp_num": "sampNumCoef",
        "samp_den": "sampDenCoef",
    }  # fmt: skip
    values: dict[str, object] = {}
    for ours, theirs in mapping.items():
        if theirs in kv:
            raw = kv[theirs]
            values[ours] = raw.strip("()").replace(",", " ").split() if raw.startswith("(") else raw
    return _build(values, path, mapping)


def read_dimap(path: str | Path) -> RPCModel:
    """Read a Pléiades/SPOT DIMAP v2 ``RPC_*.XML`` (its ``Inverse_Model`` is the ground-to-image RPC).

    DIMAP pixel coordinates are 1-based (the first pixel's centre is (1, 1)), so the offsets are
    shifted by −1 to the 0-based centre convention of this module.
    """
    path = Path(path)
    try:
        root = ET.fromstring(_read_text(path))
    except ET.ParseError as e:
        raise RPCError(path, None, f"the file is not valid XML ({e}).") from e
    tags = {el.tag.split("}")[-1]: (el.text or "").strip() for el in root.iter()}
    mapping = {
        "lon_off": "LONG_OFF", "lon_scale": "LONG_SCALE", "lat_off": "LAT_OFF", "lat_scale": "LAT_SCALE",
        "h_off": "HEIGHT_OFF", "h_scale": "HEIGHT_SCALE", "line_off": "LINE_OFF",
        "line_scale": "LINE_SCALE", "samp_off": "SAMP_OFF", "samp_scale": "SAMP_SCALE",
    }  # fmt: skip
    values: dict[str, object] = {k: tags[v] for k, v in mapping.items() if v in tags}
    for key, stem in (("line_num", "LINE_NUM_COEFF"), ("line_den", "LINE_DEN_COEFF"),
                      ("samp_num", "SAMP_NUM_COEFF"), ("samp_den", "SAMP_DEN_COEFF")):  # fmt: skip
        coeffs = [tags.get(f"{stem}_{i}") for i in range(1, 21)]
        mapping[key] = f"{stem}_1..20"
        if all(c is not None for c in coeffs):
            values[key] = coeffs
    model = _build(values, path, mapping)
    return replace(model, line_off=model.line_off - 1.0, samp_off=model.samp_off - 1.0)


def rpc_from_array(values: np.ndarray, file: str | Path) -> RPCModel:
    """Build a model from GeoTIFF tag 50844's 92 doubles (GDAL order)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size != 92:
        raise RPCError(file, f"tag {GEOTIFF_RPC_TAG}", f"expected 92 RPC values, got {v.size}.")
    names = ("line_off", "samp_off", "lat_off", "lon_off", "h_off",
             "line_scale", "samp_scale", "lat_scale", "lon_scale", "h_scale")  # fmt: skip
    values_d: dict[str, object] = dict(zip(names, v[2:12], strict=True))
    for i, key in enumerate(("line_num", "line_den", "samp_num", "samp_den")):
        values_d[key] = v[12 + 20 * i : 32 + 20 * i]
    return _build(values_d, Path(file), {k: f"tag {GEOTIFF_RPC_TAG}" for k in values_d})


def rpc_from_nitf(data: bytes, file: str | Path) -> RPCModel | None:
    """Parse the first ``RPC00B`` TRE of a NITF file's bytes; None if there is none.

    Fixed-width fields (STDI-0002): SUCCESS(1) ERR_BIAS(7) ERR_RAND(7) LINE_OFF(6) SAMP_OFF(5)
    LAT_OFF(8) LONG_OFF(9) HEIGHT_OFF(5) LINE_SCALE(6) SAMP_SCALE(5) LAT_SCALE(8) LONG_SCALE(9)
    HEIGHT_SCALE(5), then 4 x 20 coefficients of 12 characters.
    """
    at = data.find(b"RPC00B")
    if at < 0:
        return None
    body = data[at + 11 : at + 11 + 1041].decode("ascii", errors="replace")
    widths = (1, 7, 7, 6, 5, 8, 9, 5, 6, 5, 8, 9, 5)
    fields, pos = [], 0
    for w in widths:
        fields.append(body[pos : pos + w])
        pos += w
    try:
        head = [float(f) for f in fields[3:]]
        coeffs = [float(body[pos + 12 * i : pos + 12 * (i + 1)]) for i in range(80)]
    except ValueError:
        raise RPCError(file, "RPC00B", "the RPC00B TRE has a non-numeric field.") from None
    names = ("line_off", "samp_off", "lat_off", "lon_off", "h_off",
             "line_scale", "samp_scale", "lat_scale", "lon_scale", "h_scale")  # fmt: skip
    values: dict[str, object] = dict(zip(names, head, strict=True))
    for i, key in enumerate(("line_num", "line_den", "samp_num", "samp_den")):
        values[key] = coeffs[20 * i : 20 * (i + 1)]
    return _build(values, Path(file), {k: "RPC00B" for k in values})


def read_rpc_json(path: str | Path) -> RPCModel:
    """Read a Sat-NeRF/EOGS per-image JSON (``{"rpc": {...}}``) or an rpcm-style RPC dictionary."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise RPCError(path, None, f"the file is not valid JSON ({e.msg}).") from e
    d = data.get("rpc", data) if isinstance(data, dict) else None
    if not isinstance(d, dict):
        raise RPCError(path, "rpc", "expected a JSON object with RPC fields.")
    d = {k.lower(): v for k, v in d.items()}
    aliases = {
        "lon_off": ("lon_offset", "long_off"), "lon_scale": ("lon_scale", "long_scale"),
        "lat_off": ("lat_offset", "lat_off"), "lat_scale": ("lat_scale",),
        "h_off": ("alt_offset", "height_off"), "h_scale": ("alt_scale", "height_scale"),
        "line_off": ("row_offset", "line_off"), "line_scale": ("row_scale", "line_scale"),
        "samp_off": ("col_offset", "samp_off"), "samp_scale": ("col_scale", "samp_scale"),
        "line_num": ("row_num", "line_num_coeff"), "line_den": ("row_den", "line_den_coeff"),
        "samp_num": ("col_num", "samp_num_coeff"), "samp_den": ("col_den", "samp_den_coeff"),
    }  # fmt: skip
    values: dict[str, object] = {}
    for ours, options in aliases.items():
        for name in options:
            if name in d:
                v = d[name]
                values[ours] = v.split() if isinstance(v, str) and ours.endswith(("num", "den")) else v
                break
    return _build(values, path, {k: v[0] for k, v in aliases.items()})


def read_rpc_file(path: str | Path) -> RPCModel:
    """Read an RPC sidecar, choosing the reader by extension (.geom, .rpb, .xml, .json)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".geom":
        return read_geom(path)
    if suffix == ".rpb":
        return read_rpb(path)
    if suffix == ".xml":
        return read_dimap(path)
    if suffix == ".json":
        return read_rpc_json(path)
    if suffix == ".txt":  # _RPC.TXT (GDAL/Ikonos style) is the same key: value layout as .geom
        return _read_rpc_txt(path)
    raise RPCError(path, None, "unknown RPC file type (expected .geom, .rpb, .xml, .json or _rpc.txt).")


def _read_rpc_txt(path: Path) -> RPCModel:
    kv = _read_keyword_list(path, sep=":")
    up = {k.upper(): v for k, v in kv.items()}
    mapping = {
        "lon_off": "LONG_OFF", "lon_scale": "LONG_SCALE", "lat_off": "LAT_OFF", "lat_scale": "LAT_SCALE",
        "h_off": "HEIGHT_OFF", "h_scale": "HEIGHT_SCALE", "line_off": "LINE_OFF",
        "line_scale": "LINE_SCALE", "samp_off": "SAMP_OFF", "samp_scale": "SAMP_SCALE",
    }  # fmt: skip
    values: dict[str, object] = {k: up[v].split()[0] for k, v in mapping.items() if v in up}
    for key, stem in (("line_num", "LINE_NUM_COEFF"), ("line_den", "LINE_DEN_COEFF"),
                      ("samp_num", "SAMP_NUM_COEFF"), ("samp_den", "SAMP_DEN_COEFF")):  # fmt: skip
        coeffs = [up.get(f"{stem}_{i}") for i in range(1, 21)]
        mapping[key] = f"{stem}_1..20"
        if all(c is not None for c in coeffs):
            values[key] = [c.split()[0] for c in coeffs]  # type: ignore[union-attr]
    return _build(values, path, mapping)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise RPCError(path, None, f"the RPC file cannot be read ({e.strerror or e}).") from e


def _read_keyword_list(path: Path, sep: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in _read_text(path).splitlines():
        if sep in line:
            key, value = line.split(sep, 1)
            out[key.strip()] = value.strip()
    return out

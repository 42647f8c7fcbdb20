"""Splat file writers (and readers, for round trips): Inria PLY, antimatter15 .splat, PlayCanvas
compressed PLY and Niantic .spz (layouts: Inria ``GaussianModel.save_ply``, the antimatter15
``splat`` viewer, PlayCanvas engine ``gsplat-compressed-data.js``, the ``nianticlabs/spz`` README).

All are plain numpy so they work without gsplat (an optional dependency) and without its
``export_splats`` NaN bug; the tests compare them with gsplat's writer where it covers a format.
Both PLY flavours are written by `skyfall.storage.ply.write_ply_elements`. Writers take ``Splats`` in the frame they should store (see ``skyfall.export.upaxis``); ``.spz``
additionally converts from the PLY convention (RDF) to its own RUB axes, as Niantic's packer does.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np

from skyfall.export.bake import Splats
from skyfall.gaussians.sh import rgb_to_sh0
from skyfall.storage.atomic import atomic_write
from skyfall.storage.ply import raw_ply_property_names, write_ply_elements

Format = Literal["ply", "raw-ply", "splat", "ply-compressed", "spz"]
FORMATS: dict[str, str] = {
    "ply": ".ply",
    "raw-ply": ".ply",
    "splat": ".splat",
    "ply-compressed": ".compressed.ply",
    "spz": ".spz",
}

# ----------------------------------------------------------------------------- helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert two zero bits between the low 10 bits of ``v`` (uint64) for 3D Morton codes."""
    v = v & 0x3FF
    v = (v | (v << 16)) & 0x030000FF
    v = (v | (v << 8)) & 0x0300F00F
    v = (v | (v << 4)) & 0x030C30C3
    v = (v | (v << 2)) & 0x09249249
    return v


def morton_order(means: np.ndarray) -> np.ndarray:
    """Indices sorting points along a 30-bit 3D Morton curve of their bounding box.  [N]"""
    lo, hi = means.min(0), means.max(0)
    t = (means - lo) / np.where(hi > lo, hi - lo, 1.0)
    q = np.clip(t * 1023.0, 0, 1023).astype(np.uint64)
    code = (_spread_bits(q[:, 0]) << 2) | (_spread_bits(q[:, 1]) << 1) | _spread_bits(q[:, 2])
    return np.argsort(code, kind="stable")


def _shareable(path: str | Path) -> Path:
    """Give an exported file the usual ``0666 & ~umask`` permissions.

    ``atomic_write``'s temporary file is private (0600); exported files are meant to be served/shared.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def _write_bytes(path: str | Path, chunks: list[bytes | np.ndarray]) -> Path:
    with atomic_write(path) as f:
        for c in chunks:
            f.write(c if isinstance(c, bytes) else np.ascontiguousarray(c).tobytes())
    return _shareable(path)


def _write_ply(
    path: str | Path, elements: list[tuple[str, np.ndarray, list[str]]], comment: str | None
) -> Path:
    return _shareable(write_ply_elements(path, elements, [comment] if comment else []))


# ----------------------------------------------------------------------------- Inria PLY


def write_ply(path: str | Path, splats: Splats, *, comment: str | None = "skyfall") -> Path:
    """Standard 3DGS PLY (float32, ``nx ny nz`` zeros, channel-major ``f_rest``); ``filter_3D`` appended
    when ``splats.filter_3d`` is set (the raw, round-trip form)."""
    n = len(splats)
    rest = splats.sh[:, 1:, :].transpose(0, 2, 1).reshape(n, -1)  # channel-major [R.., G.., B..]
    cols = [splats.means, np.zeros((n, 3), np.float32), splats.sh[:, 0, :], rest]
    cols += [splats.opacities.reshape(n, 1), splats.scales, splats.quats]
    if splats.filter_3d is not None:
        cols.append(splats.filter_3d.reshape(n, 1))
    table = np.concatenate([np.asarray(c, np.float32).reshape(n, -1) for c in cols], axis=1).astype("<f4")
    names = raw_ply_property_names(rest.shape[1], splats.filter_3d is not None)
    return _write_ply(path, [("vertex", table, names)], comment)


def read_ply(path: str | Path) -> Splats:
    """Read an Inria-layout PLY (ours, gsplat's or the reference's) into ``Splats`` (found by name)."""
    from skyfall.storage.ply import read_ply as read_params

    params, filter_3d = read_params(path)
    sh = np.concatenate([params["sh0"].numpy(), params["shN"].numpy()], axis=1)
    return Splats(
        params["means"].numpy(),
        params["quats"].numpy(),
        params["scales"].numpy(),
        params["opacities"].numpy(),
        sh,
        None if filter_3d is None else filter_3d.numpy(),
    )


# ----------------------------------------------------------------------------- antimatter15 .splat

_SPLAT_DTYPE = np.dtype([("pos", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])


def write_splat(path: str | Path, splats: Splats) -> Path:
    """antimatter15 ``.splat``: 32 B/splat, linear scales, u8 RGBA and quaternion; no SH above band 0.

    Sorted like antimatter15's converter (large, opaque splats first).
    """
    alpha = _sigmoid(splats.opacities)
    order = np.argsort(-np.exp(splats.scales.astype(np.float64).sum(1)) * alpha, kind="stable")
    rec = np.empty(len(splats), _SPLAT_DTYPE)
    rec["pos"] = splats.means[order]
    rec["scale"] = np.exp(splats.scales[order].astype(np.float64))
    rgb = np.clip(np.round(splats.rgb()[order] * 255.0), 0, 255)
    rec["rgba"] = np.concatenate([rgb, np.round(alpha[order] * 255.0)[:, None]], axis=1).astype(np.uint8)
    q = splats.quats[order].astype(np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    rec["rot"] = np.clip(np.round(q * 128.0 + 128.0), 0, 255).astype(np.uint8)
    return _write_bytes(path, [rec])


def read_splat(path: str | Path) -> Splats:
    """Decode a ``.splat`` file (band-0 colour only)."""
    rec = np.fromfile(path, dtype=_SPLAT_DTYPE)
    rgba = rec["rgba"].astype(np.float64) / 255.0
    a = np.clip(rgba[:, 3], 1e-6, 1 - 1e-6)
    q = (rec["rot"].astype(np.float64) - 128.0) / 128.0
    return Splats(
        rec["pos"].copy(),
        (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32),
        np.log(rec["scale"].astype(np.float64)).astype(np.float32),
        np.log(a / (1 - a)).astype(np.float32),
        rgb_to_sh0(rgba[:, None, :3]).astype(np.float32),
    )


# ----------------------------------------------------------------------------- PlayCanvas compressed PLY

_CHUNK = 256
_CHUNK_PROPS = [f"min_{a}" for a in "xyz"] + [f"max_{a}" for a in "xyz"]
_CHUNK_PROPS += [f"min_scale_{a}" for a in "xyz"] + [f"max_scale_{a}" for a in "xyz"]
_CHUNK_PROPS += [f"min_{c}" for c in "rgb"] + [f"max_{c}" for c in "rgb"]
_VERTEX_PROPS = ["packed_position", "packed_rotation", "packed_scale", "packed_color"]
# PlayCanvas accepts an sh element of exactly 9, 24 or 45 f_rest (degrees 1-3).


def _chunk_bounds(x: np.ndarray, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk min and max [M, D] of [N, D] values (last chunk padded with its own last row)."""
    pad = n_chunks * _CHUNK - x.shape[0]
    xp = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
    xp = xp.reshape(n_chunks, _CHUNK, -1)
    return xp.min(1), xp.max(1)


def _unorm(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    rng = hi - lo
    t = np.where(rng > 0, (x - lo) / np.where(rng > 0, rng, 1.0), 0.0)
    return np.round(np.clip(t, 0.0, 1.0) * ((1 << bits) - 1)).astype(np.uint32)


def _pack_111011(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (
        (_unorm(x[:, 0], lo[:, 0], hi[:, 0], 11) << 21)
        | (_unorm(x[:, 1], lo[:, 1], hi[:, 1], 10) << 11)
        | _unorm(x[:, 2], lo[:, 2], hi[:, 2], 11)
    )


def _pack_rotation(q: np.ndarray) -> np.ndarray:
    """Smallest-three quaternion: 2-bit index (wxyz) of the largest |component| + 3 x 10 bits."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    largest = np.argmax(np.abs(q), axis=1)
    q = q * np.where(q[np.arange(len(q)), largest] < 0, -1.0, 1.0)[:, None]
    others = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])[largest]
    rest = np.take_along_axis(q, others, axis=1) * (np.sqrt(2.0) * 0.5) + 0.5
    v = np.round(np.clip(rest, 0.0, 1.0) * 1023.0).astype(np.uint32)
    return (largest.astype(np.uint32) << 30) | (v[:, 0] << 20) | (v[:, 1] << 10) | v[:, 2]


def write_ply_compressed(path: str | Path, splats: Splats, *, comment: str | None = "skyfall") -> Path:
    """PlayCanvas/SuperSplat compressed PLY: Morton-ordered chunks of 256 with 18-float bounds, 4 uint32
    per splat and, for SH degree >= 1, 8-bit ``f_rest`` (``q * 8 / 255 - 4`` on decode)."""
    if splats.sh_degree > 3:
        raise ValueError("compressed PLY stores SH up to degree 3")
    s = splats.subset(morton_order(splats.means))
    n = len(s)
    m = (n + _CHUNK - 1) // _CHUNK
    ci = np.arange(n) // _CHUNK
    rgb = s.rgb()
    scales = np.clip(s.scales, -20.0, 20.0)  # exp(-20) m is invisible; keeps chunk ranges finite
    bounds = [_chunk_bounds(v.astype(np.float64), m) for v in (s.means, scales, rgb)]
    chunk = np.concatenate([b for pair in bounds for b in pair], axis=1).astype("<f4")
    (plo, phi), (slo, shi), (clo, chi) = [(lo.astype(np.float32), hi.astype(np.float32)) for lo, hi in bounds]
    vertex = np.empty((n, 4), "<u4")
    vertex[:, 0] = _pack_111011(s.means, plo[ci], phi[ci])
    vertex[:, 1] = _pack_rotation(s.quats.astype(np.float64))
    vertex[:, 2] = _pack_111011(scales, slo[ci], shi[ci])
    col = [_unorm(rgb[:, c], clo[ci, c], chi[ci, c], 8) for c in range(3)]
    alpha = np.round(np.clip(_sigmoid(s.opacities), 0, 1) * 255.0).astype(np.uint32)
    vertex[:, 3] = (col[0] << 24) | (col[1] << 16) | (col[2] << 8) | alpha
    elements = [("chunk", chunk, _CHUNK_PROPS), ("vertex", vertex, _VERTEX_PROPS)]
    if s.sh_degree >= 1:
        rest = s.sh[:, 1:, :].transpose(0, 2, 1).reshape(n, -1).astype(np.float64)
        sh_q = np.clip(np.round((rest + 4.0) * (255.0 / 8.0)), 0, 255).astype(np.uint8)
        elements.append(("sh", sh_q, [f"f_rest_{i}" for i in range(rest.shape[1])]))
    return _write_ply(path, elements, comment)


def read_ply_compressed(path: str | Path) -> Splats:
    """Decode a compressed PLY with the PlayCanvas engine's formulas (for round-trip checks)."""
    from plyfile import PlyData

    ply = PlyData.read(str(path))
    ch = np.stack([np.asarray(ply["chunk"][p], np.float64) for p in _CHUNK_PROPS], axis=1)
    v = {p: np.asarray(ply["vertex"][p], np.uint32) for p in _VERTEX_PROPS}
    n = len(v["packed_position"])
    ci = np.arange(n) // _CHUNK

    def un(x: np.ndarray, bits: int) -> np.ndarray:
        return (x & ((1 << bits) - 1)).astype(np.float64) / ((1 << bits) - 1)

    def u111011(x: np.ndarray) -> np.ndarray:
        return np.stack([un(x >> 21, 11), un(x >> 11, 10), un(x, 11)], axis=1)

    pos = ch[ci, 0:3] + (ch[ci, 3:6] - ch[ci, 0:3]) * u111011(v["packed_position"])
    scl = ch[ci, 6:9] + (ch[ci, 9:12] - ch[ci, 6:9]) * u111011(v["packed_scale"])
    col = np.stack([un(v["packed_color"] >> s, 8) for s in (24, 16, 8, 0)], axis=1)
    rgb = ch[ci, 12:15] + (ch[ci, 15:18] - ch[ci, 12:15]) * col[:, :3]
    r = v["packed_rotation"]
    abc = np.stack([(un(r >> s, 10) - 0.5) * np.sqrt(2.0) for s in (20, 10, 0)], axis=1)
    largest = (r >> 30).astype(int)
    q = np.zeros((n, 4))
    others = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])[largest]
    np.put_along_axis(q, others, abc, axis=1)
    q[np.arange(n), largest] = np.sqrt(np.clip(1.0 - (abc**2).sum(1), 0.0, None))
    a = np.clip(col[:, 3], 1e-6, 1 - 1e-6)
    sh = [rgb_to_sh0(rgb)]
    if "sh" in ply:
        props = [p.name for p in ply["sh"].properties]
        rest = np.stack([np.asarray(ply["sh"][p], np.float64) for p in props], axis=1) * (8.0 / 255.0) - 4.0
        sh_rest = rest.reshape(n, 3, -1).transpose(0, 2, 1)
    else:
        sh_rest = np.zeros((n, 0, 3))
    return Splats(
        pos.astype(np.float32),
        q.astype(np.float32),
        scl.astype(np.float32),
        np.log(a / (1 - a)).astype(np.float32),
        np.concatenate([sh[0][:, None, :], sh_rest], axis=1).astype(np.float32),
    )


# ----------------------------------------------------------------------------- Niantic .spz (version 2)

SPZ_MAGIC = 0x5053474E  # "NGSP"
SPZ_COLOR_SCALE = 0.15
SPZ_FLAG_ANTIALIASED = 0x1


def _spz_fractional_bits(means: np.ndarray) -> int:
    """Fixed-point bits for 24-bit signed positions: as many as the extent allows, at most 16."""
    max_abs = float(np.abs(means).max()) if len(means) else 1.0
    return int(np.clip(np.floor(np.log2((2**23 - 1) / max(max_abs, 1e-6))), 0, 16))


def write_spz(path: str | Path, splats: Splats, *, antialiased: bool = True) -> Path:
    """Niantic ``.spz`` version 2 (gzip; 24-bit fixed-point positions, 8-bit attributes).

    ``splats`` are in the PLY convention; .spz stores RUB axes, so they are rotated 180° about X first
    (what Niantic's packer does with PLY input). ``antialiased`` sets the header flag for splats trained
    with Mip-Splatting-style 2D antialiasing (ours are).
    """
    from skyfall.export.upaxis import RDF_TO_RUB, rotate_splats

    s = rotate_splats(splats, RDF_TO_RUB)
    n, deg = len(s), s.sh_degree
    if deg > 3:
        raise ValueError(".spz stores SH up to degree 3")
    fb = _spz_fractional_bits(s.means)
    fixed = np.round(s.means.astype(np.float64) * (1 << fb)).astype(np.int64) & 0xFFFFFF
    pos = np.stack([(fixed >> sh) & 0xFF for sh in (0, 8, 16)], axis=-1).astype(np.uint8)  # [N, 3, 3] LE
    alpha = np.round(_sigmoid(s.opacities) * 255.0).astype(np.uint8)
    color = np.clip(np.round(s.sh[:, 0, :] * (SPZ_COLOR_SCALE * 255.0) + 127.5), 0, 255).astype(np.uint8)
    scales = np.clip(np.round((s.scales.astype(np.float64) + 10.0) * 16.0), 0, 255).astype(np.uint8)
    q = s.quats.astype(np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    xyz = q[:, 1:] * np.where(q[:, :1] < 0, -127.5, 127.5) + 127.5  # w >= 0 is implied on decode
    rot = np.clip(np.round(xyz), 0, 255).astype(np.uint8)
    # SH: coefficient-major, channel innermost; 5 bits for band 1, 4 bits above (Niantic's defaults)
    rest = s.sh[:, 1:, :].astype(np.float64)
    qsh = np.round(rest * 128.0) + 128.0
    bucket = np.where(np.arange(rest.shape[1]) < 3, 8, 16)[None, :, None]
    qsh = np.clip((qsh + bucket // 2) // bucket * bucket, 0, 255).astype(np.uint8)
    header = struct.pack("<IIIBBBB", SPZ_MAGIC, 2, n, deg, fb, SPZ_FLAG_ANTIALIASED if antialiased else 0, 0)
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in (pos, alpha, color, scales, rot, qsh))
    # level 1: 1M splats in ~3 s instead of ~7 s at level 6, for a 2 % larger file (measured)
    return _write_bytes(path, [gzip.compress(header + body, compresslevel=1)])


def read_spz(path: str | Path) -> Splats:
    """Decode a version-2 ``.spz`` back into the PLY convention (inverse of ``write_spz``)."""
    from skyfall.export.upaxis import RDF_TO_RUB, rotate_splats

    raw = gzip.decompress(Path(path).read_bytes())
    magic, version, n, deg, fb, _flags, _ = struct.unpack_from("<IIIBBBB", raw, 0)
    if magic != SPZ_MAGIC or version != 2:
        raise ValueError(f"{path}: not a version-2 .spz (magic {magic:#x}, version {version})")
    buf = io.BytesIO(raw[16:])
    k1 = (deg + 1) ** 2 - 1

    def take(count: int) -> np.ndarray:
        return np.frombuffer(buf.read(count), np.uint8)

    p = take(n * 9).reshape(n, 3, 3).astype(np.int64)
    fixed = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    fixed = np.where(fixed & 0x800000, fixed - (1 << 24), fixed)
    a = np.clip(take(n).astype(np.float64) / 255.0, 1e-6, 1 - 1e-6)
    color = (take(n * 3).reshape(n, 3).astype(np.float64) - 127.5) / (SPZ_COLOR_SCALE * 255.0)
    scales = take(n * 3).reshape(n, 3).astype(np.float64) / 16.0 - 10.0
    xyz = take(n * 3).reshape(n, 3).astype(np.float64) / 127.5 - 1.0
    w = np.sqrt(np.clip(1.0 - (xyz**2).sum(1), 0.0, None))
    rest = (take(n * k1 * 3).reshape(n, k1, 3).astype(np.float64) - 128.0) / 128.0
    s = Splats(
        (fixed / float(1 << fb)).astype(np.float32),
        np.concatenate([w[:, None], xyz], axis=1).astype(np.float32),
        scales.astype(np.float32),
        np.log(a / (1 - a)).astype(np.float32),
        np.concatenate([color[:, None, :], rest], axis=1).astype(np.float32),
    )
    return rotate_splats(s, RDF_TO_RUB.T)


# ----------------------------------------------------------------------------- dispatch


def write_splats(path: str | Path, splats: Splats, fmt: str) -> Path:
    """Write ``splats`` as ``fmt`` (one of ``FORMATS``); ``raw-ply`` keeps ``filter_3D``."""
    if fmt in ("ply", "raw-ply"):
        return write_ply(path, splats)
    if fmt == "splat":
        return write_splat(path, splats)
    if fmt == "ply-compressed":
        return write_ply_compressed(path, splats)
    if fmt == "spz":
        return write_spz(path, splats)
    from skyfall.errors import ConfigError

    raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")

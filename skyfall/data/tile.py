"""Tile loader: a satellite tile folder -> cameras, images, masks and the initial point cloud.

A tile folder (the reference's "Satellite" scene layout) holds ``transforms_train.json``
(required), ``transforms_test.json`` (optional; [FIX] the reference reads it unconditionally),
``images/``, optional ``masks/<stem>.npy``, ``points3D.txt`` and, for synthetic tiles,
``synth.json``. Every frame gives OpenCV camera-to-world matrices and pinhole intrinsics in pixels;
see ``skyfall.data.cameras`` for the convention.

**Normalisation** (as the reference's ``scene/dataset_readers.py:readSatelliteInfo``), only when
the train transforms carry ``R`` and ``T``. Such tiles come from SatelliteSfM's COLMAP converter,
which wrote each frame's ``transform_matrix_rotated = [R·Rc | R·c − T]`` for an original camera
``[Rc | c]``, i.e. cameras already moved into the frame ``x' = R·x − T``; the points are still in
the original frame. We then:

1. map the points with ``x' = R·x − T``;
2. ``scale = 256 / (99th percentile of ‖x'‖)``; ``x'' = scale·x'``;
3. ``z_min = 1st percentile of x''_z``; ``x''' = x'' − (0, 0, z_min)``;
4. apply the same similarity to the rotated cameras: centre ``c''' = scale·c' − (0, 0, z_min)``,
   rotation unchanged (a uniform scale and a translation do not rotate anything).

Every step maps points and cameras by one and the same similarity ``y = s·(R·x − T) − z_min·e_z``
(camera rotations ``Rc -> R·Rc``), so a point's pixel projection is unchanged; only camera-space
depths scale by ``s``. If a frame lacks ``transform_matrix_rotated`` but has ``transform_matrix``,
we apply step "rotate + centre" to it ourselves (what the converter does) rather than failing.

Images are read with Pillow as RGB. The validity mask is ``masks/<stem>.npy`` when present, else
pixels that are not exactly black (reference); an RGBA alpha channel additionally masks pixels with
alpha 0 ([FIX] the reference's alpha check never fires). With ``resolution = r > 1`` images
are box-filtered and masks nearest-resized to ``round(W/r) x round(H/r)`` ([FIX] the
reference leaves masks at full size), and intrinsics scale via ``Cameras.scaled``.

**Checks** at load, each a ``TileFormatError`` naming the file and field: every path a transforms
file names stays inside the tile folder; focal lengths are finite and positive, principal points lie
within ``_PP_BAND`` of the image (see there), optional ``w`` / ``h`` are positive whole numbers;
every view keeps at least one valid pixel; the optional ground truth under ``gt/`` follows its
schema (``skyfall.data.ground_truth.check_gt``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from skyfall.data.cameras import Cameras
from skyfall.data.colmap import read_points3d_text
from skyfall.data.ground_truth import check_gt
from skyfall.errors import ConfigError, TileFormatError

TRAIN_FILE = "transforms_train.json"
TEST_FILE = "transforms_test.json"
POINTS_FILE = "points3D.txt"
SYNTH_META_FILE = "synth.json"

NORMALIZED_RADIUS = 256.0  # reference: the 99th-percentile point radius after normalisation
# Rotation blocks must be orthonormal to this tolerance. Real c2w matrices are orthonormal to
# ~1e-12; anything worse than 1e-4 is not a camera pose (and its rigid inverse would be wrong by
# ~1e-4 x 1e6 m at satellite distances).
_RIGID_TOL = 1e-4
_SUPPORTED_CAMERA_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")
# Principal point band: |cx - W/2| <= _PP_BAND * max(fx, W), likewise cy with fy and H. Satellite
# crops put the principal point far outside the image: ``skyfall prepare`` writes offsets of up to
# ~3000 image widths (0.36 fx) in the multi-view prepare tests and 0.20 fx (~1200 widths) on the
# Pléiades Giza sample; synthetic tiles stay under 0.05 fx. The offset over the focal length is the
# tangent of the angle between the optical axis and the image centre's ray; beyond atan(10) = 84 deg
# no satellite (or ordinary) view points that way, so the bound is 28x the largest offset prepare
# produced and still catches unit mix-ups (focal in mm, principal point in pixels) and garbage.
# max(f, W) keeps a 10-image-size band for cameras whose focal length is shorter than the image.
_PP_BAND = 10.0


@dataclass
class Split:
    """One split (train or test) of a tile.

    Attributes:
        names: image stems, in the order of the transforms file.
        image_paths: the image files, same order.
        cameras: float64 cameras (intrinsics already scaled to the loaded resolution).
        images: [N, H, W, 3] uint8 RGB images, possibly downscaled.
        masks: [N, H, W] bool validity masks (True = pixel has data).
    """

    names: list[str]
    image_paths: list[Path]
    cameras: Cameras
    images: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Tile:
    """A loaded tile.

    Attributes:
        root: the tile folder.
        train: the training split (at least one frame).
        test: the test split; 0 frames when ``transforms_test.json`` is absent or empty.
        points: [P, 3] float64 initial points (normalised when the tile carries R/T).
        colors: [P, 3] uint8 point colours.
        normalization: ``{"R": [3][3], "T": [3], "scale": float, "z_min": float}`` when R/T are
            present (see the module docstring), else None.
        meta: the parsed ``synth.json`` of synthetic tiles, else ``{}``.
    """

    root: Path
    train: Split
    test: Split
    points: Tensor
    colors: Tensor
    normalization: dict | None
    meta: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Width in pixels of the (loaded) train images."""
        return self.train.cameras.width

    @property
    def height(self) -> int:
        """Height in pixels of the (loaded) train images."""
        return self.train.cameras.height


@dataclass
class _Frame:
    name: str
    image_path: Path
    c2w: np.ndarray  # [4, 4] float64
    K: np.ndarray  # [3, 3] float64
    source: Path  # the transforms file and the frame's place in it, for error messages
    where: str


def load_tile(path: str | Path, *, resolution: int = 1) -> Tile:
    """Load a tile folder eagerly (images, masks, cameras, points).

    Args:
        path: the tile folder.
        resolution: 1 for native size; a power of two r downscales images, masks and intrinsics by r.

    Returns:
        The loaded ``Tile``.

    Raises:
        ConfigError: ``resolution`` is not a power of two >= 1.
        TileFormatError: any file of the tile is missing or malformed (the message names file and field).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution must be 1 or a power of two (2, 4, 8, ...), got {resolution!r}.")
    if resolution & (resolution - 1):
        raise ConfigError(f"resolution must be 1 or a power of two (2, 4, 8, ...), got {resolution}.")
    root = Path(path)
    if not root.is_dir():
        raise TileFormatError(root, None, "the tile folder does not exist.")

    train_file = root / TRAIN_FILE
    if not train_file.is_file():
        raise TileFormatError(train_file, None, "the required train transforms file does not exist.")
    train_json = _read_json(train_file)
    rt = _read_rt(train_json, train_file)
    train_frames = _parse_frames(train_json, train_file, root, rt, allow_empty=False)
    test_file = root / TEST_FILE
    test_frames: list[_Frame] = []
    if test_file.is_file():
        # The test split lives in the train file's frame: the reference uses the train R/T for both.
        test_frames = _parse_frames(_read_json(test_file), test_file, root, rt, allow_empty=True)
    # Optional ground truth is read lazily by the evaluations; check it now so that a malformed
    # file stops the run before training instead of at the first evaluation.
    check_gt(root)

    xyz, rgb, _ = read_points3d_text(root / POINTS_FILE)
    normalization = None
    if rt is not None:
        xyz, normalization = _normalize(xyz, rt[0], rt[1], root / POINTS_FILE)
        for f in train_frames + test_frames:
            f.c2w[:3, 3] *= normalization["scale"]
            f.c2w[2, 3] -= normalization["z_min"]

    meta: dict = {}
    meta_file = root / SYNTH_META_FILE
    if meta_file.is_file():
        meta = _read_json(meta_file)

    train, native = _load_split(train_frames, root, None, resolution)
    test = (
        _load_split(test_frames, root, native, resolution)[0] if test_frames else _empty_split(train.cameras)
    )
    return Tile(
        root=root,
        train=train,
        test=test,
        points=torch.from_numpy(xyz),
        colors=torch.from_numpy(rgb),
        normalization=normalization,
        meta=meta,
    )


# ----------------------------------------------------------------------------------------------
# transforms JSON


def _read_json(file: Path) -> Any:
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError) as e:
        raise TileFormatError(file, None, f"the file cannot be read ({e}).") from e
    except json.JSONDecodeError as e:
        raise TileFormatError(file, f"line {e.lineno}", f"the file is not valid JSON ({e.msg}).") from e
    if not isinstance(data, dict):
        raise TileFormatError(file, None, "the top level of the file must be a JSON object.")
    return data


def _number(value: Any, file: Path, name: str) -> float:
    # bool is an int subclass in Python; true/false are not numbers in a camera file.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TileFormatError(file, name, f"expected a number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise TileFormatError(file, name, f"the value {value!r} is not finite.")
    return float(value)


def _array(value: Any, file: Path, name: str, shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """A finite float64 array of one of the accepted ``shapes`` from a JSON value."""
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TileFormatError(file, name, "expected a numeric array (nested lists of numbers).") from None
    if arr.shape not in shapes:
        want = " or ".join("x".join(map(str, s)) for s in shapes)
        raise TileFormatError(file, name, f"expected shape {want}, got {'x'.join(map(str, arr.shape))}.")
    if not np.isfinite(arr).all():
        raise TileFormatError(file, name, "the array contains non-finite values.")
    return arr


def _check_rotation(rot: np.ndarray, file: Path, name: str, what: str) -> np.ndarray:
    """Check that ``rot`` [3, 3] is orthonormal (det ±1) and return its nearest orthonormal matrix."""
    det = float(np.linalg.det(rot))
    err = float(np.abs(rot.T @ rot - np.eye(3)).max())
    if abs(abs(det) - 1.0) > _RIGID_TOL or err > _RIGID_TOL:
        raise TileFormatError(
            file,
            name,
            f"{what} is not a rotation (det {det:.6g}, max |RᵀR − I| {err:.3g}), so this is not a rigid transform.",
        )
    # Snap to exactly orthonormal (polar decomposition) so that rigid inverses downstream are exact.
    u, _, vt = np.linalg.svd(rot)
    return u @ vt


def _read_rt(data: dict, file: Path) -> tuple[np.ndarray, np.ndarray] | None:
    has_r, has_t = "R" in data, "T" in data
    if not has_r and not has_t:
        return None
    if not has_r or not has_t:
        missing = "R" if not has_r else "T"
        raise TileFormatError(file, missing, "R and T must be given together, but only one is present.")
    r = _array(data["R"], file, "R", ((4, 4), (3, 3)))[:3, :3]
    r = _check_rotation(r, file, "R", "the normalisation rotation R")
    t = _array(data["T"], file, "T", ((3,),))
    return r, t


def _parse_frames(
    data: dict, file: Path, root: Path, rt: tuple[np.ndarray, np.ndarray] | None, allow_empty: bool
) -> list[_Frame]:
    model = data.get("camera_model", "PINHOLE")
    if model not in _SUPPORTED_CAMERA_MODELS:
        raise TileFormatError(
            file, "camera_model", f"only {' / '.join(_SUPPORTED_CAMERA_MODELS)} is supported, got {model!r}."
        )
    if "frames" not in data:
        raise TileFormatError(file, "frames", "the list of frames is missing.")
    frames = data["frames"]
    if not isinstance(frames, list):
        raise TileFormatError(file, "frames", f"expected a list of frames, got {type(frames).__name__}.")
    if not frames and not allow_empty:
        raise TileFormatError(file, "frames", "the list of frames is empty; at least one frame is needed.")
    _check_size_fields(data, file, "")
    _check_path_fields(data, file, "")
    return [_parse_frame(fr, file, f"frames[{i}]", root, rt) for i, fr in enumerate(frames)]


def _parse_frame(
    frame: Any, file: Path, where: str, root: Path, rt: tuple[np.ndarray, np.ndarray] | None
) -> _Frame:
    if not isinstance(frame, dict):
        raise TileFormatError(file, where, f"expected a JSON object, got {type(frame).__name__}.")
    for key in ("file_path", "fl_x", "fl_y", "cx", "cy"):
        if key not in frame:
            raise TileFormatError(file, f"{where}.{key}", "the required field is missing.")
    fx, fy, cx, cy = (_number(frame[k], file, f"{where}.{k}") for k in ("fl_x", "fl_y", "cx", "cy"))
    for key, value in (("fl_x", fx), ("fl_y", fy)):
        if value <= 0:
            raise TileFormatError(
                file, f"{where}.{key}", f"the focal length must be positive, got {value:g}."
            )
    _check_size_fields(frame, file, f"{where}.")

    # With R/T the camera lives in the rotated frame; derive it from the raw pose when only that exists.
    key = (
        "transform_matrix_rotated"
        if rt is not None and "transform_matrix_rotated" in frame
        else "transform_matrix"
    )
    if key not in frame:
        raise TileFormatError(file, f"{where}.{key}", "the required camera-to-world matrix is missing.")
    c2w = _array(frame[key], file, f"{where}.{key}", ((4, 4),))
    if np.abs(c2w[3] - (0.0, 0.0, 0.0, 1.0)).max() > _RIGID_TOL:
        raise TileFormatError(file, f"{where}.{key}", "the bottom row must be 0 0 0 1 for a rigid transform.")
    c2w[3] = (0.0, 0.0, 0.0, 1.0)
    c2w[:3, :3] = _check_rotation(c2w[:3, :3], file, f"{where}.{key}", "the 3x3 rotation block")
    if rt is not None and key == "transform_matrix":
        r, t = rt
        c2w[:3, :3] = r @ c2w[:3, :3]
        c2w[:3, 3] = r @ c2w[:3, 3] - t

    rel = frame["file_path"]
    if not isinstance(rel, str) or not rel:
        raise TileFormatError(file, f"{where}.file_path", "expected a non-empty string path.")
    _check_path_fields(frame, file, f"{where}.")
    image_path = root / rel
    if not image_path.is_file() and image_path.with_name(image_path.name + ".png").is_file():
        image_path = image_path.with_name(image_path.name + ".png")  # some converters omit the extension
    if not image_path.is_file():
        raise TileFormatError(file, f"{where}.file_path", f"the image {image_path} does not exist.")
    k = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    return _Frame(name=image_path.stem, image_path=image_path, c2w=c2w, K=k, source=file, where=where)


def _check_size_fields(data: dict, file: Path, prefix: str) -> None:
    """Optional ``w`` / ``h`` must be positive whole pixel counts (the loader takes sizes from the images)."""
    for key in ("w", "h"):
        if key not in data:
            continue
        value = data[key]
        # Whole floats (512.0) are accepted: some converters write every number as a float.
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if not (ok and math.isfinite(value) and value > 0 and float(value).is_integer()):
            raise TileFormatError(
                file, f"{prefix}{key}", f"expected a positive whole number of pixels, got {value!r}."
            )


def _check_path_fields(data: dict, file: Path, prefix: str) -> None:
    """Every string path the document names (``file_path``, ``mask_path``, ``depth_file_path``, ...)
    must stay inside the tile folder: a tile is one self-contained folder, and a crafted
    ``../../x`` must not make the loader read outside it. Judged lexically (``..`` resolved,
    symlinks not followed)."""
    for key, value in data.items():
        if not (isinstance(key, str) and key.endswith("_path") and isinstance(value, str)):
            continue
        norm = os.path.normpath(value)
        if os.path.isabs(value) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise TileFormatError(
                file, f"{prefix}{key}", f"must be a path inside the tile folder, got {value!r}."
            )


def _check_principal_point(f: _Frame, size: tuple[int, int]) -> None:
    """The principal point must lie within the band ``_PP_BAND`` of the image centre (see there)."""
    k = f.K
    for key, c, focal, extent in (("cx", k[0, 2], k[0, 0], size[0]), ("cy", k[1, 2], k[1, 1], size[1])):
        off = abs(c - extent / 2)
        if off > _PP_BAND * max(focal, extent):
            raise TileFormatError(
                f.source,
                f"{f.where}.{key}",
                f"the principal point {c:g} px is {off:g} px from the image centre, more than "
                f"{_PP_BAND:g} x max(focal length {focal:g} px, image size {extent} px), "
                "so this is not a plausible camera.",
            )


def _normalize(xyz: np.ndarray, r: np.ndarray, t: np.ndarray, points_file: Path) -> tuple[np.ndarray, dict]:
    """Reference normalisation of the points (module docstring, steps 1-3). xyz: [P, 3]."""
    xyz = xyz @ r.T - t
    radius = float(np.percentile(np.linalg.norm(xyz, axis=1), 99))
    if not radius > 0:
        raise TileFormatError(
            points_file, None, "the points all lie at T, so the R/T normalisation has no scale to fit."
        )
    scale = NORMALIZED_RADIUS / radius
    xyz = xyz * scale
    z_min = float(np.percentile(xyz[:, 2], 1))
    xyz[:, 2] -= z_min
    return xyz, {"R": r.tolist(), "T": t.tolist(), "scale": scale, "z_min": z_min}


# ----------------------------------------------------------------------------------------------
# images and masks


def _read_image(path: Path) -> tuple[Image.Image, np.ndarray | None]:
    """Decode an image. Returns the RGB image and the [H, W] bool alpha > 0 mask (None without alpha)."""
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise TileFormatError(path, None, f"the image cannot be decoded ({e}).") from e
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise TileFormatError(path, "mode", f"{im.mode} images are not supported; save 8-bit RGB or RGBA.")
    alpha = None
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(im.getchannel("A")) > 0
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im, alpha


def _read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TileFormatError(path, None, f"the mask cannot be read as a .npy array ({e}).") from e
    if mask.ndim != 2:
        raise TileFormatError(path, "shape", f"the mask must be 2-D (H x W), got shape {mask.shape}.")
    if mask.shape != (size[1], size[0]):
        raise TileFormatError(
            path,
            "shape",
            f"the mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is {size[0]}x{size[1]}.",
        )
    return mask != 0


def _load_split(
    frames: list[_Frame], root: Path, size: tuple[int, int] | None, resolution: int
) -> tuple[Split, tuple[int, int]]:
    """Read the images and masks of ``frames``; all must share ``size`` (W, H), or the first one's.

    Returns:
        The split and the native (W, H) of its images.
    """
    images: np.ndarray | None = None
    masks: np.ndarray | None = None
    out_size = (0, 0)
    for i, f in enumerate(frames):
        im, alpha = _read_image(f.image_path)
        if size is None:
            size = im.size
        if im.size != size:
            raise TileFormatError(
                f.image_path,
                "size",
                f"the image is {im.size[0]}x{im.size[1]} but the tile's images are {size[0]}x{size[1]}.",
            )
        _check_principal_point(f, size)
        mask_file = root / "masks" / f"{f.name}.npy"
        rgb = np.asarray(im)
        if mask_file.is_file():
            mask = _read_mask(mask_file, size)
        else:
            mask = rgb.any(axis=-1)  # reference: a pixel is valid unless exactly black
        if alpha is not None:
            mask &= alpha
        # A view without a valid pixel can neither be trained on nor scored (its PSNR is undefined).
        mask_source = mask_file if mask_file.is_file() else f.image_path
        if not mask.any():
            if mask_file.is_file():
                why = "the mask has no valid pixel" + ("" if alpha is None else " where the image is opaque")
            else:
                why = "the image has no valid pixel (every pixel is exactly black or fully transparent)"
            raise TileFormatError(
                mask_source, None, f"{why}, so the view can neither be trained on nor scored."
            )
        if images is None:
            out_size = (round(size[0] / resolution), round(size[1] / resolution))
            if min(out_size) < 1:
                raise ConfigError(
                    f"resolution {resolution} is too coarse for {size[0]}x{size[1]} images (nothing would be left)."
                )
            images = np.empty((len(frames), out_size[1], out_size[0], 3), dtype=np.uint8)
            masks = np.empty((len(frames), out_size[1], out_size[0]), dtype=bool)
        if resolution == 1:
            images[i] = rgb
            masks[i] = mask
        else:
            # reducing_gap=1 makes Pillow use its exact integer-factor reduce(); a plain BOX
            # resize rounds up (+0.5 grey levels on average).
            images[i] = np.asarray(im.resize(out_size, Image.Resampling.BOX, reducing_gap=1.0))
            small = Image.fromarray(mask.astype(np.uint8) * 255).resize(out_size, Image.Resampling.NEAREST)
            masks[i] = np.asarray(small) > 127
            if not masks[i].any():
                raise ConfigError(
                    f"resolution {resolution} leaves no valid pixel in the mask of {mask_source} "
                    f"({int(mask.sum())} valid at full size); load it at a finer resolution."
                )
    assert size is not None and images is not None and masks is not None
    cameras = Cameras(
        torch.from_numpy(np.stack([f.c2w for f in frames])),
        torch.from_numpy(np.stack([f.K for f in frames])),
        size[0],
        size[1],
    )
    if resolution != 1:
        cameras = cameras.scaled(1.0 / resolution)
        assert (cameras.width, cameras.height) == out_size
    split = Split(
        names=[f.name for f in frames],
        image_paths=[f.image_path for f in frames],
        cameras=cameras,
        images=torch.from_numpy(images),
        masks=torch.from_numpy(masks),
    )
    return split, size


def _empty_split(like: Cameras) -> Split:
    h, w = like.height, like.width
    return Split(
        names=[],
        image_paths=[],
        cameras=Cameras(
            torch.zeros(0, 4, 4, dtype=torch.float64), torch.zeros(0, 3, 3, dtype=torch.float64), w, h
        ),
        images=torch.zeros(0, h, w, 3, dtype=torch.uint8),
        masks=torch.zeros(0, h, w, dtype=torch.bool),
    )


def transforms_document(cameras: Cameras, names: list[str]) -> dict:
    """The ``transforms_*.json`` document for ``cameras`` (the inverse of what ``load_tile`` reads).

    Frames point at ``./images/<name>.png``; ``transform_matrix`` is the OpenCV camera-to-world matrix
    at full float64 precision (JSON floats round-trip exactly).
    """
    assert len(names) == len(cameras), (len(names), len(cameras))
    frames = []
    for i, name in enumerate(names):
        k = cameras.Ks[i]
        frames.append(
            {
                "file_path": f"./images/{name}.png",
                "fl_x": float(k[0, 0]),
                "fl_y": float(k[1, 1]),
                "cx": float(k[0, 2]),
                "cy": float(k[1, 2]),
                "w": cameras.width,
                "h": cameras.height,
                "transform_matrix": cameras.camtoworlds[i].tolist(),
            }
        )
    return {"camera_model": "PINHOLE", "w": cameras.width, "h": cameras.height, "frames": frames}

"""Bad tile input stops at load with one line naming the file and field (issue #16 item 9).

Paths that leave the tile folder, implausible intrinsics, malformed optional ground truth and views
without a valid pixel are all ``TileFormatError``s raised by ``load_tile``, before anything is
trained or written. Every test works on a copy of the session's synthetic ``tiny`` tile.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from skyfall.data.ground_truth import check_gt
from skyfall.data.tile import Split, load_tile
from skyfall.errors import ConfigError, TileFormatError
from skyfall.eval.dsm import load_gt_dsm
from skyfall.eval.heldout import heldout_psnr
from skyfall.eval.image_metrics import psnr

TRAIN = "transforms_train.json"
TEST = "transforms_test.json"
ORBIT = Path("gt") / "views" / "orbit_e45_r250"


@pytest.fixture
def tile(tiny_tile: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny synthetic tile (6 views at 64^2, masks, gt/)."""
    root = tmp_path / "tile"
    shutil.copytree(tiny_tile, root)
    return root


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


def _set_frame(file: str, index: int, **fields: object) -> Callable[[Path], None]:
    return lambda root: _edit_json(root / file, lambda d: d["frames"][index].update(fields))


def _raises(root: Path, file: Path, field: str | None, *, resolution: int = 1) -> TileFormatError:
    """Load ``root``; the error must name ``file`` and ``field`` on one line."""
    with pytest.raises(TileFormatError) as info:
        load_tile(root, resolution=resolution)
    err = info.value
    assert err.file == file, str(err)
    assert err.field == field, str(err)
    text = str(err)
    assert "\n" not in text
    assert text.startswith(f"{file}" + (f" [{field}]" if field else "") + ": ")
    return err


def test_the_valid_tiny_tile_still_loads(tile: Path) -> None:
    t = load_tile(tile)
    assert len(t.train) == 5 and len(t.test) == 1
    check_gt(tile)  # no error on the synthetic tile's ground truth


# ---------------------------------------------------------------------------------------------- 1. paths


@pytest.mark.parametrize(
    ("file", "index", "key", "value"),
    [
        (TRAIN, 1, "file_path", "../x.png"),
        (TRAIN, 3, "file_path", "images/../../tile/images/sat_03.png"),  # leaves, then re-enters
        (TRAIN, 0, "file_path", "/etc/passwd"),
        (TRAIN, 2, "file_path", ".."),
        (TEST, 0, "file_path", "../../images/sat_05.png"),
        (TRAIN, 4, "mask_path", "../masks/sat_04.npy"),  # any path a frame names, read or not
        (TRAIN, 0, "depth_file_path", "/tmp/depth.npy"),
    ],
)
def test_frame_path_outside_the_tile_is_rejected(
    tile: Path, file: str, index: int, key: str, value: str
) -> None:
    _set_frame(file, index, **{key: value})(tile)
    err = _raises(tile, tile / file, f"frames[{index}].{key}")
    assert err.message == f"must be a path inside the tile folder, got {value!r}."


def test_top_level_path_outside_the_tile_is_rejected(tile: Path) -> None:
    _edit_json(tile / TRAIN, lambda d: d.update(ply_file_path="../points.ply"))
    err = _raises(tile, tile / TRAIN, "ply_file_path")
    assert "must be a path inside the tile folder, got '../points.ply'" in err.message


def test_dotdot_that_stays_inside_the_tile_loads(tile: Path) -> None:
    _set_frame(TRAIN, 1, file_path="./masks/../images/sat_01.png", mask_path="masks/sat_01.npy")(tile)
    t = load_tile(tile)
    assert t.train.image_paths[1].name == "sat_01.png"


def test_missing_image_names_the_frame_field(tile: Path) -> None:
    (tile / "images" / "sat_02.png").unlink()
    err = _raises(tile, tile / TRAIN, "frames[2].file_path")
    assert "sat_02.png" in err.message and "does not exist" in err.message


def test_unreadable_image_names_the_image(tile: Path) -> None:
    (tile / "images" / "sat_05.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    err = _raises(tile, tile / "images" / "sat_05.png", None)
    assert "cannot be decoded" in err.message


# ------------------------------------------------------------------------------------- 2. intrinsics


def _frame(root: Path, file: str, index: int) -> dict:
    return json.loads((root / file).read_text())["frames"][index]


@pytest.mark.parametrize(
    ("index", "fields", "field"),
    [
        (1, {"cx": 1e12}, "frames[1].cx"),
        (3, {"cy": -1e12}, "frames[3].cy"),
        # Focal length in millimetres next to a principal point in pixels: a unit mix-up.
        (0, {"fl_x": 35.0, "fl_y": 35.0, "cx": 3000.0, "cy": 32.0}, "frames[0].cx"),
    ],
)
def test_implausible_principal_point_is_rejected(tile: Path, index: int, fields: dict, field: str) -> None:
    _set_frame(TRAIN, index, **fields)(tile)
    err = _raises(tile, tile / TRAIN, field)
    assert "principal point" in err.message and "not a plausible camera" in err.message


def test_principal_point_bound_is_ten_focal_lengths_from_the_centre(tile: Path) -> None:
    fr = _frame(tile, TEST, 0)
    inside = 32.0 + 10.0 * fr["fl_x"] * 0.999  # 64 px views: the centre is at 32
    _set_frame(TEST, 0, cx=inside)(tile)
    load_tile(tile)  # satellite crops legitimately have principal points far outside the image
    _set_frame(TEST, 0, cx=32.0 + 10.0 * fr["fl_x"] * 1.001)(tile)
    _raises(tile, tile / TEST, "frames[0].cx")


def test_principal_point_band_for_short_focal_lengths_is_ten_image_sizes(tile: Path) -> None:
    _set_frame(TRAIN, 2, fl_x=20.0, fl_y=20.0, cx=32.0 + 639.0, cy=32.0 - 639.0)(tile)
    load_tile(tile)
    _set_frame(TRAIN, 2, cy=32.0 - 641.0)(tile)
    _raises(tile, tile / TRAIN, "frames[2].cy")


@pytest.mark.parametrize(
    ("value", "field"),
    [(float("inf"), "frames[1].fl_x"), (0.0, "frames[1].fl_x"), (-3.0, "frames[1].fl_x")],
)
def test_focal_length_must_be_finite_and_positive(tile: Path, value: float, field: str) -> None:
    _set_frame(TRAIN, 1, fl_x=value)(tile)
    _raises(tile, tile / TRAIN, field)


@pytest.mark.parametrize("value", [0, -64, 63.5, "64", True, None])
def test_frame_size_fields_must_be_positive_whole_numbers(tile: Path, value: object) -> None:
    _set_frame(TRAIN, 4, w=value)(tile)
    err = _raises(tile, tile / TRAIN, "frames[4].w")
    assert "positive whole number" in err.message


def test_top_level_size_fields_are_checked_and_whole_floats_accepted(tile: Path) -> None:
    _edit_json(tile / TEST, lambda d: d.update(w=64.0, h=64.0))
    load_tile(tile)
    _edit_json(tile / TEST, lambda d: d.update(h=-1))
    _raises(tile, tile / TEST, "h")


def test_camera_matrix_must_be_finite(tile: Path) -> None:
    fr = _frame(tile, TRAIN, 2)
    fr["transform_matrix"][0][3] = float("nan")
    _set_frame(TRAIN, 2, transform_matrix=fr["transform_matrix"])(tile)
    _raises(tile, tile / TRAIN, "frames[2].transform_matrix")


# ---------------------------------------------------------------------------------- 3. ground truth


def _dsm_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda root: _edit_json(root / "gt" / "dsm.json", edit)


def _other_schema(d: dict) -> None:
    # An independently made tile describing the same grid with other key names.
    d.clear()
    d.update({"origin": [-128.0, 128.0], "gsd": 0.5, "shape": [512, 512]})


GT_CASES: list[tuple[str, Callable[[Path], None], str, str | None]] = [
    ("resolution missing", _dsm_json(lambda d: d.pop("resolution")), "gt/dsm.json", "resolution"),
    ("other key names", _dsm_json(_other_schema), "gt/dsm.json", "x_min"),
    ("resolution zero", _dsm_json(lambda d: d.update(resolution=0)), "gt/dsm.json", "resolution"),
    ("resolution negative", _dsm_json(lambda d: d.update(resolution=-0.5)), "gt/dsm.json", "resolution"),
    ("x_min nan", _dsm_json(lambda d: d.update(x_min=float("nan"))), "gt/dsm.json", "x_min"),
    ("y_max string", _dsm_json(lambda d: d.update(y_max="128")), "gt/dsm.json", "y_max"),
    ("width fractional", _dsm_json(lambda d: d.update(width=511.5)), "gt/dsm.json", "width"),
    ("height zero", _dsm_json(lambda d: d.update(height=0)), "gt/dsm.json", "height"),
    ("not json", lambda r: (r / "gt" / "dsm.json").write_text("{"), "gt/dsm.json", "line 1"),
    ("not an object", lambda r: (r / "gt" / "dsm.json").write_text("[1]"), "gt/dsm.json", None),
    (
        "shape mismatch",
        lambda r: np.save(r / "gt" / "dsm.npy", np.zeros((512, 500), np.float32)),
        "gt/dsm.npy",
        "shape",
    ),
    ("npy without json", lambda r: (r / "gt" / "dsm.json").unlink(), "gt/dsm.npy", None),
    ("npy unreadable", lambda r: (r / "gt" / "dsm.npy").write_bytes(b"nope"), "gt/dsm.npy", None),
    (
        "camera path missing field",
        lambda r: _edit_json(r / ORBIT / "camera_path.json", lambda d: d.pop("render_width")),
        str(ORBIT / "camera_path.json"),
        "render_width",
    ),
    (
        "camera path wrong type",
        lambda r: _edit_json(r / ORBIT / "camera_path.json", lambda d: d.update(render_width="wide")),
        str(ORBIT / "camera_path.json"),
        None,
    ),
    (
        "view image missing",
        lambda r: (r / ORBIT / "images" / "00001.png").unlink(),
        str(ORBIT / "images"),
        None,
    ),
    (
        "view image wrong size",
        lambda r: Image.new("RGB", (16, 32)).save(r / ORBIT / "images" / "00000.png"),
        str(ORBIT / "images" / "00000.png"),
        "size",
    ),
    (
        "view depth wrong shape",
        lambda r: np.save(r / ORBIT / "depth" / "00001.npy", np.zeros((32, 31), np.float32)),
        str(ORBIT / "depth" / "00001.npy"),
        "shape",
    ),
]


@pytest.mark.parametrize("case", GT_CASES, ids=[c[0] for c in GT_CASES])
def test_malformed_ground_truth_fails_at_load(tile: Path, case: tuple) -> None:
    _, mutate, rel, field = case
    mutate(tile)
    _raises(tile, tile / rel, field)


def test_missing_ground_truth_field_is_named_in_the_message(tile: Path) -> None:
    _dsm_json(lambda d: d.pop("resolution"))(tile)
    err = _raises(tile, tile / "gt" / "dsm.json", "resolution")
    assert err.message.startswith("the required field is missing")
    # The lazy reader agrees with the load-time check.
    with pytest.raises(TileFormatError) as info:
        load_gt_dsm(tile)
    assert info.value.field == "resolution"


def test_gt_dsm_json_alone_is_valid(tile: Path) -> None:
    (tile / "gt" / "dsm.npy").unlink()  # dsm.json alone gives the tile's extent
    load_tile(tile)
    assert load_gt_dsm(tile) is None


def test_load_gt_dsm_returns_the_stored_array_and_json(tile: Path) -> None:
    dsm, georef = load_gt_dsm(tile)
    np.testing.assert_array_equal(dsm, np.load(tile / "gt" / "dsm.npy"))
    assert georef == json.loads((tile / "gt" / "dsm.json").read_text())


# ------------------------------------------------------------------------------- 4. empty masks


def _names(root: Path, file: str) -> list[str]:
    return [Path(f["file_path"]).stem for f in json.loads((root / file).read_text())["frames"]]


@pytest.mark.parametrize("split", [TRAIN, TEST])
def test_all_zero_mask_is_rejected(tile: Path, split: str) -> None:
    name = _names(tile, split)[-1]
    mask = tile / "masks" / f"{name}.npy"
    np.save(mask, np.zeros((64, 64), np.uint8))
    err = _raises(tile, mask, None)
    assert "mask has no valid pixel" in err.message


def test_all_black_image_without_mask_is_rejected(tile: Path) -> None:
    (tile / "masks" / "sat_01.npy").unlink()
    image = tile / "images" / "sat_01.png"
    Image.new("RGB", (64, 64)).save(image)
    err = _raises(tile, image, None)
    assert "no valid pixel" in err.message


def test_mask_emptied_by_downscaling_is_a_config_error(tile: Path) -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[0, 0] = 1  # nearest downscaling by 2 samples the odd pixels only
    np.save(tile / "masks" / "sat_02.npy", mask)
    load_tile(tile)
    with pytest.raises(ConfigError, match=r"resolution 2 leaves no valid pixel in the mask of .*sat_02\.npy"):
        load_tile(tile, resolution=2)


def test_psnr_over_an_empty_mask_is_nan() -> None:
    pred, gt = torch.full((4, 4, 3), 0.5), torch.zeros(4, 4, 3)
    assert math.isnan(psnr(pred, gt, torch.zeros(4, 4, dtype=torch.bool)))
    full = psnr(pred, gt, torch.ones(4, 4, dtype=torch.bool))
    assert full == pytest.approx(-10 * math.log10(0.25 + 1e-8)) and full == psnr(pred, gt)


class _FlatScene:
    """A scene stand-in that renders a flat grey; with an embedding, its mean is the grey level."""

    def __init__(self) -> None:
        self.model = SimpleNamespace(device=torch.device("cpu"), zero_grad=lambda: None)
        self.appearance = SimpleNamespace(zero_grad=lambda set_to_none=True: None)

    def render(self, cam, emb, absgrad=False):  # noqa: ANN001, ANN201
        level = torch.tensor(0.5) if emb is None else torch.sigmoid(emb.mean())
        return SimpleNamespace(colors=(level * torch.ones(1, cam.height, cam.width, 3)))


def test_heldout_psnr_skips_views_without_scored_pixels(tiny_tile: Path) -> None:
    cams = load_tile(tiny_tile).train.cameras[[0, 1]]
    h, w = cams.height, cams.width
    images = torch.full((2, h, w, 3), 100, dtype=torch.uint8)
    masks = torch.ones(2, h, w, dtype=torch.bool)
    masks[0, :, w // 2 :] = False  # view 0 has valid pixels in the left (fitted) half only
    test = Split(["a", "b"], [Path("a"), Path("b")], cams, images, masks)
    res = heldout_psnr(_FlatScene(), test, embedding=torch.zeros(4), fit_steps=2)
    views = res["psnr_test_views"]
    assert views[0] is None and isinstance(views[1], float) and math.isfinite(views[1])
    assert res["psnr_test"] == views[1]  # the mean leaves the unscorable view out
    novel = res["psnr_test_novel_embedding"]
    assert math.isfinite(novel) and novel < 80.0
    # Only unscorable views: no PSNR at all rather than a capped 80 dB.
    test.masks[1, :, w // 2 :] = False
    res = heldout_psnr(_FlatScene(), test, embedding=torch.zeros(4), fit_steps=2)
    assert res["psnr_test"] is None and res["psnr_test_views"] == [None, None]


# ------------------------------------------------------------------------------------------- CLI


def _bad_path(root: Path) -> None:
    _set_frame(TRAIN, 1, file_path="../x.png")(root)


def _bad_gt(root: Path) -> None:
    _dsm_json(lambda d: d.pop("resolution"))(root)


def _bad_mask(root: Path) -> None:
    np.save(root / "masks" / "sat_05.npy", np.zeros((64, 64), np.uint8))


CLI_CASES = [
    ("path outside", _bad_path, TRAIN, "[frames[1].file_path]"),
    ("gt without resolution", _bad_gt, "gt/dsm.json", "[resolution]"),
    ("empty test mask", _bad_mask, "masks/sat_05.npy", "mask has no valid pixel"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_train_cli_on_a_bad_tile_exits_2_with_one_line_and_writes_nothing(
    tile: Path, tmp_path: Path, case: tuple
) -> None:
    _, mutate, rel, needle = case
    mutate(tile)
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "skyfall",
            "train",
            "stage1",
            "--preset",
            "tiny",
            "--data",
            str(tile),
            "--out",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("skyfall: error: ")
    assert str(tile / rel) in lines[0] and needle in lines[0]
    assert not run.exists() or not any(run.iterdir())

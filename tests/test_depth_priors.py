"""Depth backends: Depth Anything (tiny random model saved and loaded like real weights) and MoGe
(its wrapper exercised against a stand-in ``moge`` package; the real one is not on PyPI)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from skyfall.errors import ConfigError, MissingDependencyError
from skyfall.priors.depth import DepthEstimator, DepthPrediction, make_depth_estimator
from skyfall.priors.hub import WeightsNotFoundError


@pytest.fixture(scope="module")
def tiny_da_dir(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from skyfall.priors.tiny import tiny_depth_anything

    d = tmp_path_factory.mktemp("da") / "tiny-da-metric"
    tiny_depth_anything(seed=0, depth_estimation_type="metric", max_depth=80).save_pretrained(d)
    return d


def test_depth_anything_loads_from_local_dir_and_predicts(tiny_da_dir):
    from skyfall.priors.depth_backends import IMAGENET_MEAN, IMAGENET_STD, dpt_resize_shape
    from skyfall.priors.tiny import tiny_depth_anything

    est = make_depth_estimator("depth-anything", model=str(tiny_da_dir), local_files_only=True, device="cpu")
    assert isinstance(est, DepthEstimator) and not est.needs_pose
    images = torch.rand(2, 3, 60, 84, generator=torch.Generator().manual_seed(0))
    pred = est(images, 60.0)
    assert isinstance(pred, DepthPrediction)
    assert (
        pred.depth.shape == (2, 60, 84) and pred.valid.shape == (2, 60, 84) and pred.valid.dtype == torch.bool
    )
    assert (
        bool(pred.valid.all()) and float(pred.depth.min()) > 0 and float(pred.depth.max()) < 80
    )  # sigmoid*80
    # the same numbers as the model called by hand on the documented preprocessing
    net = tiny_depth_anything(seed=0, depth_estimation_type="metric", max_depth=80)
    h, w = dpt_resize_shape(60, 84, 518)
    x = torch.nn.functional.interpolate(images, size=(h, w), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = net(pixel_values=x).predicted_depth
    ref = torch.nn.functional.interpolate(raw[:, None], size=(60, 84), mode="bilinear")[:, 0]
    assert torch.allclose(pred.depth, ref, atol=1e-5)


@pytest.mark.parametrize("hw", [(1024, 1024), (60, 84), (480, 640), (100, 140), (700, 300)])
def test_resize_rule_matches_the_dpt_processor(hw):
    pytest.importorskip("transformers")
    np = pytest.importorskip("numpy")
    from transformers.models.dpt.image_processing_pil_dpt import get_resize_output_image_size

    from skyfall.priors.depth_backends import dpt_resize_shape

    size = get_resize_output_image_size(np.zeros((3, *hw)), (518, 518), keep_aspect_ratio=True, multiple=14)
    expected = (size.height, size.width) if hasattr(size, "height") else tuple(size)
    assert dpt_resize_shape(*hw, 518) == expected


def test_depth_anything_refuses_relative_heads(tmp_path):
    pytest.importorskip("transformers")
    from skyfall.priors.tiny import tiny_depth_anything

    tiny_depth_anything(depth_estimation_type="relative").save_pretrained(tmp_path / "rel")
    with pytest.raises(ConfigError, match="disparity"):
        make_depth_estimator(
            "depth-anything", model=str(tmp_path / "rel"), local_files_only=True, device="cpu"
        )


def test_depth_anything_missing_weights(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(WeightsNotFoundError) as e:
        make_depth_estimator(
            "depth-anything", local_files_only=True, cache_dir=str(tmp_path / "hf"), device="cpu"
        )
    msg = str(e.value)
    assert "depth-anything/Depth-Anything-V2-Metric-Outdoor-Large-hf" in msg and str(tmp_path / "hf") in msg


def test_moge_missing_package_names_the_install_command(monkeypatch):
    for mod in [m for m in sys.modules if m == "moge" or m.startswith("moge.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "moge", None)  # import moge -> ImportError even if installed
    with pytest.raises(MissingDependencyError) as e:
        make_depth_estimator("moge", device="cpu")
    assert 'pip install "git+https://github.com/microsoft/MoGe.git"' in str(e.value)


class _FakeMoGe(torch.nn.Module):
    """Stand-in for moge.model.v{1,2}.MoGeModel: depth = 1 + 10 * red channel, masked where blue > 0.8."""

    loaded_from: list[str] = []

    @classmethod
    def from_pretrained(cls, path: str) -> _FakeMoGe:
        cls.loaded_from.append(path)
        return cls()

    def infer(self, image, fov_x=None, resolution_level=9, force_projection=True, apply_mask=True):  # noqa: ANN001, ANN201
        assert image.ndim == 4 and fov_x == 45.0 and resolution_level == 9
        depth = 1.0 + 10.0 * image[:, 0]
        mask = image[:, 2] <= 0.8
        return {"depth": torch.where(mask, depth, torch.full_like(depth, float("inf"))), "mask": mask}


@pytest.mark.parametrize("version", [1, 2])
def test_moge_wrapper_loads_local_checkpoint_and_masks(monkeypatch, tmp_path, version: int):
    for name in ("moge", "moge.model", f"moge.model.v{version}"):
        mod = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules[f"moge.model.v{version}"].MoGeModel = _FakeMoGe
    ckpt = tmp_path / "moge"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(b"stand-in")
    _FakeMoGe.loaded_from.clear()
    est = make_depth_estimator(
        "moge", model=str(ckpt), moge_version=version, local_files_only=True, device="cpu"
    )
    assert _FakeMoGe.loaded_from == [str(ckpt / "model.pt")]
    images = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    pred = est(images, 45.0)
    expected_valid = images[:, 2] <= 0.8
    assert torch.equal(pred.valid, expected_valid) and 0 < int(expected_valid.sum()) < expected_valid.numel()
    assert torch.allclose(pred.depth[pred.valid], (1 + 10 * images[:, 0])[pred.valid])
    assert bool((pred.depth[~pred.valid] == 0).all()) and bool(torch.isfinite(pred.depth).all())
    # a local folder without model.pt, or a Hub id absent from an empty cache: one error each
    with pytest.raises(WeightsNotFoundError, match="model.pt"):
        make_depth_estimator("moge", model=str(tmp_path), moge_version=version, device="cpu")
    with pytest.raises(WeightsNotFoundError, match="Ruicheng/moge"):
        make_depth_estimator(
            "moge", moge_version=version, local_files_only=True, cache_dir=str(tmp_path / "hf"), device="cpu"
        )


def test_unknown_estimator_and_ground_truth_needs_tile():
    with pytest.raises(ConfigError, match="unknown depth estimator"):
        make_depth_estimator("midas")
    with pytest.raises(ConfigError, match="synthetic tile"):
        make_depth_estimator("ground-truth")


def test_the_stage1_config_chooses_and_configures_the_depth_model(tiny_da_dir, tiny_tile, tmp_path):
    """`--stage1.pseudo.estimator` picks the registered backend, `--stage1.pseudo.model.*` its weights."""
    import dataclasses

    from skyfall.config import DepthModelConfig, load_config
    from skyfall.priors.depth_backends import DepthAnythingDepth
    from skyfall.train.loop import Trainer

    cfg = load_config("tiny").stage1
    model = DepthModelConfig(model=str(tiny_da_dir), local_files_only=True, device="cpu", dtype="float32")
    cfg = dataclasses.replace(
        cfg, pseudo=dataclasses.replace(cfg.pseudo, estimator="depth-anything", model=model)
    )
    est = Trainer(cfg, tiny_tile, tmp_path / "run", progress=False).depth_estimator()
    assert isinstance(est, DepthAnythingDepth) and est.device == torch.device("cpu")
    assert est.dtype == torch.float32 and est.model.config.max_depth == 80  # the tiny weights were loaded


def test_registered_names_are_the_config_choices():
    import typing

    from skyfall.config.training import EstimatorName, RefinerName
    from skyfall.registry import DEPTH_ESTIMATORS, REFINERS

    assert typing.get_args(EstimatorName) == DEPTH_ESTIMATORS.names
    assert set(DEPTH_ESTIMATORS.names) == {"moge", "depth-anything", "ground-truth", "tiny"}
    assert typing.get_args(RefinerName) == REFINERS.names
    assert set(REFINERS.names) == {"flowedit", "sdedit", "top2ground", "difix", "identity", "ideal"}
    for registry in (DEPTH_ESTIMATORS, REFINERS):
        for name in registry.names:
            assert callable(registry.factory(name)), name  # every entry points at an importable factory
    with pytest.raises(ConfigError, match="unknown refiner 'midjourney'; choose from flowedit"):
        REFINERS.factory("midjourney")

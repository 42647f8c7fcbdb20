"""Shared pytest setup: one CPU thread, offline Hugging Face, and the gpu/slow/weights/browser markers.

Two OpenMP threads on a loaded 2-core machine run many times slower than one, so tests pin torch to
one thread before anything else imports it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-weights", action="store_true", help="run tests that need real model weights")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow test: pass --runslow"))
        if "weights" in item.keywords and not config.getoption("--run-weights"):
            item.add_marker(pytest.mark.skip(reason="needs real model weights: pass --run-weights"))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_tile(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic `tiny` tile (6 views at 64^2, written once per test session)."""
    from skyfall.synth import write_synthetic_tile

    return write_synthetic_tile(tmp_path_factory.mktemp("tiny") / "tile", preset="tiny", seed=0)


@pytest.fixture
def tiny_clip():
    """Builder of a randomly initialised CLIP vision tower (32^2 input) for offline embedder tests."""
    transformers = pytest.importorskip("transformers")

    def build(num_hidden_layers: int, projection_dim: int):
        torch.manual_seed(0)
        cfg = transformers.CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
            num_hidden_layers=num_hidden_layers, num_attention_heads=4, projection_dim=projection_dim,
        )  # fmt: skip
        return transformers.CLIPVisionModelWithProjection(cfg).eval()

    return build


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` preset (both stages), resolved from configs/tiny.yaml."""
    from skyfall.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_run(tiny_tile, tiny_config, tmp_path_factory: pytest.TempPathFactory):
    """A finished `tiny` Stage 1 run on ``tiny_tile``, trained once per session.

    Read-only: a test that continues or changes the run works on a copy (``shutil.copytree``).
    """
    from skyfall.train.stage1 import train_stage1

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    train_stage1(tiny_config.stage1, tiny_tile, run, progress=False)
    return run


def rerender_frame(city, tile, index: int):  # noqa: ANN001, ANN201
    """Render training frame ``index`` of a synthetic ``tile`` again with ``city``: (rendered, stored)
    uint8 images, which must be equal when the city is rebuilt exactly."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from skyfall.data.cameras import Cameras

    meta = json.loads((tile / "synth.json").read_text())
    fr = json.loads((tile / "transforms_train.json").read_text())["frames"][index]
    k = torch.tensor([[fr["fl_x"], 0, fr["cx"]], [0, fr["fl_y"], fr["cy"]], [0, 0, 1]], dtype=torch.float64)
    cam = Cameras(torch.tensor(fr["transform_matrix"], dtype=torch.float64), k, fr["w"], fr["h"])
    name = Path(fr["file_path"]).stem
    r = city.render(cam, date=meta["image_dates"][name], supersample=meta["preset_params"]["sat_supersample"])
    rgb = (r["rgb"][0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    return rgb, np.asarray(Image.open(tile / "images" / f"{name}.png"))


@contextlib.contextmanager
def nan_colours_at(step: int) -> Iterator[None]:
    """Inside it, the trainer's step ``step`` starts by turning every colour into NaN (its loss is
    then non-finite)."""
    from skyfall.train.loop import Trainer

    original = Trainer.train_step

    def poisoned(self: Trainer, it: int, phase):  # noqa: ANN001, ANN202
        if it == step:
            with torch.no_grad():
                self.model.params["sh0"][:] = float("nan")
        return original(self, it, phase)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", poisoned)
        yield


# FlowEdit's prompts in the refiner tests (the reference's wording).
FLUX_SOURCE_PROMPT = "Satellite image, blurry and warped."
FLUX_TARGET_PROMPT = "Clear satellite image, sharp buildings."


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random FLUX.1 pipeline saved like the Hub's (built once per session; tests only read it)."""
    from skyfall.priors.tiny import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")

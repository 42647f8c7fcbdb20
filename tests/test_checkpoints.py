"""Atomic checkpoints: weights_only round trip, exact resume, crash safety, latest lookup, RNG state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch

from skyfall.gaussians.densify import accumulate_stats, densify_and_prune
from skyfall.gaussians.model import GaussianModel
from skyfall.storage.checkpoints import (
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _model(n: int = 32) -> GaussianModel:
    g = torch.Generator().manual_seed(3)
    params = {
        "means": torch.randn(n, 3, generator=g) * 5,
        "scales": torch.randn(n, 3, generator=g) * 0.2,
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, 3, 3, generator=g),
        "app_features": torch.randn(n, 24, generator=g),
    }
    return GaussianModel(params, scene_extent=10.0, filter_3d=torch.rand(n, generator=g) * 0.1)


def _train(m: GaussianModel, first: int, steps: int) -> None:
    """Noisy quadratic steps: the noise comes from the global torch RNG, so resuming needs its state."""
    for step in range(first, first + steps):
        m.update_position_lr(step)
        m.update_sh_degree(step)
        m.zero_grad()
        loss = sum(((v - torch.randn_like(v) * 0.1) ** 2).sum() for v in m.params.values())
        loss.backward()
        m.optimizer_step()
        n = m.num_gaussians
        accumulate_stats(
            m, torch.randn(n, 2), torch.rand(n, 2), torch.full((n,), 4.0), torch.rand(n) > 0.3, 64, 48
        )


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path: Path):
    torch.manual_seed(0)
    a = _model()
    _train(a, 0, 3)
    densify_and_prune(a, grad_threshold=0.5, scene_extent=10.0)  # N changes before the checkpoint
    _train(a, 3, 2)
    path = save_checkpoint(
        checkpoint_path(tmp_path, 5), {"step": 5, "model": a.state_dict(), "rng": capture_rng_state()}
    )
    _train(a, 5, 4)

    raw = torch.load(path, weights_only=True)  # no pickled code inside
    assert raw["step"] == 5
    ckpt = load_checkpoint(path)
    b = GaussianModel.from_state_dict(ckpt["model"])
    restore_rng_state(ckpt["rng"])
    assert b.num_gaussians == ckpt["model"]["params"]["means"].shape[0] != 32
    _train(b, 5, 4)
    assert b.num_gaussians == a.num_gaussians
    for k in a.params.keys():
        assert torch.equal(a.params[k], b.params[k]), k
        sa, sb = a.optimizers[k].state[a.params[k]], b.optimizers[k].state[b.params[k]]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["step"], sb["step"])
    assert torch.equal(a.grad_accum, b.grad_accum) and torch.equal(a.filter_3d, b.filter_3d)
    assert a.optimizers["means"].param_groups[0]["lr"] == b.optimizers["means"].param_groups[0]["lr"]


def test_crash_during_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    good = {"step": 1, "x": torch.arange(10.0)}
    first = save_checkpoint(checkpoint_path(tmp_path, 1), good)

    def crashing_save(obj: object, f: IO[bytes]) -> None:
        f.write(b"partial bytes of a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(first, {"step": 1, "x": torch.zeros(3)})  # overwrite attempt
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(checkpoint_path(tmp_path, 2), {"step": 2})  # new checkpoint attempt
    monkeypatch.undo()

    # no temp leftovers; the checksum is the first checkpoint's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001.pt", "ckpt_000001.pt.sha256"]
    assert latest_checkpoint(tmp_path) == first
    assert torch.equal(load_checkpoint(first, verify=False)["x"], good["x"])


def test_refuses_pickled_objects(tmp_path: Path):
    with pytest.raises(TypeError, match="Linear"):
        save_checkpoint(tmp_path / "ckpt_000001.pt", {"mlp": torch.nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint(tmp_path / "ckpt_000001.pt", {"a": {"b": [np.zeros(2)]}})
    assert list(tmp_path.iterdir()) == []
    # module state dicts are fine
    save_checkpoint(
        tmp_path / "ckpt_000001.pt", {"mlp": torch.nn.Linear(2, 2).state_dict(), "cfg": {"a": None}}
    )


def test_latest_checkpoint_by_step_number(tmp_path: Path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ("ckpt_000500.pt", "ckpt_1000.pt", "ckpt_000999.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    for name in ("ckpt_005000.pt.tmp", ".ckpt_009000.pt.abc.tmp", "ckpt_7000.pth", "xckpt_8000.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_1000.pt"
    assert checkpoint_path(tmp_path, 42).name == "ckpt_000042.pt"


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path):
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    random.gauss(0.0, 1.0)
    save_checkpoint(tmp_path / "ckpt_000001.pt", {"rng": capture_rng_state()})
    expected = (
        torch.rand(5),
        np.random.standard_normal(5),
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
    )
    torch.rand(100)
    np.random.rand(100)
    random.random()
    restore_rng_state(load_checkpoint(tmp_path / "ckpt_000001.pt", verify=False)["rng"])
    got = (
        torch.rand(5),
        np.random.standard_normal(5),
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
    )
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]

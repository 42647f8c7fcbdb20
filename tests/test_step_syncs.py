"""Host synchronisations of the training step, counted on the CPU (`skyfall.train.syncs`).

A plain Stage 1 step (no log, densification, filter refresh, pseudo depth or checkpoint) reads
nothing from the device, so on a GPU the host queues step after step; a log step reads a few values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import nan_colours_at

from skyfall.config.training import MultiViewConfig
from skyfall.train.loop import NonFiniteLossError, Trainer
from skyfall.train.stage1 import stage1_phase, train_stage1
from skyfall.train.syncs import SyncCounter, host_reads

LOG_SYNCS_MAX = 4
"""Queued loss checks, the logged statistics, the divergence guard's extent (and one to spare)."""


def _trainer(tile: Path, run: Path, cfg) -> Trainer:  # noqa: ANN001
    tr = Trainer(cfg, tile, run, progress=False)
    tr.run_dir.create()
    tr.init_from_points()
    return tr


def _count_steps(trainer: Trainer, end: int) -> SyncCounter:
    """Train to step ``end`` under a stand-in counter whose events carry the step."""
    counter = SyncCounter(stand_in=True)
    original = trainer.train_step

    def labelled(it, phase):  # noqa: ANN001, ANN202
        counter.label = it
        return original(it, phase)

    trainer.train_step = labelled
    phase = stage1_phase(trainer)
    phase.end = end
    with counter:
        trainer.train(phase, first=0, desc="", checkpoint_every=10**9, save_at_end=False)
    return counter


def test_the_counter_sees_what_would_synchronise_a_gpu():
    x = torch.linspace(-1, 1, 8)
    with SyncCounter(stand_in=True) as c:
        y = x * 2 + 1  # queued work: nothing to wait for
        y[torch.tensor([0, 3])] = 0.0  # integer indices: no size to read
        assert c.count() == 0
        y.sum().item()
        bool(y.max() > 0)
        float(y[0])
        y[y > 0]
        y[y > 0] = 1.0
        torch.nonzero(y)
        y.tolist()
        y.to("cpu")
        y.new_tensor([1.0, 2.0])
        with host_reads():
            torch.randperm(4).tolist()
    assert [e.kind for e in c.events] == ["scalar read"] * 3 + ["boolean mask"] * 2 + [
        "data-dependent shape",
        "host copy",
        "host copy",
        "from python",
    ]
    assert all(e.where.startswith("tests/test_step_syncs.py:") for e in c.events)
    # on a CPU without standing in for a GPU nothing is a device read
    with SyncCounter(stand_in=False) as c:
        x.sum().item()
        x[x > 0]
    assert c.count() == 0


def test_optimizer_step_counters_are_host_reads():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    with SyncCounter(stand_in=True) as c:
        opt.step()
    assert c.count() == 0 and sum(c.exempted.values()) > 0


@pytest.mark.parametrize(
    "changes",
    [
        {},
        # random crops (host draws), the flatten term, the opacity ramp
        {"crop": 40, "lambda_flatten": 0.01, "lambda_opacity_end": 0.5},
        # the multi-view term and the height-field start of sparse real tiles
        {"init_grid": 8.0, "multiview": MultiViewConfig(weight=0.5, start=0, sources=2)},
    ],
    ids=["tiny", "crop-flatten-ramp", "multiview-grid"],
)
def test_a_plain_step_makes_no_host_sync(tiny_tile: Path, tmp_path: Path, tiny_config, changes):
    # tiny: pseudo depth and densification fall on multiples of 5 (densification from step 15), the
    # statistics accumulate on every step up to 40; logs every 3 steps give log-only steps
    cfg = dataclasses.replace(tiny_config.stage1, log_every=3, **changes)
    trainer = _trainer(tiny_tile, tmp_path / "run", cfg)
    end = 24
    counter = _count_steps(trainer, end)
    per_step = counter.by_label()
    plain = [it for it in range(2, end) if it % 5 and it % 3]
    log_only = [it for it in range(2, end) if it % 5 and not it % 3]
    assert plain == [2, 4, 7, 8, 11, 13, 14, 16, 17, 19, 22, 23]
    for it in plain:
        assert per_step.get(it, 0) == 0, f"step {it}:\n{counter.summary(it)}"
    for it in log_only:
        assert 0 < per_step.get(it, 0) <= LOG_SYNCS_MAX, f"step {it}:\n{counter.summary(it)}"


def test_a_non_finite_loss_on_a_plain_step_is_named_and_never_saved(
    tiny_tile: Path, tmp_path: Path, tiny_config
):
    """Plain steps queue their loss checks; the next step that reads the device anyway (here step 35:
    pseudo depth and densification) checks them in order, before its own backward."""
    with nan_colours_at(32):
        with pytest.raises(NonFiniteLossError, match="non-finite loss at step 32"):
            train_stage1(tiny_config.stage1, tiny_tile, tmp_path / "run", progress=False)
    ckpts = sorted((tmp_path / "run" / "ckpts").glob("ckpt_*.pt"))
    assert ckpts[-1].name == "ckpt_000030.pt"


def test_a_checkpoint_is_never_saved_with_an_unchecked_non_finite_loss(
    tiny_tile: Path, tmp_path: Path, tiny_config
):
    trainer = _trainer(tiny_tile, tmp_path / "run", tiny_config.stage1)
    phase = stage1_phase(trainer)
    trainer.strategy_state = phase.strategy.initialize_state()
    for it in (1, 2):
        trainer.train_step(it, phase)
        trainer.step = it
    with torch.no_grad():
        trainer.model.params["opacities"][:] = float("nan")
    trainer.train_step(3, phase)  # a plain step: its loss is queued, not read
    trainer.step = 3
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.save()
    assert not list((tmp_path / "run" / "ckpts").glob("ckpt_*.pt"))

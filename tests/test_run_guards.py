"""A run folder belongs to one run: ownership, lock, resume consistency, damaged checkpoints,
divergence, disk errors, signals, stale temporary files, Stage 2 on an unfinished Stage 1.

Each CLI test asserts the exit code, the one-line message, and that nothing already computed was
lost or altered (checksums of every file of the run folder).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skyfall.storage.checkpoints import (
    CheckpointError,
    checksum_path,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from skyfall.storage.run_lock import RunInUseError, run_lock

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str | Path, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skyfall", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _error_line(res: subprocess.CompletedProcess) -> str:
    """The one stderr line of a failed command (asserts there is exactly one and no traceback)."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("skyfall: warning",))]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("skyfall:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def _checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but its lock file."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished tiny Stage 1 run (60 steps, checkpoints 50 and 60)."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def _train(tile: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["train", "stage1", "--data", tile, "--out", out, "--preset", "tiny", "--no-export", *extra]


# ------------------------------------------------------------------------------ 1. one run per folder


def test_a_fresh_run_refuses_a_folder_holding_a_run(tiny_tile: Path, run_copy: Path):
    before = _checksums(run_copy)
    res = _cli(*_train(tiny_tile, run_copy, "--stage1.seed", "1"))
    assert res.returncode == 2
    line = _error_line(res)
    assert str(run_copy) in line and "not empty" in line and "--resume" in line and "--overwrite" in line
    assert _checksums(run_copy) == before

    other = run_copy.parent / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    res = _cli(*_train(tiny_tile, other, "--overwrite"))
    assert res.returncode == 2 and "clears only skyfall run folders" in _error_line(res)
    assert (other / "thesis.tex").read_text() == "mine"


def test_overwrite_clears_the_old_run_first(tiny_tile: Path, run_copy: Path):
    (run_copy / "ply").mkdir(exist_ok=True)
    (run_copy / "ply" / "old.ply").write_bytes(b"old model")
    res = _cli(*_train(tiny_tile, run_copy, "--overwrite", "--stage1.steps", "10", "--stage1.seed", "1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (run_copy / "ckpts").glob("ckpt_*.pt")) == ["ckpt_000010.pt"]
    assert not (run_copy / "ply" / "old.ply").exists()
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["stage1"]["steps"] == 10
    assert load_checkpoint(run_copy / "ckpts" / "ckpt_000010.pt")["config"]["seed"] == 1


# ------------------------------------------------------------------------------ 2. the lock


def test_a_second_process_cannot_train_in_a_locked_run(tiny_tile: Path, run_copy: Path):
    before = _checksums(run_copy)
    with run_lock(run_copy):
        res = _cli(*_train(tiny_tile, run_copy, "--resume", "--stage1.steps", "80"))
        with run_lock(run_copy):  # re-entrant within the holder
            pass
    assert res.returncode == 2
    line = _error_line(res)
    assert "in use by another skyfall process" in line and f"PID {os.getpid()}" in line
    assert _checksums(run_copy) == before
    with run_lock(run_copy):  # released
        pass


def test_the_lock_is_exclusive_between_processes(tmp_path: Path):
    code = "import sys,time; from skyfall.storage.run_lock import run_lock\nwith run_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(30)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=f"PID {holder.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # a killed holder leaves no stale lock
        pass


# ------------------------------------------------------------------------------ 4. resume consistency


@pytest.mark.parametrize(
    ("option", "names"),
    [
        (("--stage1.seed", "1"), "--stage1.seed"),
        (("--stage1.sh-degree", "2"), "--stage1.sh-degree"),
        (("--stage1.appearance.no-enabled",), "--stage1.appearance.enabled"),
        (("--data", "OTHER"), "--data"),
    ],
)
def test_resume_refuses_another_tile_seed_or_model(tiny_tile: Path, run_copy: Path, option, names):
    other = run_copy.parent / "other_tile"
    shutil.copytree(tiny_tile, other)
    option = tuple(str(other) if o == "OTHER" else o for o in option)
    before = _checksums(run_copy)
    args = _train(tiny_tile, run_copy, "--resume", "--stage1.steps", "80", *option)
    if "--data" in option:  # the last --data wins
        args = [*args[:-2], "--data", str(other)]
    res = _cli(*args)
    assert res.returncode == 2
    line = _error_line(res)
    assert line.startswith("skyfall: error: --resume:") and names in line
    assert _checksums(run_copy) == before


def test_resume_takes_the_runs_own_settings_and_does_not_redo_a_finished_run(tiny_tile: Path, run_copy: Path):
    before = _checksums(run_copy)
    # no --preset: the defaults come from RUN/config.yml (the run used --preset tiny)
    res = _cli("train", "stage1", "--data", tiny_tile, "--out", run_copy, "--resume", "--no-export")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"settings from {run_copy / 'config.yml'}" in res.stdout
    assert "already trained to step 60; nothing to do" in res.stdout
    assert _checksums(run_copy) == before  # nothing evaluated or written again


def test_resume_may_change_logging_and_length(tiny_tile: Path, run_copy: Path):
    res = _cli(*_train(tiny_tile, run_copy, "--resume", "--stage1.steps", "70", "--stage1.log-every", "2"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run_copy / "summary.json").read_text())["stage1"]["steps"] == 70


# ------------------------------------------------------------------------------ 6. damaged checkpoints


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty", "planted"])
def test_export_falls_back_to_the_newest_checkpoint_that_loads(run_copy: Path, damage: str):
    ckpts = run_copy / "ckpts"
    newest = ckpts / "ckpt_000060.pt"
    if damage == "flipped byte":
        _flip_byte(newest, newest.stat().st_size // 2)
    elif damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:1000])
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        newest = ckpts / "ckpt_999999.pt"
        torch.save({"not": "a checkpoint"}, newest)
    res = _cli("export", run_copy, "--out", run_copy / "x.ply")
    assert res.returncode == 0, res.stderr[-2000:]
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("skyfall: warning")]
    fallback = "ckpt_000060.pt" if damage == "planted" else "ckpt_000050.pt"
    assert len(warnings) == 1 and newest.name in warnings[0] and f"using {fallback}" in warnings[0]
    assert newest.exists()  # a reading command sets nothing aside


def test_no_loadable_checkpoint_is_one_line(run_copy: Path):
    for p in (run_copy / "ckpts").glob("ckpt_*.pt"):
        p.write_bytes(p.read_bytes()[:100])
    res = _cli("export", run_copy)
    assert res.returncode == 2 and "no checkpoint loads" in _error_line(res)


def test_resume_sets_a_damaged_checkpoint_aside_and_trains_it_again(tiny_tile: Path, run_copy: Path):
    ckpts = run_copy / "ckpts"
    original = load_checkpoint(ckpts / "ckpt_000060.pt")
    _flip_byte(ckpts / "ckpt_000060.pt", 5000)
    (run_copy / "summary.json").unlink()  # the run is no longer finished as far as it can show
    res = _cli(*_train(tiny_tile, run_copy, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ckpt_000060.pt: damaged" in res.stderr and "using ckpt_000050.pt" in res.stderr
    assert (ckpts / "ckpt_000060.pt.damaged").exists()
    again = load_checkpoint(ckpts / "ckpt_000060.pt")
    for key, value in original["model"]["params"].items():  # the exact resume redid steps 51..60
        assert torch.equal(value, again["model"]["params"][key]), key


def test_checksum_detects_a_flipped_byte_the_loader_would_accept(tmp_path: Path):
    x = torch.arange(4000.0)
    path = save_checkpoint(tmp_path / "ckpt_000001.pt", {"step": 1, "model": {"x": x}})
    assert checksum_path(path).read_text().split()[1] == path.name  # sha256sum -c format
    _flip_byte(path, path.stat().st_size // 2)  # inside the tensor's bytes: still a valid file
    assert not torch.equal(load_checkpoint(path, verify=False)["model"]["x"], x)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint loads"):
        load_latest_checkpoint(tmp_path)


# ------------------------------------------------------------------------------ 7. divergence


def test_divergence_stops_before_the_diverged_state_is_saved(tiny_tile: Path, tmp_path: Path):
    run = tmp_path / "run"
    res = _cli(*_train(tiny_tile, run, "--stage1.optim.means-lr-init", "1e6", "--stage1.steps", "40"))
    assert res.returncode == 2
    line = _error_line(res)
    assert "training diverged at step" in line and "was not saved" in line
    assert "summary.json" not in os.listdir(run)
    from skyfall.train.loop import DivergenceGuard

    pts = torch.tensor([[0.0, 0.0, 0.0]])
    guard = DivergenceGuard(pts[0], 128.0)
    for p in sorted((run / "ckpts").glob("ckpt_*.pt")):  # whatever was kept is not diverged
        assert guard.extent(load_checkpoint(p)["model"]["params"]["means"]) is None, p


def test_divergence_guard_ignores_spikes_and_catches_explosions():
    from skyfall.train.loop import DivergenceGuard

    g = DivergenceGuard(torch.zeros(3), 100.0)
    for _ in range(100):
        assert g.loss(0.1) is None
    # the transparent scene after an opacity reset: many times the median for a hundred steps, but
    # within what in-range colours can score
    assert all(g.loss(1.2) is None for _ in range(150))
    for _ in range(19):  # a burst shorter than the patience
        assert g.loss(50.0) is None
    assert g.loss(0.1) is None
    assert all(g.loss(50.0) is None for _ in range(19))
    assert "photometric loss" in g.loss(50.0)
    assert g.extent(torch.randn(50, 3) * 50) is None
    assert "from the scene centre" in g.extent(torch.randn(50, 3) * 1e5)


# ------------------------------------------------------------------------------ 8. file system errors


def test_an_unwritable_run_folder_is_one_line(tiny_tile: Path, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli(*_train(tiny_tile, blocker / "run"))
    assert res.returncode == 2
    line = _error_line(res)
    assert str(blocker) in line and "Not a directory" in line


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    tiny_tile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    import skyfall.storage.checkpoints as ck
    from skyfall.cli import entrypoint

    real_write = ck._HashingWriter.write
    calls = {"n": 0}

    class FullDisk:
        def write(self, data: bytes) -> int:
            calls["n"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, data: bytes) -> int:  # the disk fills up while step 20's checkpoint is written
        if self.name.name == "ckpt_000020.pt":
            self.f = FullDisk()
        return real_write(self, data)

    monkeypatch.setattr(ck._HashingWriter, "write", write)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        entrypoint([str(a) for a in _train(tiny_tile, run, "--stage1.steps", "30")])
    assert exit_info.value.code == 2 and calls["n"] >= 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("skyfall:")]
    assert len(err) == 1 and "No space left on device" in err[0] and "ckpt_000020.pt" in err[0]
    assert sorted(p.name for p in (run / "ckpts").iterdir()) == ["ckpt_000010.pt", "ckpt_000010.pt.sha256"]
    load_checkpoint(run / "ckpts" / "ckpt_000010.pt")


# ------------------------------------------------------------------------------ 9. Stage 2 inputs


def test_stage2_refuses_an_unfinished_stage1(run_copy: Path):
    for p in (run_copy / "ckpts").glob("ckpt_000060.pt*"):
        p.unlink()
    before = _checksums(run_copy)
    res = _cli("train", "stage2", "--run", run_copy, "--preset", "tiny")
    assert res.returncode == 2
    line = _error_line(res)
    assert "Stage 1 stopped at step 50 of 60" in line and "--allow-unfinished-stage1" in line
    assert _checksums(run_copy) == {k: v for k, v in before.items()}


# ------------------------------------------------------------------------------ 10. signals, temp files


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_saves_a_checkpoint_and_exits_128_plus_its_number(
    tiny_tile: Path, tmp_path: Path, sig, code
):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "skyfall", *map(str, _train(tiny_tile, run, "--stage1.steps", "400"))]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (run / "ckpts" / "ckpt_000010.pt").exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    stopped = [ln for ln in err.splitlines() if ln.startswith("skyfall: stopped by")]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0] and "Traceback" not in err
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert 10 <= step < 400 and (run / "ckpts" / f"ckpt_{step:06d}.pt").exists()
    assert load_checkpoint(run / "ckpts" / f"ckpt_{step:06d}.pt")["step"] == step


def test_sigterm_then_resume_matches_the_uninterrupted_run_and_clears_stale_temp(
    tiny_tile: Path, tiny_run: Path, tmp_path: Path
):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "skyfall", *map(str, _train(tiny_tile, run))]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (run / "ckpts" / "ckpt_000020.pt").exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stale = [run / ".summary.json.abc.tmp", run / "ckpts" / ".ckpt_000030.pt.xyz.tmp"]
    for p in stale:
        p.write_bytes(b"left by a kill")
    res = _cli(*_train(tiny_tile, run, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert not any(p.exists() for p in stale)
    a = load_checkpoint(tiny_run / "ckpts" / "ckpt_000060.pt")
    b = load_checkpoint(run / "ckpts" / "ckpt_000060.pt")
    for key, value in a["model"]["params"].items():
        assert torch.equal(value, b["model"]["params"][key]), key


def test_resume_after_a_crash_before_the_first_checkpoint_starts_again(tiny_tile: Path, run_copy: Path):
    shutil.rmtree(run_copy / "ckpts")
    (run_copy / "summary.json").unlink()
    res = _cli(*_train(tiny_tile, run_copy, "--resume", "--stage1.steps", "10"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no checkpoint yet; starting from step 0" in res.stdout
    rows = [json.loads(ln) for ln in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 10  # the crashed run's lines were dropped


def test_files_follow_the_users_umask(tiny_run: Path):
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("config.yml", "summary.json", "ckpts/ckpt_000060.pt"):
        assert (tiny_run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


# ------------------------------------------------------------------------------ first use


def test_a_run_folder_works_from_anywhere_and_after_moving_with_its_tile(
    tiny_tile: Path, tmp_path: Path, tiny_config
):
    import dataclasses

    from skyfall.storage.run_dir import RunDir
    from skyfall.train.stage1 import train_stage1
    from skyfall.train.stage2 import IterativeDatasetUpdate

    home = tmp_path / "project"
    shutil.copytree(tiny_tile, home / "tile")
    cwd = os.getcwd()
    os.chdir(home)
    try:  # trained with relative paths, as a user types them
        train_stage1(
            dataclasses.replace(tiny_config.stage1, steps=5), Path("tile"), Path("run"), progress=False
        )
    finally:
        os.chdir(cwd)
    assert RunDir(home / "run").tile_dir() == (home / "tile").resolve()
    moved = tmp_path / "elsewhere"
    shutil.move(home, moved)
    assert RunDir(moved / "run").tile_dir() == moved / "run" / ".." / "tile"
    idu = IterativeDatasetUpdate(tiny_config.stage2, moved / "run", progress=False)
    assert idu.trainer.tile.root.resolve() == (moved / "tile").resolve()


@pytest.mark.parametrize("fmt", ["ply", "splat", "raw-ply", "dsm"])
def test_exporting_a_non_finite_model_is_one_line_and_writes_nothing(run_copy: Path, fmt: str):
    path = run_copy / "ckpts" / "ckpt_000060.pt"
    st = load_checkpoint(path)
    for value in st["model"]["params"].values():
        value.fill_(float("nan"))
    save_checkpoint(path, st)
    before = _checksums(run_copy)
    res = _cli("export", run_copy, "--format", fmt)
    assert res.returncode == 2
    line = _error_line(res)
    assert "ckpt_000060.pt" in line and "nothing was written" in line
    assert _checksums(run_copy) == before


def test_train_all_writes_both_stages_plys(tiny_tile: Path, tmp_path: Path):
    run = tmp_path / "run"
    res = _cli(
        "train", "all", "--data", tiny_tile, "--out", run, "--preset", "tiny",
        "--stage1.steps", "20", "--stage2.max-episodes", "1", "--stage2.episode-steps", "10",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("stage1", "stage2"):
        assert (run / "ply" / f"{stage}_raw.ply").stat().st_size > 1000
        assert f"[{stage}] raw PLY: {run / 'ply' / f'{stage}_raw.ply'}" in res.stdout
    assert "psnr_test: held-out satellite views, appearance fitted on the left half" in res.stdout


def test_stage1_evaluation_shows_progress(tiny_tile: Path, tmp_path: Path, tiny_config, capsys):
    import dataclasses

    from skyfall.train.stage1 import train_stage1

    cfg = dataclasses.replace(tiny_config.stage1, steps=5)
    train_stage1(cfg, tiny_tile, tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    for bar in ("stage1", "eval held-out views", "DSM (median depth)"):
        assert f"{bar}:" in err, bar


def test_resume_accepts_a_config_field_newer_than_the_run():
    from skyfall.config.resume import config_differences

    saved = {"seed": 0, "flowedit": {"n_max": 10}}
    given = {"seed": 0, "flowedit": {"n_max": 10}, "top2ground": {"geometry": "height"}}
    assert config_differences("stage2", saved, given) == []
    assert config_differences("stage2", saved, {**given, "seed": 1}) == ["seed"]

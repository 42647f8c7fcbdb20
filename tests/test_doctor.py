"""``skyfall doctor`` on a machine without GPU or weights, and with a (stand-in) cached model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _doctor(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_HOME")}
    env.update(env_extra, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "skyfall", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_doctor_without_weights_exits_0_and_says_what_is_missing(tmp_path: Path):
    pytest.importorskip("huggingface_hub")
    out = _doctor({"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"HF cache     {tmp_path / 'hf' / 'hub'} (does not exist; 0 model repos)" in text
    for repo in ("black-forest-labs/FLUX.1-dev", "Ruicheng/moge-vitl", "Ruicheng/moge-2-vitl",
                 "depth-anything/Depth-Anything-V2-Metric-Outdoor-Large-hf"):  # fmt: skip
        assert f"weights      {repo}: missing" in text
        assert f"`hf download {repo}`" in text
    assert "hf auth login" in text  # FLUX.1-dev is gated
    import torch

    if not torch.cuda.is_available():
        assert "GPU          none (torch.cuda.is_available() is False)" in text
        assert "FLUX Stage 2: not possible here (no GPU)" in text
    assert "cuda_ext     mode" in text and "torch        " in text


def test_doctor_finds_weights_in_hf_hub_cache(tmp_path: Path):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snap = cache / "models--Ruicheng--moge-vitl" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model.pt").write_bytes(b"x" * 1000)
    (cache / "models--Ruicheng--moge-vitl" / "refs").mkdir()
    (cache / "models--Ruicheng--moge-vitl" / "refs" / "main").write_text("a" * 40)
    flux = cache / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / ("b" * 40) / "transformer"
    flux.mkdir(parents=True)
    (flux / "config.json").write_text("{}")
    out = _doctor({"HF_HUB_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr
    assert "weights      Ruicheng/moge-vitl: present" in out.stdout
    assert "weights      black-forest-labs/FLUX.1-dev: incomplete" in out.stdout
    assert "vae/config.json" in out.stdout
    assert "weights      Ruicheng/moge-2-vitl: missing" in out.stdout

"""DreamSim in `skyfall eval`: the distance with tiny stand-in embedders, the never-download loader, and
the per-view / per-band / unavailable reporting of the eval runner."""

from __future__ import annotations

import csv
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skyfall.eval import dreamsim as ds
from skyfall.eval.dreamsim import DREAMSIM_SIZE, ENSEMBLE_FILES, DreamSimMetric, load_dreamsim


def _tiny_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip


def _tiny_vit_embed():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=DREAMSIM_SIZE, patch_size=32, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32)  # fmt: skip
    vit = transformers.ViTModel(cfg, add_pooling_layer=False).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:  # the CLS token, as DreamSim's DINO branch
        return vit(pixel_values=x).last_hidden_state[:, 0]

    return embed


def _scenes(n: int, h: int = 64, w: int = 80) -> torch.Tensor:
    """Structured images (gradients + a bright box) in [0, 1]: [n, 3, h, w]."""
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(3, 2, generator=g)
        img = c[:, :1, None] * yy + c[:, 1:, None] * xx
        y0, x0 = (
            int(torch.randint(0, h // 2, (1,), generator=g)),
            int(torch.randint(0, w // 2, (1,), generator=g)),
        )
        img[:, y0 : y0 + h // 3, x0 : x0 + w // 3] = torch.rand(3, 1, 1, generator=g)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


@pytest.fixture(params=["conv", "vit"])
def metric(request: pytest.FixtureRequest) -> DreamSimMetric:
    return DreamSimMetric(_tiny_conv() if request.param == "conv" else _tiny_vit_embed())


# ------------------------------------------------------------------------------------------ distance


def test_identical_images_are_at_zero_and_the_distance_is_symmetric_in_0_2(metric: DreamSimMetric):
    a, b = _scenes(3), _scenes(6)[3:]
    assert metric.distance(a, a).abs().max() < 1e-6
    d_ab, d_ba = metric.distance(a, b), metric.distance(b, a)
    assert d_ab.shape == (3,) and d_ab.dtype == torch.float64
    torch.testing.assert_close(d_ab, d_ba, rtol=0, atol=1e-12)
    assert ((d_ab >= 0) & (d_ab <= 2)).all() and (d_ab > 0).all()
    # opposite embeddings reach the top of the range
    flip = DreamSimMetric(lambda x: torch.where(x.mean((1, 2, 3), keepdim=True) > 0.5, 1.0, -1.0).flatten(1))
    assert float(flip.distance(torch.full((1, 3, 8, 8), 0.9), torch.full((1, 3, 8, 8), 0.1))[0]) == 2.0


def test_distance_grows_with_noise_on_average(metric: DreamSimMetric):
    clean = _scenes(8)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(clean.shape, generator=g)
    means = [float(metric.distance(clean, (clean + s * noise).clamp(0, 1)).mean()) for s in (0.02, 0.1, 0.3)]
    assert means[0] < means[1] < means[2], means


def test_distance_is_one_minus_cosine_of_the_resized_embeddings_by_hand():
    embed = _tiny_vit_embed()
    a, b = _scenes(2, 50, 70), _scenes(4, 50, 70)[2:]
    d = DreamSimMetric(embed).distance(a, b)
    for i in range(2):
        xa = F.interpolate(a[i : i + 1], size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
        xb = F.interpolate(b[i : i + 1], size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
        with torch.no_grad():
            ea, eb = embed(xa)[0].double(), embed(xb)[0].double()
        assert float(d[i]) == pytest.approx(1 - float(ea @ eb / (ea.norm() * eb.norm())), abs=1e-6)
    # 224x224 inputs are not resampled; channels-last single images give the same value
    c = _scenes(2, 224, 224)
    with torch.no_grad():
        e0, e1 = embed(c[:1])[0].double(), embed(c[1:])[0].double()
    one = DreamSimMetric(embed).image_distance(c[0].permute(1, 2, 0), c[1].permute(1, 2, 0))
    assert one == pytest.approx(1 - float(e0 @ e1 / (e0.norm() * e1.norm())), abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        DreamSimMetric(embed).distance(a, c)


# -------------------------------------------------------------------------------------------- loader


def _fill(cache: Path, skip: tuple[str, ...] = ()) -> None:
    for entry in ENSEMBLE_FILES:
        name = entry if isinstance(entry, str) else entry[0]
        if name not in skip:
            (cache / name).parent.mkdir(parents=True, exist_ok=True)
            (cache / name).write_bytes(b"")


def _fake_package(monkeypatch: pytest.MonkeyPatch, calls: list[dict]) -> None:
    """A stand-in ``dreamsim`` package that records how it is built (and mimics its torch.hub side effect)."""
    mod = types.ModuleType("dreamsim")
    mod.__spec__ = importlib.machinery.ModuleSpec("dreamsim", None)
    conv = _tiny_conv()

    def dreamsim(pretrained: bool = True, device: str = "cuda", cache_dir: str = "./models", **kw):
        calls.append({"pretrained": pretrained, "device": device, "cache_dir": cache_dir, **kw})
        torch.hub.set_dir(cache_dir)
        print(f"Using cached {cache_dir}")
        model = types.SimpleNamespace(embed=conv)
        return model, None

    mod.dreamsim = dreamsim
    monkeypatch.setitem(sys.modules, "dreamsim", mod)


def test_package_missing_is_reported_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setattr(ds, "package_installed", lambda: False)
    assert load_dreamsim(tmp_path) == "the dreamsim package is not installed (pip install dreamsim)"


def test_this_environment_reports_the_truth_about_the_package(tmp_path: Path):
    import importlib.util

    reason = load_dreamsim(tmp_path / "none")
    assert isinstance(reason, str) and "\n" not in reason
    if importlib.util.find_spec("dreamsim") is None:
        assert reason == "the dreamsim package is not installed (pip install dreamsim)"
    else:
        assert str(tmp_path / "none") in reason and "--dreamsim-cache" in reason


def test_missing_weights_are_reported_with_path_and_fetch_command_and_never_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    calls: list[dict] = []
    _fake_package(monkeypatch, calls)
    assert ds.package_installed()
    reason = load_dreamsim(tmp_path / "absent")
    assert reason.startswith(f"DreamSim weights folder {tmp_path / 'absent'} does not exist (not downloaded)")
    assert ds.fetch_command(tmp_path / "absent") in reason and "--dreamsim-cache DIR" in reason
    cache = tmp_path / "cache"
    _fill(cache, skip=("ensemble_lora/adapter_model.safetensors", "checkpoints/dino_vitbase16_pretrain.pth"))
    reason = load_dreamsim(cache)
    assert isinstance(reason, str) and "\n" not in reason
    assert (
        f"DreamSim weights not found in {cache} (missing ensemble_lora/adapter_model.safetensors|"
        "ensemble_lora/adapter_model.bin, checkpoints/dino_vitbase16_pretrain.pth; not downloaded)" in reason
    )
    assert "dreamsim(pretrained=True" in reason and "vitb16_pretrain.pth.tar" not in reason
    assert calls == []  # the package (which would download) was never called
    assert "weights missing in" in ds.weights_status(cache)


def test_present_weights_load_through_the_package_and_restore_torch_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
):
    calls: list[dict] = []
    _fake_package(monkeypatch, calls)
    cache = tmp_path / "cache"
    _fill(cache)
    hub = torch.hub.get_dir()
    m = load_dreamsim(cache, device="cpu")
    assert isinstance(m, DreamSimMetric), m
    assert calls == [{"pretrained": True, "device": "cpu", "cache_dir": str(cache)}]
    assert torch.hub.get_dir() == hub  # LPIPS' AlexNet lookup still sees the user's torch hub
    assert "Using cached" not in capsys.readouterr().out  # stdout carries the eval table
    assert str(cache) in m.name and ds.weights_status(cache) == f"weights present in {cache}"
    a = _scenes(2)
    assert float(m.distance(a, a).max()) < 1e-6 and float(m.distance(a, a.flip(0)).min()) > 0


def test_load_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    mod = types.ModuleType("dreamsim")
    mod.__spec__ = importlib.machinery.ModuleSpec("dreamsim", None)

    def broken(**kw):
        raise RuntimeError("Error(s) in loading state_dict\n  size mismatch")

    mod.dreamsim = broken
    monkeypatch.setitem(sys.modules, "dreamsim", mod)
    _fill(tmp_path)
    assert load_dreamsim(tmp_path) == (
        f"cannot load DreamSim weights from {tmp_path}: Error(s) in loading state_dict"
    )


# ------------------------------------------------------------------------------------------- runner


def test_eval_scores_dreamsim_per_view_set_and_band(tiny_run: Path, tmp_path: Path):
    from skyfall.eval.runner import (
        SATELLITE_BAND,
        EvalOptions,
        _find_key,
        _satellite_set,
        evaluate_run,
        load_scene,
    )

    conv = _tiny_conv()
    out = tmp_path / "eval"
    opts = EvalOptions(run=tiny_run, out=out, embedders={"dreamsim": conv}, sets=("street", "orbit_e85_r300"),
                       max_views=2, clip=False, lpips=False, geometry=False)  # fmt: skip
    doc = evaluate_run(opts, progress=False)
    assert "dreamsim" not in doc["unavailable"] and doc["models"]["dreamsim"] == "custom"
    ck = doc["checkpoints"][0]
    assert {"0-10m", "250-300m", SATELLITE_BAND} <= set(ck["by_band"])
    for r in ck["views"]:
        assert 0 < r["dreamsim"] <= 2
    for key, by in (("band", ck["by_band"]), ("set", ck["by_set"])):
        for g, agg in by.items():
            vals = [r["dreamsim"] for r in ck["views"] if r[key] == g]
            assert agg["dreamsim"] == pytest.approx(np.mean(vals), abs=1e-12), (key, g)
    # Satellite views are scored like LPIPS: the render blacked out where the reference has no data.
    from skyfall.storage.checkpoints import latest_checkpoint
    from skyfall.storage.run_dir import RunDir

    config = RunDir(tiny_run).load_config()
    sat = _satellite_set(Path(doc["data"]), int(_find_key(config, "resolution", 1)), 1)
    assert sat is not None and sat.masks is not None and not sat.masks[0].all()
    scene, _ = load_scene(latest_checkpoint(tiny_run / "ckpts"))
    r = scene.render(sat.cameras[0], scene.novel_embedding(doc["embedding"]), absgrad=False)
    pred = r.colors[0].double().clamp(0, 1) * torch.from_numpy(sat.masks[0])[..., None]
    want = DreamSimMetric(conv).image_distance(pred, torch.from_numpy(sat.images[0]).double() / 255)
    got = next(v["dreamsim"] for v in ck["views"] if v["set"] == "sat_test" and v["view"] == 0)
    assert got == pytest.approx(want, abs=1e-6)
    # the new column in every output
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    band = next(r for r in rows if r["kind"] == "band" and r["group"] == "0-10m")
    assert float(band["dreamsim"]) == pytest.approx(ck["by_band"]["0-10m"]["dreamsim"], rel=1e-3)
    with open(out / "views.csv") as f:
        assert all(r["dreamsim"] for r in csv.DictReader(f))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["checkpoints"][0]["by_band"]["0-10m"]["dreamsim"] == ck["by_band"]["0-10m"]["dreamsim"]
    assert "dreamsim" in saved["protocol"]
    html = (out / "report.html").read_text()
    assert "DreamSim per altitude band" in html and "<th>dreamsim</th>" in html


def test_cli_reports_dreamsim_unavailable_in_one_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from skyfall.cli import entrypoint

    base = ["eval", str(tiny_run), "--sets", "street", "--max-views", "1", "--no-satellite", "--no-geometry",
            "--no-clip", "--no-lpips"]  # fmt: skip
    out = tmp_path / "a"
    entrypoint([*base, "--out", str(out), "--dreamsim-cache", str(tmp_path / "no_weights")])
    text = capsys.readouterr().out
    want = load_dreamsim(tmp_path / "no_weights")
    assert isinstance(want, str)
    lines = [ln for ln in text.splitlines() if ln.startswith("[eval] dreamsim unavailable: ")]
    assert lines == [f"[eval] dreamsim unavailable: {want}"]
    doc = json.loads((out / "eval.json").read_text())
    assert doc["unavailable"]["dreamsim"] == want
    assert all("dreamsim" not in r for r in doc["checkpoints"][0]["views"])
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert "dreamsim" in rows[0] and all(r["dreamsim"] == "" for r in rows)
    assert "dreamsim" in (out / "report.html").read_text()  # listed under unavailable metrics

    out = tmp_path / "b"
    entrypoint([*base, "--out", str(out), "--no-dreamsim"])
    assert "[eval] dreamsim unavailable: disabled (--no-dreamsim)" in capsys.readouterr().out

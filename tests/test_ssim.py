"""SSIM: torch reference against hand-derived values, gradients, dispatch, and the CUDA kernel."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

from skyfall.cuda_ext import CSRC
from skyfall.kernels import _backend, extension_status, ssim
from skyfall.kernels._torch_impl import _ssim, _ssim_bwd, _ssim_fwd_parts, gaussian_window_1d

C1 = 0.01**2
C2 = 0.03**2


def _taps(ws: int = 11, sigma: float = 1.5) -> list[float]:
    r = ws // 2
    t = [math.exp(-((i - r) ** 2) / (2 * sigma * sigma)) for i in range(ws)]
    s = sum(t)
    return [v / s for v in t]


def _loop_ssim_map(x: torch.Tensor, y: torch.Tensor, ws: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Direct, non-separable SSIM: a full 2D window summed pixel by pixel, zeros outside the image."""
    g = _taps(ws, sigma)
    r = ws // 2
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    xs, ys = x.tolist(), y.tolist()
    for bi in range(b):
        for ci in range(c):
            xi, yi = xs[bi][ci], ys[bi][ci]
            for i in range(h):
                for j in range(w):
                    m1 = m2 = e11 = e22 = e12 = 0.0
                    for di in range(-r, r + 1):
                        for dj in range(-r, r + 1):
                            ii, jj = i + di, j + dj
                            if 0 <= ii < h and 0 <= jj < w:
                                wt = g[di + r] * g[dj + r]
                                a, bb = xi[ii][jj], yi[ii][jj]
                                m1 += wt * a
                                m2 += wt * bb
                                e11 += wt * a * a
                                e22 += wt * bb * bb
                                e12 += wt * a * bb
                    s11, s22, s12 = e11 - m1 * m1, e22 - m2 * m2, e12 - m1 * m2
                    out[bi, ci, i, j] = ((2 * m1 * m2 + C1) * (2 * s12 + C2)) / (
                        (m1 * m1 + m2 * m2 + C1) * (s11 + s22 + C2)
                    )
    return out


def test_gaussian_window_taps():
    g = gaussian_window_1d(11, 1.5, dtype=torch.float64)
    torch.testing.assert_close(g, torch.tensor(_taps(), dtype=torch.float64), rtol=0, atol=1e-15)
    assert abs(g.sum().item() - 1.0) < 1e-15
    with pytest.raises(ValueError):
        gaussian_window_1d(10)


def test_identical_images_give_one():
    x = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ssim_map = _ssim(x, x.clone(), reduction="none")
    torch.testing.assert_close(ssim_map, torch.ones_like(ssim_map), rtol=0, atol=1e-12)
    assert abs(_ssim(x, x).item() - 1.0) < 1e-12


def test_constant_images_closed_form_including_borders():
    # x ≡ a, y ≡ b. With zero padding a pixel sees window mass w = cy(i) cx(j) (the taps inside the
    # image), so mu1 = a w, mu2 = b w, s11 = a² w(1-w), s22 = b² w(1-w), s12 = a b w(1-w).
    a, b, h, w = 0.7, 0.2, 14, 9
    x = torch.full((1, 1, h, w), a, dtype=torch.float64)
    y = torch.full((1, 1, h, w), b, dtype=torch.float64)
    g = _taps()

    def coverage(n: int, i: int) -> float:
        return sum(g[k] for k in range(11) if 0 <= i + k - 5 < n)

    ssim_map = _ssim(x, y, reduction="none")
    for i in range(h):
        for j in range(w):
            m = coverage(h, i) * coverage(w, j)
            v = m * (1 - m)
            expected = ((2 * a * b * m * m + C1) * (2 * a * b * v + C2)) / (
                ((a * a + b * b) * m * m + C1) * ((a * a + b * b) * v + C2)
            )
            assert ssim_map[0, 0, i, j].item() == pytest.approx(expected, rel=1e-10)
    # far from any border the window is fully inside: S = (2ab + C1) / (a² + b² + C1)
    big = _ssim(
        torch.full((1, 1, 30, 30), a, dtype=torch.float64),
        torch.full((1, 1, 30, 30), b, dtype=torch.float64),
        reduction="none",
    )
    assert big[0, 0, 15, 15].item() == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), rel=1e-12)


def test_matches_direct_loop_formula():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 2, 9, 13, generator=gen, dtype=torch.float64)
    y = (0.6 * x + 0.4 * torch.rand(1, 2, 9, 13, generator=gen, dtype=torch.float64)).clamp(0, 1)
    expected = _loop_ssim_map(x, y)
    got = _ssim(x, y, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert _ssim(x, y).item() == pytest.approx(expected.mean().item(), rel=1e-12)


def test_valid_padding_crops_border():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 16, 15, generator=gen, dtype=torch.float64)
    y = torch.rand(1, 1, 16, 15, generator=gen, dtype=torch.float64)
    full = _ssim(x, y, reduction="none")
    assert _ssim(x, y, padding="valid").item() == pytest.approx(
        full[..., 5:11, 5:10].mean().item(), rel=1e-12
    )


def test_float32_close_to_float64_and_unbatched_input():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 24, 31, generator=gen)
    y = torch.rand(3, 24, 31, generator=gen)
    v32 = _ssim(x, y).item()
    v64 = _ssim(x.double(), y.double()).item()
    assert v32 == pytest.approx(v64, abs=1e-6)
    assert ssim(x, y).item() == pytest.approx(_ssim(x[None], y[None]).item(), abs=0)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(1, 2, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 2, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _ssim(a, b), (x, y), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda a, b: _ssim(a, b, reduction="none"), (x, y), eps=1e-6, atol=1e-8)


def test_analytic_backward_of_cuda_math_matches_autograd():
    # _ssim_fwd_parts/_ssim_bwd mirror cuda_ext/csrc/ssim.cu; check that math on the CPU.
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 12, 19, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 3, 12, 19, generator=gen, dtype=torch.float64)
    cot = torch.randn(2, 3, 12, 19, generator=gen, dtype=torch.float64)
    ssim_map = _ssim(x, y, reduction="none")
    (expected,) = torch.autograd.grad((ssim_map * cot).sum(), x)
    s, dmu, da, dp = _ssim_fwd_parts(x.detach(), y)
    torch.testing.assert_close(s, ssim_map.detach(), rtol=1e-12, atol=1e-12)
    got = _ssim_bwd(x.detach(), y, cot, dmu, da, dp)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_argument_errors():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="padding"):
        ssim(x, x, padding="reflect")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        ssim(x, x, reduction="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ssim(torch.rand(8, 8), torch.rand(8, 8))


def test_backend_env_modes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert _backend.get_extension() is None
    assert extension_status()["mode"] == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="SKYFALL_KERNELS"):
        _backend.get_extension()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_backend_without_cuda(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    assert _backend.get_extension() is None
    status = extension_status(load=True)
    assert status["loaded"] is False and status["source"] is None
    assert "cuda" in status["error"].lower()
    assert all(p.endswith((".cpp", ".cu")) for p in status["sources"])
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="unavailable"):
        _backend.get_extension()
    # CPU tensors never need the extension, even in cuda mode
    x = torch.rand(1, 3, 8, 8)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)


def test_cuda_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    # sm_80 (A100) and sm_90 (H100): both accepted by CUDA 12 and 13.
    cmd = [nvcc, "-c", "-O3", "--use_fast_math", "-std=c++17", "-Werror", "all-warnings"]
    cmd += ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    cmd += [str(CSRC / "ssim.cu"), "-o", str(tmp_path / "ssim.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ssim.o").stat().st_size > 0
    nm = shutil.which("nm")
    if nm is not None:
        symbols = subprocess.run([nm, str(tmp_path / "ssim.o")], capture_output=True, text=True).stdout
        for name in ("skyfall_ssim_fwd_launch", "skyfall_ssim_bwd_launch", "skyfall_ssim_window_size"):
            assert f" T {name}" in symbols, f"C-linkage symbol {name} missing"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 37, 53), (1, 1, 5, 7), (3, 3, 130, 17)])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_fused_matches_torch_reference(shape: tuple[int, int, int, int], padding: str):
    if padding == "valid" and (shape[2] <= 10 or shape[3] <= 10):
        pytest.skip("image smaller than the window: empty valid region")
    # a failed build must fail this test, not silently compare the torch path with itself
    ext = _backend.get_extension()
    assert ext is not None, extension_status()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(shape, device="cuda", generator=gen)
    y = (0.7 * x + 0.3 * torch.rand(shape, device="cuda", generator=gen)).clamp(0, 1)
    cot = torch.randn(shape, device="cuda", generator=gen)

    # reference in float64 on the same data
    x64 = x.double().requires_grad_(True)
    ref_map = _ssim(x64, y.double(), padding=padding, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref_map * cot[..., : ref_map.shape[2], : ref_map.shape[3]]).sum(), x64)

    x32 = x.clone().requires_grad_(True)
    fused_map = ssim(x32, y, padding=padding, reduction="none")
    (fused_grad,) = torch.autograd.grad(
        (fused_map * cot[..., : fused_map.shape[2], : fused_map.shape[3]]).sum(), x32
    )

    # float32 moments lose ~1e-7 absolutely to cancellation in E[x²] - mu², divided by C2 = 9e-4.
    torch.testing.assert_close(fused_map.double(), ref_map, rtol=0, atol=5e-4)
    torch.testing.assert_close(
        fused_grad.double(), ref_grad, rtol=1e-2, atol=2e-3 * ref_grad.abs().max().item()
    )
    mean_fused = ssim(x, y, padding=padding).item()
    assert mean_fused == pytest.approx(ref_map.mean().item(), abs=5e-5)

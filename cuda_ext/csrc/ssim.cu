// Fused SSIM (11x11 Gaussian window, zero "same" padding), forward and backward w.r.t. img1.
//
// Plain CUDA with C-linkage launchers over raw float pointers: this file needs no torch headers, so it
// can be compiled (and checked) with `nvcc -c` alone. The torch bindings live in ext.cpp.
//
// Math (per channel, per pixel p; G = the normalised 2D window g g^T, "*" = zero-padded correlation):
//   mu1 = G*x, mu2 = G*y, A = G*x^2, B = G*y^2, P = G*(x y)
//   s11 = A - mu1^2, s22 = B - mu2^2, s12 = P - mu1 mu2
//   S = (2 mu1 mu2 + C1)(2 s12 + C2) / ((mu1^2 + mu2^2 + C1)(s11 + s22 + C2))
// The forward optionally stores dS/dmu1, dS/dA, dS/dP (total derivatives with the other two moments
// held fixed). The backward, given dL/dS, is then
//   dL/dx = G*(dL/dS dS/dmu1) + 2 x G*(dL/dS dS/dA) + y G*(dL/dS dS/dP)
// because the window is symmetric (the adjoint of a zero-padded "same" correlation with a symmetric
// window is the same correlation). The torch twins are skyfall/kernels/_torch_impl.py:_ssim_fwd_parts
// and _ssim_bwd.

#include <cuda_runtime.h>

#include <cstddef>

namespace {

constexpr int kRadius = 5;
constexpr int kWin = 2 * kRadius + 1;  // 11, as fused_ssim
constexpr int kTile = 16;              // output tile edge == block edge
constexpr int kHalo = kTile + 2 * kRadius;
constexpr int kThreads = kTile * kTile;
constexpr int kMaxPlanesPerLaunch = 65535;  // gridDim.z limit

// Passed by value (44 bytes of kernel parameters): no __constant__ symbol, so concurrent launches on
// different streams with different windows cannot race.
struct Window {
  float w[kWin];
};

__device__ __forceinline__ float load_or_zero(const float* __restrict__ img, int h, int w, int H, int W) {
  return (h >= 0 && h < H && w >= 0 && w < W) ? img[static_cast<size_t>(h) * W + w] : 0.0f;
}

__global__ void ssim_fwd_kernel(const float* __restrict__ img1, const float* __restrict__ img2,
                                float* __restrict__ ssim_map, float* __restrict__ ds_dmu1,
                                float* __restrict__ ds_da, float* __restrict__ ds_dp, int H, int W,
                                Window win, float C1, float C2) {
  // +1 column of padding keeps the row-strided accesses of the horizontal pass off a single bank.
  __shared__ float sx[kHalo][kHalo + 1];
  __shared__ float sy[kHalo][kHalo + 1];
  __shared__ float hs[5][kHalo][kTile];

  const size_t plane_off = static_cast<size_t>(blockIdx.z) * H * W;
  const float* x = img1 + plane_off;
  const float* y = img2 + plane_off;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * kTile + tx;
  const int h0 = static_cast<int>(blockIdx.y) * kTile - kRadius;
  const int w0 = static_cast<int>(blockIdx.x) * kTile - kRadius;

  for (int i = tid; i < kHalo * kHalo; i += kThreads) {
    const int r = i / kHalo;
    const int c = i - r * kHalo;
    sx[r][c] = load_or_zero(x, h0 + r, w0 + c, H, W);
    sy[r][c] = load_or_zero(y, h0 + r, w0 + c, H, W);
  }
  __syncthreads();

  // Horizontal pass over every halo row, for this thread's output column.
  for (int r = ty; r < kHalo; r += kTile) {
    float m1 = 0.f, m2 = 0.f, e11 = 0.f, e22 = 0.f, e12 = 0.f;
#pragma unroll
    for (int k = 0; k < kWin; ++k) {
      const float a = sx[r][tx + k];
      const float b = sy[r][tx + k];
      const float wk = win.w[k];
      m1 += wk * a;
      m2 += wk * b;
      e11 += wk * a * a;
      e22 += wk * b * b;
      e12 += wk * a * b;
    }
    hs[0][r][tx] = m1;
    hs[1][r][tx] = m2;
    hs[2][r][tx] = e11;
    hs[3][r][tx] = e22;
    hs[4][r][tx] = e12;
  }
  __syncthreads();

  const int h = static_cast<int>(blockIdx.y) * kTile + ty;
  const int w = static_cast<int>(blockIdx.x) * kTile + tx;
  if (h >= H || w >= W) return;

  float mu1 = 0.f, mu2 = 0.f, a = 0.f, b = 0.f, p = 0.f;
#pragma unroll
  for (int k = 0; k < kWin; ++k) {
    const float wk = win.w[k];
    mu1 += wk * hs[0][ty + k][tx];
    mu2 += wk * hs[1][ty + k][tx];
    a += wk * hs[2][ty + k][tx];
    b += wk * hs[3][ty + k][tx];
    p += wk * hs[4][ty + k][tx];
  }

  const float s11 = a - mu1 * mu1;
  const float s22 = b - mu2 * mu2;
  const float s12 = p - mu1 * mu2;
  const float n1 = 2.f * mu1 * mu2 + C1;
  const float n2 = 2.f * s12 + C2;
  const float d1 = mu1 * mu1 + mu2 * mu2 + C1;
  const float d2 = s11 + s22 + C2;
  const float s = (n1 * n2) / (d1 * d2);

  const size_t idx = plane_off + static_cast<size_t>(h) * W + w;
  ssim_map[idx] = s;
  if (ds_dmu1 != nullptr) {
    const float dsd_s12 = 2.f * n1 / (d1 * d2);
    const float dsd_s11 = -s / d2;
    // mu1 also enters s11 (-mu1^2) and s12 (-mu1 mu2) when A and P are the independent moments.
    const float dsd_mu1 = (2.f * mu2 * n2 / d2 - 2.f * mu1 * s) / d1 - 2.f * mu1 * dsd_s11 - mu2 * dsd_s12;
    ds_dmu1[idx] = dsd_mu1;
    ds_da[idx] = dsd_s11;
    ds_dp[idx] = dsd_s12;
  }
}

__global__ void ssim_bwd_kernel(const float* __restrict__ img1, const float* __restrict__ img2,
                                const float* __restrict__ grad_map, const float* __restrict__ ds_dmu1,
                                const float* __restrict__ ds_da, const float* __restrict__ ds_dp,
                                float* __restrict__ grad_img1, int H, int W, Window win) {
  __shared__ float su[kHalo][kHalo + 1];
  __shared__ float sa[kHalo][kHalo + 1];
  __shared__ float sp[kHalo][kHalo + 1];
  __shared__ float hs[3][kHalo][kTile];

  const size_t plane_off = static_cast<size_t>(blockIdx.z) * H * W;
  const float* gm = grad_map + plane_off;
  const float* du = ds_dmu1 + plane_off;
  const float* da = ds_da + plane_off;
  const float* dp = ds_dp + plane_off;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * kTile + tx;
  const int h0 = static_cast<int>(blockIdx.y) * kTile - kRadius;
  const int w0 = static_cast<int>(blockIdx.x) * kTile - kRadius;

  // The SSIM map only exists inside the image, so the chain-rule terms are zero outside it.
  for (int i = tid; i < kHalo * kHalo; i += kThreads) {
    const int r = i / kHalo;
    const int c = i - r * kHalo;
    const int hh = h0 + r;
    const int ww = w0 + c;
    float vu = 0.f, va = 0.f, vp = 0.f;
    if (hh >= 0 && hh < H && ww >= 0 && ww < W) {
      const size_t j = static_cast<size_t>(hh) * W + ww;
      const float g = gm[j];
      vu = g * du[j];
      va = g * da[j];
      vp = g * dp[j];
    }
    su[r][c] = vu;
    sa[r][c] = va;
    sp[r][c] = vp;
  }
  __syncthreads();

  for (int r = ty; r < kHalo; r += kTile) {
    float bu = 0.f, ba = 0.f, bp = 0.f;
#pragma unroll
    for (int k = 0; k < kWin; ++k) {
      const float wk = win.w[k];
      bu += wk * su[r][tx + k];
      ba += wk * sa[r][tx + k];
      bp += wk * sp[r][tx + k];
    }
    hs[0][r][tx] = bu;
    hs[1][r][tx] = ba;
    hs[2][r][tx] = bp;
  }
  __syncthreads();

  const int h = static_cast<int>(blockIdx.y) * kTile + ty;
  const int w = static_cast<int>(blockIdx.x) * kTile + tx;
  if (h >= H || w >= W) return;

  float bu = 0.f, ba = 0.f, bp = 0.f;
#pragma unroll
  for (int k = 0; k < kWin; ++k) {
    const float wk = win.w[k];
    bu += wk * hs[0][ty + k][tx];
    ba += wk * hs[1][ty + k][tx];
    bp += wk * hs[2][ty + k][tx];
  }
  const size_t idx = plane_off + static_cast<size_t>(h) * W + w;
  grad_img1[idx] = bu + 2.f * img1[idx] * ba + img2[idx] * bp;
}

Window make_window(const float* taps) {
  Window win;
  for (int k = 0; k < kWin; ++k) win.w[k] = taps[k];
  return win;
}

}  // namespace

extern "C" {

// Window size the kernels were compiled for (the bindings check callers against it).
int skyfall_ssim_window_size(void) { return kWin; }

// img1, img2, ssim_map: [planes, H, W] contiguous float32 on the current device (planes = B * C).
// ds_dmu1 / ds_da / ds_dp: same shape, or all nullptr when no backward is needed.
// taps: host array of kWin normalised 1D Gaussian weights.
cudaError_t skyfall_ssim_fwd_launch(const float* img1, const float* img2, float* ssim_map, float* ds_dmu1,
                                    float* ds_da, float* ds_dp, int planes, int H, int W, const float* taps,
                                    float C1, float C2, cudaStream_t stream) {
  if (planes <= 0 || H <= 0 || W <= 0) return cudaSuccess;
  if ((ds_dmu1 == nullptr) != (ds_da == nullptr) || (ds_dmu1 == nullptr) != (ds_dp == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const Window win = make_window(taps);
  const dim3 block(kTile, kTile, 1);
  const size_t plane_size = static_cast<size_t>(H) * W;
  for (int first = 0; first < planes; first += kMaxPlanesPerLaunch) {
    const int n = (planes - first < kMaxPlanesPerLaunch) ? planes - first : kMaxPlanesPerLaunch;
    const size_t off = static_cast<size_t>(first) * plane_size;
    const dim3 grid((W + kTile - 1) / kTile, (H + kTile - 1) / kTile, n);
    ssim_fwd_kernel<<<grid, block, 0, stream>>>(img1 + off, img2 + off, ssim_map + off,
                                                ds_dmu1 ? ds_dmu1 + off : nullptr, ds_da ? ds_da + off : nullptr,
                                                ds_dp ? ds_dp + off : nullptr, H, W, win, C1, C2);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// grad_map: dL/dS [planes, H, W]; the partials come from skyfall_ssim_fwd_launch. Writes grad_img1.
cudaError_t skyfall_ssim_bwd_launch(const float* img1, const float* img2, const float* grad_map,
                                    const float* ds_dmu1, const float* ds_da, const float* ds_dp,
                                    float* grad_img1, int planes, int H, int W, const float* taps,
                                    cudaStream_t stream) {
  if (planes <= 0 || H <= 0 || W <= 0) return cudaSuccess;
  const Window win = make_window(taps);
  const dim3 block(kTile, kTile, 1);
  const size_t plane_size = static_cast<size_t>(H) * W;
  for (int first = 0; first < planes; first += kMaxPlanesPerLaunch) {
    const int n = (planes - first < kMaxPlanesPerLaunch) ? planes - first : kMaxPlanesPerLaunch;
    const size_t off = static_cast<size_t>(first) * plane_size;
    const dim3 grid((W + kTile - 1) / kTile, (H + kTile - 1) / kTile, n);
    ssim_bwd_kernel<<<grid, block, 0, stream>>>(img1 + off, img2 + off, grad_map + off, ds_dmu1 + off,
                                                ds_da + off, ds_dp + off, grad_img1 + off, H, W, win);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // extern "C"

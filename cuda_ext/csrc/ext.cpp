// Torch bindings of skyfall's CUDA kernels. The kernels themselves (ssim.cu) are plain CUDA behind
// C-linkage launchers, so this is the only translation unit that includes torch headers.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <vector>

extern "C" {
int skyfall_ssim_window_size(void);
cudaError_t skyfall_ssim_fwd_launch(const float* img1, const float* img2, float* ssim_map, float* ds_dmu1,
                                    float* ds_da, float* ds_dp, int planes, int H, int W, const float* taps,
                                    float C1, float C2, cudaStream_t stream);
cudaError_t skyfall_ssim_bwd_launch(const float* img1, const float* img2, const float* grad_map,
                                    const float* ds_dmu1, const float* ds_da, const float* ds_dp,
                                    float* grad_img1, int planes, int H, int W, const float* taps,
                                    cudaStream_t stream);
}

namespace {

void check_image(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, " must be [B, C, H, W], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* name) {
  check_image(b, name);
  TORCH_CHECK(a.sizes() == b.sizes(), name, " must have shape ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.device() == b.device(), name, " must be on ", a.device(), ", got ", b.device());
}

std::vector<float> checked_taps(const std::vector<double>& taps) {
  const int ws = skyfall_ssim_window_size();
  TORCH_CHECK(static_cast<int>(taps.size()) == ws, "the fused SSIM kernel needs ", ws, " window taps, got ",
              taps.size());
  return std::vector<float>(taps.begin(), taps.end());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

// Returns {ssim_map, ds_dmu1, ds_da, ds_dp}; the last three are empty tensors unless need_parts.
std::vector<torch::Tensor> ssim_fwd_cuda(const torch::Tensor& img1, const torch::Tensor& img2,
                                         const std::vector<double>& taps, double C1, double C2,
                                         bool need_parts) {
  check_image(img1, "img1");
  check_same(img1, img2, "img2");
  const std::vector<float> w = checked_taps(taps);
  const c10::cuda::CUDAGuard guard(img1.device());
  const int planes = static_cast<int>(img1.size(0) * img1.size(1));
  const int H = static_cast<int>(img1.size(2));
  const int W = static_cast<int>(img1.size(3));

  torch::Tensor ssim_map = torch::empty_like(img1);
  torch::Tensor ds_dmu1, ds_da, ds_dp;
  if (need_parts) {
    ds_dmu1 = torch::empty_like(img1);
    ds_da = torch::empty_like(img1);
    ds_dp = torch::empty_like(img1);
  } else {
    ds_dmu1 = ds_da = ds_dp = torch::empty({0}, img1.options());
  }
  check_launch(skyfall_ssim_fwd_launch(img1.data_ptr<float>(), img2.data_ptr<float>(), ssim_map.data_ptr<float>(),
                                       need_parts ? ds_dmu1.data_ptr<float>() : nullptr,
                                       need_parts ? ds_da.data_ptr<float>() : nullptr,
                                       need_parts ? ds_dp.data_ptr<float>() : nullptr, planes, H, W, w.data(),
                                       static_cast<float>(C1), static_cast<float>(C2),
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "ssim_fwd_cuda");
  return {ssim_map, ds_dmu1, ds_da, ds_dp};
}

// dL/d img1 from dL/dS (grad_map) and the partials saved by ssim_fwd_cuda(need_parts=true).
torch::Tensor ssim_bwd_cuda(const torch::Tensor& img1, const torch::Tensor& img2, const torch::Tensor& grad_map,
                            const torch::Tensor& ds_dmu1, const torch::Tensor& ds_da, const torch::Tensor& ds_dp,
                            const std::vector<double>& taps) {
  check_image(img1, "img1");
  check_same(img1, img2, "img2");
  check_same(img1, grad_map, "grad_map");
  check_same(img1, ds_dmu1, "ds_dmu1");
  check_same(img1, ds_da, "ds_da");
  check_same(img1, ds_dp, "ds_dp");
  const std::vector<float> w = checked_taps(taps);
  const c10::cuda::CUDAGuard guard(img1.device());
  const int planes = static_cast<int>(img1.size(0) * img1.size(1));
  const int H = static_cast<int>(img1.size(2));
  const int W = static_cast<int>(img1.size(3));

  torch::Tensor grad_img1 = torch::empty_like(img1);
  check_launch(skyfall_ssim_bwd_launch(img1.data_ptr<float>(), img2.data_ptr<float>(), grad_map.data_ptr<float>(),
                                       ds_dmu1.data_ptr<float>(), ds_da.data_ptr<float>(), ds_dp.data_ptr<float>(),
                                       grad_img1.data_ptr<float>(), planes, H, W, w.data(),
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "ssim_bwd_cuda");
  return grad_img1;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "skyfall fused CUDA kernels (see cuda_ext/README.md)";
  m.def("ssim_window_size", &skyfall_ssim_window_size, "window size the fused SSIM kernel was compiled for");
  m.def("ssim_fwd_cuda", &ssim_fwd_cuda, "fused SSIM forward: (map, dS/dmu1, dS/dA, dS/dP)", py::arg("img1"),
        py::arg("img2"), py::arg("taps"), py::arg("C1"), py::arg("C2"), py::arg("need_parts"));
  m.def("ssim_bwd_cuda", &ssim_bwd_cuda, "fused SSIM backward: dL/d img1", py::arg("img1"), py::arg("img2"),
        py::arg("grad_map"), py::arg("ds_dmu1"), py::arg("ds_da"), py::arg("ds_dp"), py::arg("taps"));
}

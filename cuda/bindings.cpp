// torch bindings for the kernels in this folder (built by hybrid/cuda_kernels.py through torch's extension loader).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

extern "C" int hybrid_fp8_linear(const float* x, const uint8_t* w, const float* s, float* y, int M, int N, int K,
                                 cudaStream_t stream);

// x [M, K] float32, w [N, K] float8_e4m3fn, s [ceil(N/128), ceil(K/128)] float32 -> y [M, N] float32, written
// into `out` when given (tests poison it first). Returns an undefined tensor when the shape is not supported
// (the caller falls back to torch).
torch::Tensor fp8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, std::optional<torch::Tensor> out) {
    TORCH_CHECK(x.is_cuda() && w.is_cuda() && s.is_cuda(), "fp8_linear: all tensors must be on the GPU");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && s.dim() == 2, "fp8_linear: x, w and s must be 2-D");
    TORCH_CHECK(x.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat, "fp8_linear: x and s must be float32");
    TORCH_CHECK(w.scalar_type() == at::kFloat8_e4m3fn, "fp8_linear: w must be float8_e4m3fn");
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    TORCH_CHECK(w.size(1) == K, "fp8_linear: x has ", K, " columns, w has ", w.size(1));
    TORCH_CHECK(s.size(0) == (N + 127) / 128 && s.size(1) == (K + 127) / 128, "fp8_linear: scale grid mismatch");
    auto xc = x.contiguous(), wc = w.contiguous(), sc = s.contiguous();
    if (reinterpret_cast<uintptr_t>(wc.data_ptr()) % 16 || reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16)
        return torch::Tensor();
    auto y = out.has_value() ? *out : torch::empty({M, N}, x.options());
    TORCH_CHECK(y.is_cuda() && y.scalar_type() == at::kFloat && y.is_contiguous() && y.size(0) == M && y.size(1) == N,
                "fp8_linear: out must be a contiguous float32 [M, N] GPU tensor");
    const int rc = hybrid_fp8_linear(xc.data_ptr<float>(), reinterpret_cast<const uint8_t*>(wc.data_ptr()),
                                     sc.data_ptr<float>(), y.data_ptr<float>(), M, N, K,
                                     c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    if (rc != 0) return torch::Tensor();
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("fp8_linear", &fp8_linear, "block-scaled fp8 e4m3 linear for a few tokens (decode)", py::arg("x"),
          py::arg("w"), py::arg("s"), py::arg("out") = py::none());
}

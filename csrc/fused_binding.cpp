// Torch binding of the fused kernels: checks the arguments (each message names the value and
// the rule), allocates outputs and scratch with torch's allocator, and calls the launchers of
// fused_kernels.h on the current CUDA stream. The Python side is mp/fused.

// Narrow includes rather than <torch/extension.h>: the binding compiles in half the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <climits>
#include <optional>
#include <vector>

#include "fused_kernels.h"

namespace {

using mp_fused::DType;

DType dtype_of(const at::Tensor& t, bool allow_float32, const char* what) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      if (allow_float32) return DType::kFloat32;
      break;
    default:
      break;
  }
  TORCH_CHECK(false, what, " has dtype ", t.scalar_type(), "; supported: ",
              allow_float32 ? "float32, " : "", "float16, bfloat16");
}

void check_tensor(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), what, " is on ", t.device(), ", the input on ",
              like.device());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* what) {
  check_tensor(t, like, what);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), what, " has dtype ", t.scalar_type(),
              ", the input ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), what, " has shape ", t.sizes(), ", the input ",
              like.sizes());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// ---------------------------------------------------------------------------------- softmax

// Scores [..., sq, sk]; with a mask, [b, np, sq, sk] and a bool mask [b or 1, 1, sq, sk].
at::Tensor softmax_forward(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                           bool causal, double scale) {
  check_tensor(x, x, "softmax input");
  const DType dtype = dtype_of(x, false, "softmax input");
  TORCH_CHECK(x.dim() >= 2, "softmax input needs [..., sq, sk], got shape ", x.sizes());
  const int64_t sq = x.size(-2), sk = x.size(-1);
  TORCH_CHECK(sk >= 1 && sk <= mp_fused::kMaxSoftmaxKeys, "softmax: sk=", sk,
              " keys is outside 1..", mp_fused::kMaxSoftmaxKeys);
  TORCH_CHECK(sq <= INT_MAX, "softmax: sq=", sq, " is above ", INT_MAX);
  TORCH_CHECK(!causal || sq == sk, "causal softmax needs sq == sk, got sq=", sq, ", sk=", sk);
  TORCH_CHECK(!(causal && mask), "a causal softmax takes no mask");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);

  mp_fused::SoftmaxForwardArgs a{};
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.rows = x.numel() / sk;
  a.sq = static_cast<int32_t>(sq);
  a.sk = static_cast<int32_t>(sk);
  a.kind = causal ? mp_fused::SoftmaxMask::kCausal : mp_fused::SoftmaxMask::kNone;
  a.scale = static_cast<float>(scale);
  if (mask) {
    const at::Tensor& m = *mask;
    check_tensor(m, x, "softmax mask");
    TORCH_CHECK(m.scalar_type() == at::kBool, "softmax mask has dtype ", m.scalar_type(),
                "; it must be bool (True = masked)");
    TORCH_CHECK(x.dim() == 4, "a masked softmax takes [b, np, sq, sk] scores, got shape ",
                x.sizes());
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == x.size(0)) && m.size(1) == 1 &&
                    m.size(2) == sq && m.size(3) == sk,
                "softmax mask of shape ", m.sizes(), " is not [b or 1, 1, sq, sk] for scores ",
                x.sizes());
    a.kind = mp_fused::SoftmaxMask::kPadding;
    a.mask = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
    a.mask_batches = static_cast<int32_t>(m.size(0));
    a.rows_per_batch = x.size(1) * sq;
  }
  check_launch(mp_fused::softmax_forward(a, dtype, c10::cuda::getCurrentCUDAStream()),
               "softmax forward");
  return y;
}

at::Tensor softmax_backward(const at::Tensor& dy, const at::Tensor& y, bool causal,
                            double scale) {
  check_tensor(y, y, "softmax output");
  const DType dtype = dtype_of(y, false, "softmax output");
  check_same(dy, y, "softmax output gradient");
  TORCH_CHECK(y.dim() >= 2, "softmax output needs [..., sq, sk], got shape ", y.sizes());
  const int64_t sq = y.size(-2), sk = y.size(-1);
  TORCH_CHECK(sk >= 1 && sk <= mp_fused::kMaxSoftmaxKeys, "softmax: sk=", sk,
              " keys is outside 1..", mp_fused::kMaxSoftmaxKeys);
  TORCH_CHECK(sq <= INT_MAX, "softmax: sq=", sq, " is above ", INT_MAX);
  TORCH_CHECK(!causal || sq == sk, "causal softmax needs sq == sk, got sq=", sq, ", sk=", sk);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dx = at::empty_like(y);

  mp_fused::SoftmaxBackwardArgs a{};
  a.dy = dy.data_ptr();
  a.y = y.data_ptr();
  a.dx = dx.data_ptr();
  a.rows = y.numel() / sk;
  a.sq = static_cast<int32_t>(sq);
  a.sk = static_cast<int32_t>(sk);
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  check_launch(mp_fused::softmax_backward(a, dtype, c10::cuda::getCurrentCUDAStream()),
               "softmax backward");
  return dx;
}

// ---------------------------------------------------------------------------- normalization

// The hidden size of x [..., hidden] normalized with weight [hidden]; checks both.
int32_t check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check_tensor(x, x, "norm input");
  dtype_of(x, true, "norm input");
  TORCH_CHECK(x.dim() >= 1, "norm input needs [..., hidden], got a scalar");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= mp_fused::kMaxNormHidden, "norm: hidden=", hidden,
              " is outside 1..", mp_fused::kMaxNormHidden);
  check_tensor(weight, x, "norm weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "norm weight has dtype ",
              weight.scalar_type(), ", the input ", x.scalar_type(), "; they must match");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "norm weight has shape ",
              weight.sizes(), "; the input's last dim is ", hidden);
  return static_cast<int32_t>(hidden);
}

// LayerNorm when bias is given, RMSNorm when not. Returns {y, mean, rstd} (LayerNorm) or
// {y, rstd} (RMSNorm); the statistics are fp32 [rows].
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, double eps) {
  const int32_t hidden = check_norm(x, weight);
  if (bias) check_same(*bias, weight, "norm bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.numel() / hidden;
  const auto stats = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, stats);
  at::Tensor mean = bias ? at::empty({rows}, stats) : at::Tensor();

  mp_fused::NormForwardArgs a{};
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.mean = bias ? mean.data_ptr<float>() : nullptr;
  a.rstd = rstd.data_ptr<float>();
  a.rows = rows;
  a.hidden = hidden;
  a.eps = static_cast<float>(eps);
  a.rms = !bias;
  check_launch(mp_fused::norm_forward(a, dtype_of(x, true, "norm input"),
                                      c10::cuda::getCurrentCUDAStream()),
               "norm forward");
  if (bias) return {y, mean, rstd};
  return {y, rstd};
}

// Gradients of norm_forward: {dx, dweight, dbias} given mean (LayerNorm), {dx, dweight} not.
std::vector<at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& mean,
                                      const at::Tensor& rstd) {
  const int32_t hidden = check_norm(x, weight);
  check_same(dy, x, "norm output gradient");
  const int64_t rows = x.numel() / hidden;
  const auto check_stats = [&](const at::Tensor& s) {
    check_tensor(s, x, "norm statistics");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == rows,
                "norm statistics must be float32 with one value per row (", rows, "), got ",
                s.scalar_type(), " with ", s.numel());
  };
  check_stats(rstd);
  if (mean) check_stats(*mean);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dbias = mean ? at::empty_like(weight) : at::Tensor();

  mp_fused::NormBackwardArgs a{};
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.mean = mean ? mean->data_ptr<float>() : nullptr;
  a.rstd = rstd.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.dweight = dweight.data_ptr();
  a.dbias = mean ? dbias.data_ptr() : nullptr;
  a.rows = rows;
  a.hidden = hidden;
  a.rms = !mean;
  const DType dtype = dtype_of(x, true, "norm input");
  const size_t floats = mp_fused::norm_backward_workspace_floats(a, dtype);
  at::Tensor workspace = at::empty({static_cast<int64_t>(floats)}, x.options().dtype(at::kFloat));
  a.workspace = workspace.data_ptr<float>();
  check_launch(mp_fused::norm_backward(a, dtype, c10::cuda::getCurrentCUDAStream()),
               "norm backward");
  if (mean) return {dx, dweight, dbias};
  return {dx, dweight};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mp fused kernels: scaled masked softmax, LayerNorm and RMSNorm (see mp/fused)";
  m.def("softmax_forward", &softmax_forward, "y = softmax(scale * x) over the last dim, masked",
        py::arg("x"), py::arg("mask"), py::arg("causal"), py::arg("scale"));
  m.def("softmax_backward", &softmax_backward, "dx = scale * y * (dy - sum(dy * y))",
        py::arg("dy"), py::arg("y"), py::arg("causal"), py::arg("scale"));
  m.def("norm_forward", &norm_forward,
        "LayerNorm (bias given) or RMSNorm over the last dim: [y, mean, rstd] or [y, rstd]",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("norm_backward", &norm_backward,
        "Gradients of norm_forward: [dx, dweight, dbias] (mean given) or [dx, dweight]",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"));
}

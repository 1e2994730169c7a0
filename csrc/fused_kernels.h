// Launchers of the fused softmax and normalization kernels: the interface between the CUDA
// sources (softmax.cu, norm_forward.cu, norm_backward.cu) and the torch binding.
//
// Plain C++ with CUDA runtime types only (no torch headers), so the kernel sources compile with
// `nvcc -c` on a machine without torch or a GPU. Every tensor is a raw pointer to contiguous,
// row-major memory; every launcher enqueues its kernels on `stream` and returns the launch
// status (cudaGetLastError), leaving the caller to report it.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace mp_fused {

enum class DType : int32_t { kFloat32, kFloat16, kBFloat16 };

// ---------------------------------------------------------------------------------------------
// Softmax over the last dim of attention scores: y = softmax(scale * x) with masked positions
// at probability 0, a row with every position masked all zeros. fp16/bf16 in and out, fp32 math.

constexpr int kMaxSoftmaxKeys = 16384;

enum class SoftmaxMask : int32_t {
  kNone,     // every position counts
  kPadding,  // mask[(b or 0), 0, q, k] != 0 removes key k from query q's row
  kCausal,   // key k > query q removed (sq == sk)
};

struct SoftmaxForwardArgs {
  const void* x;         // [rows, sk], rows = b * np * sq
  void* y;               // [rows, sk]
  const uint8_t* mask;   // [mask_batches, sq, sk] bytes, nonzero = masked; kPadding only
  int64_t rows;
  int64_t rows_per_batch;  // np * sq: rows sharing one batch entry of the mask
  int32_t mask_batches;    // 1 (broadcast over the batch) or b
  int32_t sq, sk;          // 1 <= sk <= kMaxSoftmaxKeys
  SoftmaxMask kind;
  float scale;
};

// dx = scale * y * (dy - sum_k dy * y); for kCausal only the lower triangle of y and dy is read.
struct SoftmaxBackwardArgs {
  const void* dy;  // [rows, sk]
  const void* y;   // [rows, sk], the forward's output
  void* dx;        // [rows, sk]
  int64_t rows;
  int32_t sq, sk;
  bool causal;
  float scale;
};

cudaError_t softmax_forward(const SoftmaxForwardArgs& args, DType dtype, cudaStream_t stream);
cudaError_t softmax_backward(const SoftmaxBackwardArgs& args, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// LayerNorm and RMSNorm over the last dim, statistics in fp32:
//   LayerNorm: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(mean((x - mean)^2) + eps)
//   RMSNorm:   y = x * rstd * w,               rstd = 1 / sqrt(mean(x^2) + eps)
// x, w, b, y, dy, dx, dw, db share one dtype (fp32, fp16 or bf16).

constexpr int kMaxNormHidden = 65536;

struct NormForwardArgs {
  const void* x;       // [rows, hidden]
  const void* weight;  // [hidden]
  const void* bias;    // [hidden]; LayerNorm only
  void* y;             // [rows, hidden]
  float* mean;         // [rows]; LayerNorm only
  float* rstd;         // [rows]
  int64_t rows;
  int32_t hidden;      // 1 <= hidden <= kMaxNormHidden
  float eps;
  bool rms;
};

struct NormBackwardArgs {
  const void* dy;      // [rows, hidden]
  const void* x;       // [rows, hidden], the forward's input
  const void* weight;  // [hidden]
  const float* mean;   // [rows]; LayerNorm only
  const float* rstd;   // [rows]
  void* dx;            // [rows, hidden]
  void* dweight;       // [hidden]
  void* dbias;         // [hidden]; LayerNorm only
  float* workspace;    // norm_backward_workspace_floats(...) floats of fp32 scratch
  int64_t rows;
  int32_t hidden;
  bool rms;
};

// Scratch the backward needs for its deterministic two-stage weight/bias-gradient reduction:
// partial column sums, [2, partial rows, hidden] fp32. Depends on the pointers' alignment and on
// the current device, so ask with the arguments of the launch (workspace left unset).
size_t norm_backward_workspace_floats(const NormBackwardArgs& args, DType dtype);

cudaError_t norm_forward(const NormForwardArgs& args, DType dtype, cudaStream_t stream);
cudaError_t norm_backward(const NormBackwardArgs& args, DType dtype, cudaStream_t stream);

}  // namespace mp_fused

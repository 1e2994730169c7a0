// LayerNorm and RMSNorm forward over the last dim: y, and the per-row mean and rstd (fp32)
// that the backward reuses. Statistics are two-pass (mean, then the mean of squared
// deviations), exact to fp32 rounding whatever the offset of the data.
#include "norm_common.cuh"

namespace mp_fused {
namespace {

constexpr int kBlockTarget = 256;

// Registers path: a group of tpr threads per row, kNormVecs 16-byte vectors per thread.
template <typename T, bool RMS>
__global__ void __launch_bounds__(kNormMaxThreads)
    norm_forward_registers_kernel(NormForwardArgs a, int tpr) {
  constexpr int kVec = kNormVec<T>;
  __shared__ float smem[kNormMaxThreads / 32];
  const int lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool live = row < a.rows;
  const int hidden = a.hidden;
  const T* x = static_cast<const T*>(a.x) + row * hidden;

  float v[kNormVecs][kVec];
  float sum[1] = {0.f};
#pragma unroll
  for (int j = 0; j < kNormVecs; ++j) {
    const int col = (j * tpr + lane) * kVec;
    const bool in = live && col < hidden;
    Vec<T, kVec> t;
    if (in) t = load_vec<T, kVec>(x + col);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      v[j][e] = in ? to_float(t.val[e]) : 0.f;
      sum[0] += v[j][e];
    }
  }
  float mean = 0.f;
  if (!RMS) {
    group_allreduce(sum, tpr, smem, SumOp());
    mean = sum[0] / hidden;
  }
  float squares[1] = {0.f};
#pragma unroll
  for (int j = 0; j < kNormVecs; ++j) {
    if (live && (j * tpr + lane) * kVec < hidden) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) squares[0] += (v[j][e] - mean) * (v[j][e] - mean);
    }
  }
  group_allreduce(squares, tpr, smem, SumOp());
  const float rstd = rsqrtf(squares[0] / hidden + a.eps);

  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y) + row * hidden;
#pragma unroll
  for (int j = 0; j < kNormVecs; ++j) {
    const int col = (j * tpr + lane) * kVec;
    if (live && col < hidden) {
      const Vec<T, kVec> wv = load_vec<T, kVec>(w + col);
      Vec<T, kVec> bv;
      if (!RMS) bv = load_vec<T, kVec>(b + col);
      Vec<T, kVec> out;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float o = normalized<RMS>(v[j][e], mean, rstd) * to_float(wv.val[e]);
        out.val[e] = from_float<T>(RMS ? o : o + to_float(bv.val[e]));
      }
      store_vec<T, kVec>(y + col, out);
    }
  }
  if (live && lane == 0) {
    if (!RMS) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// General path: one block per row, three passes over the row in global memory.
template <typename T, bool RMS>
__global__ void __launch_bounds__(kNormGeneralThreads)
    norm_forward_general_kernel(NormForwardArgs a) {
  __shared__ float smem[kNormGeneralThreads / 32];
  const int64_t row = blockIdx.x;
  const int hidden = a.hidden;
  const T* x = static_cast<const T*>(a.x) + row * hidden;
  float mean = 0.f;
  if (!RMS) {
    float sum[1] = {0.f};
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) sum[0] += to_float(x[c]);
    group_allreduce(sum, blockDim.x, smem, SumOp());
    mean = sum[0] / hidden;
  }
  float squares[1] = {0.f};
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float d = to_float(x[c]) - mean;
    squares[0] += d * d;
  }
  group_allreduce(squares, blockDim.x, smem, SumOp());
  const float rstd = rsqrtf(squares[0] / hidden + a.eps);

  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y) + row * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float o = normalized<RMS>(to_float(x[c]), mean, rstd) * to_float(w[c]);
    y[c] = from_float<T>(RMS ? o : o + to_float(b[c]));
  }
  if (threadIdx.x == 0) {
    if (!RMS) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

template <typename T, bool RMS>
cudaError_t launch(const NormForwardArgs& a, cudaStream_t stream) {
  if (norm_registers_path<T>(a.hidden, {a.x, a.y, a.weight, a.bias})) {
    const int tpr = threads_per_row(a.hidden / kNormVec<T>, kNormVecs);
    const int threads = block_threads(tpr, kBlockTarget);
    norm_forward_registers_kernel<T, RMS>
        <<<grid_1d(ceil_div(a.rows, threads / tpr)), threads, 0, stream>>>(a, tpr);
  } else {
    norm_forward_general_kernel<T, RMS>
        <<<grid_1d(a.rows), norm_general_threads(a.hidden), 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const NormForwardArgs& a, cudaStream_t stream) {
  return a.rms ? launch<T, true>(a, stream) : launch<T, false>(a, stream);
}

}  // namespace

cudaError_t norm_forward(const NormForwardArgs& args, DType dtype, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  return dispatch_dtype<true>(dtype, [&](auto tag) {
    return launch_typed<typename decltype(tag)::type>(args, stream);
  });
}

}  // namespace mp_fused

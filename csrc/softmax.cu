// Scaled, masked softmax over the last dim of attention scores, forward and backward.
//
// A row of sk keys belongs to a group of tpr threads (a power of two up to a warp, or whole
// warps); each thread keeps kElemsPerThread elements of it in registers, loaded as 16-byte
// vectors when sk and the pointers allow, else one element at a time. One read of the input, one
// write of the output: the row never leaves registers between its max, sum and output passes.
//
// Causal rows read only their first q + 1 columns (the rest is masked) and write zeros to the
// others, so the forward reads about half the input and the backward half of y and dy.
#include <cmath>

#include "common.cuh"

namespace mp_fused {
namespace {

constexpr int kElemsPerThread = 32;
constexpr int kMaxThreads = kMaxSoftmaxKeys / kElemsPerThread;  // 512
constexpr int kBlockTarget = 128;
constexpr float kLog2e = 1.4426950408889634f;

// Columns [0, valid) of `row` can be nonzero; causal rows stop at the diagonal.
__device__ __forceinline__ int valid_columns(bool causal, int64_t row, int sq, int sk) {
  return causal ? min(static_cast<int>(row % sq) + 1, sk) : sk;
}

template <typename T, int VEC, SoftmaxMask KIND>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_forward_kernel(SoftmaxForwardArgs a, int tpr) {
  constexpr int kVecs = kElemsPerThread / VEC;
  __shared__ float smem[kMaxThreads / 32];
  const int lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool live = row < a.rows;
  const int sk = a.sk;
  const int valid = live ? valid_columns(KIND == SoftmaxMask::kCausal, row, a.sq, sk) : 0;
  const T* x = static_cast<const T*>(a.x) + row * sk;
  const uint8_t* mask = nullptr;
  if (KIND == SoftmaxMask::kPadding && live) {
    const int64_t batch = a.mask_batches == 1 ? 0 : row / a.rows_per_batch;
    mask = a.mask + (batch * a.sq + row % a.sq) * sk;
  }

  // z = scale * x in base 2: softmax(z) = 2^(z log2 e - max) / sum. Masked: -inf.
  const float scale = a.scale * kLog2e;
  float z[kVecs][VEC];
  float top[1] = {-INFINITY};
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int col = (j * tpr + lane) * VEC;
    if (col < valid) {
      const Vec<T, VEC> v = load_vec<T, VEC>(x + col);
      Vec<uint8_t, VEC> m = {};
      if (KIND == SoftmaxMask::kPadding) m = load_vec<uint8_t, VEC>(mask + col);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool keep = col + e < valid && !m.val[e];
        z[j][e] = keep ? to_float(v.val[e]) * scale : -INFINITY;
        top[0] = fmaxf(top[0], z[j][e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) z[j][e] = -INFINITY;
    }
  }
  group_allreduce(top, tpr, smem, MaxOp());
  // A fully masked row has max -inf: shift by 0 instead, so every exp2 gives 0 (not NaN).
  const float shift = top[0] == -INFINITY ? 0.f : top[0];
  float sum[1] = {0.f};
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      z[j][e] = exp2f(z[j][e] - shift);
      sum[0] += z[j][e];
    }
  }
  group_allreduce(sum, tpr, smem, SumOp());
  const float inv = sum[0] > 0.f ? 1.f / sum[0] : 0.f;

  T* y = static_cast<T*>(a.y) + row * sk;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int col = (j * tpr + lane) * VEC;
    if (live && col < sk) {
      Vec<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.val[e] = from_float<T>(z[j][e] * inv);
      store_vec<T, VEC>(y + col, out);
    }
  }
}

template <typename T, int VEC, bool CAUSAL>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_backward_kernel(SoftmaxBackwardArgs a, int tpr) {
  constexpr int kVecs = kElemsPerThread / VEC;
  __shared__ float smem[kMaxThreads / 32];
  const int lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool live = row < a.rows;
  const int sk = a.sk;
  const int valid = live ? valid_columns(CAUSAL, row, a.sq, sk) : 0;
  const int64_t offset = row * sk;
  const T* y = static_cast<const T*>(a.y) + offset;
  const T* dy = static_cast<const T*>(a.dy) + offset;

  // y and dy stay in registers as loaded; past `valid` (the causal upper triangle) y counts as 0.
  Vec<T, VEC> yv[kVecs], gv[kVecs];
  float dot[1] = {0.f};
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int col = (j * tpr + lane) * VEC;
    if (col < valid) {
      yv[j] = load_vec<T, VEC>(y + col);
      gv[j] = load_vec<T, VEC>(dy + col);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (col + e < valid) dot[0] += to_float(yv[j].val[e]) * to_float(gv[j].val[e]);
      }
    }
  }
  group_allreduce(dot, tpr, smem, SumOp());

  T* dx = static_cast<T*>(a.dx) + offset;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int col = (j * tpr + lane) * VEC;
    if (live && col < sk) {
      Vec<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float g = col + e < valid
                            ? a.scale * to_float(yv[j].val[e]) * (to_float(gv[j].val[e]) - dot[0])
                            : 0.f;
        out.val[e] = from_float<T>(g);
      }
      store_vec<T, VEC>(dx + col, out);
    }
  }
}

// The launch shape for rows of sk keys read VEC at a time: {threads per row, block, grid}.
struct Shape {
  int tpr, threads;
  dim3 grid;
};

template <int VEC>
Shape shape_for(int64_t rows, int sk) {
  const int tpr = threads_per_row(ceil_div(sk, VEC), kElemsPerThread / VEC);
  const int threads = block_threads(tpr, kBlockTarget);
  return {tpr, threads, grid_1d(ceil_div(rows, threads / tpr))};
}

template <typename T, int VEC>
void launch_forward(const SoftmaxForwardArgs& a, cudaStream_t stream) {
  const Shape s = shape_for<VEC>(a.rows, a.sk);
  switch (a.kind) {
    case SoftmaxMask::kNone:
      softmax_forward_kernel<T, VEC, SoftmaxMask::kNone>
          <<<s.grid, s.threads, 0, stream>>>(a, s.tpr);
      break;
    case SoftmaxMask::kPadding:
      softmax_forward_kernel<T, VEC, SoftmaxMask::kPadding>
          <<<s.grid, s.threads, 0, stream>>>(a, s.tpr);
      break;
    case SoftmaxMask::kCausal:
      softmax_forward_kernel<T, VEC, SoftmaxMask::kCausal>
          <<<s.grid, s.threads, 0, stream>>>(a, s.tpr);
      break;
  }
}

template <typename T, int VEC>
void launch_backward(const SoftmaxBackwardArgs& a, cudaStream_t stream) {
  const Shape s = shape_for<VEC>(a.rows, a.sk);
  if (a.causal) {
    softmax_backward_kernel<T, VEC, true><<<s.grid, s.threads, 0, stream>>>(a, s.tpr);
  } else {
    softmax_backward_kernel<T, VEC, false><<<s.grid, s.threads, 0, stream>>>(a, s.tpr);
  }
}

// 16-byte vectors need whole vectors per row and aligned rows; the mask moves VEC bytes at once.
template <typename T>
cudaError_t forward_typed(const SoftmaxForwardArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.sk % kVec == 0 && is_aligned(a.x, 16) && is_aligned(a.y, 16) &&
                   (a.kind != SoftmaxMask::kPadding || is_aligned(a.mask, kVec));
  if (vec) {
    launch_forward<T, kVec>(a, stream);
  } else {
    launch_forward<T, 1>(a, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const SoftmaxBackwardArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.sk % kVec == 0 && is_aligned(a.y, 16) && is_aligned(a.dy, 16) &&
                   is_aligned(a.dx, 16);
  if (vec) {
    launch_backward<T, kVec>(a, stream);
  } else {
    launch_backward<T, 1>(a, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t softmax_forward(const SoftmaxForwardArgs& args, DType dtype, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  return dispatch_dtype<false>(dtype, [&](auto tag) {
    return forward_typed<typename decltype(tag)::type>(args, stream);
  });
}

cudaError_t softmax_backward(const SoftmaxBackwardArgs& args, DType dtype, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  return dispatch_dtype<false>(dtype, [&](auto tag) {
    return backward_typed<typename decltype(tag)::type>(args, stream);
  });
}

}  // namespace mp_fused

// Device helpers shared by the fused kernels: dtype conversion, vector accesses, row-group
// reductions, launch-shape arithmetic. No torch headers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fused_kernels.h"

namespace mp_fused {

// ----------------------------------------------------------------------------- conversions
// Explicit functions rather than operators: torch builds define __CUDA_NO_HALF_OPERATORS__.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ----------------------------------------------------------------------------- vectors
// N consecutive elements moved as one access: a 16-byte load or store when N * sizeof(T) == 16
// (the caller guarantees the alignment).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// ----------------------------------------------------------------------------- row groups
// A kernel gives each row to a group of `tpr` consecutive threads of its block: a power of two up
// to 32, or a multiple of 32 that divides blockDim.x (a multiple of 32), at most 15 groups of more
// than a warp per block. Groups never wait for each other: a group larger than a warp
// synchronizes on its own named barrier (ids 1..15; __syncthreads uses 0).

__device__ __forceinline__ void group_sync(int tpr) {
  asm volatile("bar.sync %0, %1;" ::"r"(1 + static_cast<int>(threadIdx.x) / tpr), "r"(tpr)
               : "memory");
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Leaves the group's reduction of each v[i] in every thread of the group. Every thread of the
// group must call it; `smem` holds N * blockDim.x / 32 floats. The order of the operations is
// fixed, so results are deterministic.
template <int N, typename Op>
__device__ __forceinline__ void group_allreduce(float (&v)[N], int tpr, float* smem, Op op) {
  const int width = tpr < 32 ? tpr : 32;
  for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], offset));
  }
  if (tpr <= 32) return;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int first = warp - warp % (tpr / 32);  // first warp of this group
  group_sync(tpr);  // the group's readers of the previous call are done with smem
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[i * warps + warp] = v[i];
  }
  group_sync(tpr);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float r = smem[i * warps + first];
    for (int w = first + 1; w < first + tpr / 32; ++w) r = op(r, smem[i * warps + w]);
    v[i] = r;
  }
}

// ----------------------------------------------------------------------------- async copies
// 16-byte global -> shared copies that complete in the background (sm_80+), tracked per thread
// in commit groups: cp_async_wait<N>() waits until at most N of the thread's groups are pending,
// after which the thread may read what those copies wrote.

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ----------------------------------------------------------------------------- launch shapes

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A 1-D grid of `blocks`; a count past the hardware limit becomes 0, which the launch rejects
// (cudaErrorInvalidConfiguration) instead of silently truncating.
inline dim3 grid_1d(int64_t blocks) {
  return dim3(blocks <= 0x7fffffff ? static_cast<unsigned>(blocks) : 0u);
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Threads per row for `units` accesses (vectors or elements) per row, `per_thread` per thread:
// a power of two up to a warp, then whole warps.
inline int threads_per_row(int64_t units, int per_thread) {
  const int64_t need = ceil_div(units, per_thread);
  if (need > 32) return static_cast<int>(ceil_div(need, 32) * 32);
  int t = 1;
  while (t < need) t *= 2;
  return t;
}

// A block of whole row groups, about `target` threads (one group when a group is larger).
inline int block_threads(int tpr, int target) { return tpr * (tpr < target ? target / tpr : 1); }

template <typename T>
struct TypeTag {
  using type = T;
};

// `launch(TypeTag<T>{})` for the element type T of `dtype` (fp32 only when kWithFloat32);
// cudaErrorInvalidValue for a dtype the caller does not take.
template <bool kWithFloat32, typename Launch>
cudaError_t dispatch_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32:
      if constexpr (kWithFloat32) return launch(TypeTag<float>{});
      break;
    case DType::kFloat16:
      return launch(TypeTag<__half>{});
    case DType::kBFloat16:
      return launch(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace mp_fused

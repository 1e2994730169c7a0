// What the LayerNorm/RMSNorm forward and backward kernels share: the choice between the
// registers path and the general path, and the normalized value x_hat.
//
// Registers path: hidden a multiple of a 16-byte vector, every pointer 16-byte aligned, and a
// row small enough to sit in the registers of at most kNormMaxThreads threads (kNormVecs
// vectors each: 16384 columns in 16-bit types, 8192 in fp32). One read of each input.
// General path: any hidden up to kMaxNormHidden, one element per access, one block per row,
// re-reading the row (from L2) for each pass.
#pragma once

#include <initializer_list>

#include "common.cuh"

namespace mp_fused {

constexpr int kNormVecs = 4;
constexpr int kNormMaxThreads = 512;
constexpr int kNormGeneralThreads = 1024;

template <typename T>
constexpr int kNormVec = 16 / static_cast<int>(sizeof(T));  // elements of a 16-byte vector

template <typename T>
bool norm_registers_path(int hidden, std::initializer_list<const void*> pointers) {
  if (hidden % kNormVec<T> != 0 || hidden / kNormVec<T> > kNormMaxThreads * kNormVecs) {
    return false;
  }
  for (const void* p : pointers) {
    if (p != nullptr && !is_aligned(p, 16)) return false;
  }
  return true;
}

// Threads of the block of the general path, one row per block: whole warps.
inline int norm_general_threads(int hidden) {
  const int t = static_cast<int>(ceil_div(hidden, 32) * 32);
  return t < kNormGeneralThreads ? t : kNormGeneralThreads;
}

// x_hat = (x - mean) * rstd; RMSNorm has no mean.
template <bool RMS>
__device__ __forceinline__ float normalized(float x, float mean, float rstd) {
  return RMS ? x * rstd : (x - mean) * rstd;
}

}  // namespace mp_fused

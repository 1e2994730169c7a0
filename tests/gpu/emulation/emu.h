// Host emulation of the CUDA features the fused kernels use, so that their logic can be run and
// checked on a machine without a GPU (tests/test_fused_emulated.py). Force-included before the
// kernel sources, which the test first rewrites in the few places where they use inline PTX,
// dynamic shared memory or <<<>>> launches.
//
// A launch runs on one host thread per CUDA thread of a block; the blocks of the grid run one
// after another on those threads, with a block-wide barrier between them so that the next block
// starts with the shared memory the last one left. __syncthreads, named barriers (bar.sync id,
// count) and warp shuffles are std::barrier phases: a thread missing from any of them deadlocks,
// as it would on a GPU. Vector accesses and async copies check their alignment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// Static __shared__ arrays become function statics: one copy, used by one block at a time.
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

struct EmuBlock {
  struct Warp {
    std::barrier<> exchange{32};
    float values[32];
  };
  explicit EmuBlock(int threads, size_t dynamic_smem)
      : all(threads), warps(threads / 32), dynamic(dynamic_smem + 16) {}
  std::barrier<> all;
  std::vector<Warp> warps;
  std::mutex named_mutex;
  std::map<int, std::unique_ptr<std::barrier<>>> named;
  std::vector<unsigned char> dynamic;
};
inline EmuBlock* emu_block = nullptr;
inline cudaError_t emu_launch_error = cudaSuccess;

inline void __syncthreads() { emu_block->all.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  if (mask != 0xffffffffu) std::abort();  // the kernels only shuffle whole warps
  EmuBlock::Warp& warp = emu_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  warp.values[lane] = value;
  warp.exchange.arrive_and_wait();
  const float other = warp.values[lane ^ lane_mask];
  warp.exchange.arrive_and_wait();
  return other;
}

// bar.sync id, count: the barrier is created by its first arrival, with that count.
inline void emu_bar_sync(int id, int count) {
  std::barrier<>* barrier;
  {
    std::lock_guard<std::mutex> lock(emu_block->named_mutex);
    auto& slot = emu_block->named[id];
    if (!slot) slot = std::make_unique<std::barrier<>>(count);
    barrier = slot.get();
  }
  barrier->arrive_and_wait();
}

inline void* emu_dynamic_smem() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(emu_block->dynamic.data());
  return reinterpret_cast<void*>((p + 15) / 16 * 16);
}

template <class V, class P>
V* emu_aligned(P* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) std::abort();
  return reinterpret_cast<V*>(p);
}

inline void emu_cp_async_16(void* smem, const void* gmem) {
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % 16 != 0) {
    std::abort();
  }
  std::memcpy(smem, gmem, 16);
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten as emu_launch([=] { kernel(args); },
// grid, block, smem, stream).
template <class Body>
void emu_launch(Body body, dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  const unsigned threads = block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z != 1 || threads == 0 || threads > 1024 ||
      threads % 32 != 0) {
    emu_launch_error = cudaErrorInvalidConfiguration;
    return;
  }
  EmuBlock state(threads, smem);
  emu_block = &state;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      blockDim = block;
      gridDim = grid;
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = uint3{x, y, 0};
          body();
          state.all.arrive_and_wait();
        }
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
  emu_block = nullptr;
}

// The runtime's function templates, which host-only compilation of cuda_runtime.h leaves out.
template <class T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <class T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* kernel, int threads,
                                                          size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks, reinterpret_cast<const void*>(kernel), threads, smem);
}

// LayerNorm and RMSNorm backward: dx, and the weight (and bias) gradients summed over rows in a
// fixed order (deterministic, no atomics).
//
//   x_hat = (x - mean) * rstd,  g = dy * w
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))     (RMSNorm: no mean(g) term)
//   dw = sum over rows of dy * x_hat,  db = sum over rows of dy
//
// Registers path: a persistent grid of as many blocks as fit on the device at once. A block walks
// rows with its groups of tpr threads; a thread owns the same columns in every row, so it keeps
// its share of dw and db in registers across rows. While a group reduces and writes one row, the
// next row's x and dy are already on their way into shared memory (cp.async, two stages), so
// the memory system stays busy through the reductions. At the end the block adds its groups'
// sums in shared memory and writes one partial row; a column sum adds the partial rows. x and dy
// are read once; the partial rows are about a percent of that traffic.
// General path: one block per row computes dx (two passes over the row), a column sum over
// x and dy writes partial sums per chunk of rows, and the same column sum adds the chunks.
#include "norm_common.cuh"

namespace mp_fused {
namespace {

template <typename T, bool RMS>
__global__ void __launch_bounds__(kNormMaxThreads, 1)
    norm_backward_registers_kernel(NormBackwardArgs a, int tpr) {
  constexpr int kVec = kNormVec<T>;
  __shared__ float red[2 * kNormMaxThreads / 32];
  // Per group, two stages of its (x, dy) rows: [groups][2][2][hidden]; at the end, the groups'
  // weight-gradient sums: [groups][hidden] fp32.
  extern __shared__ __align__(16) unsigned char smem[];
  const int groups = blockDim.x / tpr, group = threadIdx.x / tpr, lane = threadIdx.x % tpr;
  const int hidden = a.hidden;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* w = static_cast<const T*>(a.weight);
  T* const stages = reinterpret_cast<T*>(smem) + static_cast<int64_t>(group) * 4 * hidden;

  // Starts copying `row` into `stage` (each thread copies the vectors it will read) and loads
  // its statistics; a row past the end commits an empty group, keeping the count uniform.
  float next_mean = 0.f, next_rstd = 0.f;
  auto fetch = [&](int64_t row, int stage) {
    if (row < a.rows) {
      T* sx = stages + stage * 2 * hidden;
#pragma unroll
      for (int j = 0; j < kNormVecs; ++j) {
        const int col = (j * tpr + lane) * kVec;
        if (col < hidden) {
          cp_async_16(sx + col, x + row * hidden + col);
          cp_async_16(sx + hidden + col, dy + row * hidden + col);
        }
      }
      next_mean = RMS ? 0.f : a.mean[row];
      next_rstd = a.rstd[row];
    }
    cp_async_commit();
  };

  // Every group of the block takes the same number of steps (the reductions of groups that share
  // a warp must meet); a group whose row is past the end idles through its last step.
  float dw[kNormVecs][kVec] = {}, db[kNormVecs][kVec] = {};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups;
  int stage = 0;
  fetch(static_cast<int64_t>(blockIdx.x) * groups + group, stage);
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < a.rows;
       first += stride, stage ^= 1) {
    const int64_t row = first + group;
    const bool live = row < a.rows;
    const float mean = next_mean, rstd = next_rstd;
    fetch(row + stride, stage ^ 1);  // in flight while this row is reduced and written
    cp_async_wait<1>();
    const T* sx = stages + stage * 2 * hidden;
    const T* sg = sx + hidden;

    float sums[2] = {0.f, 0.f};  // sum of g, sum of g * x_hat
#pragma unroll
    for (int j = 0; j < kNormVecs; ++j) {
      const int col = (j * tpr + lane) * kVec;
      if (live && col < hidden) {
        const Vec<T, kVec> xv = load_vec<T, kVec>(sx + col), gv = load_vec<T, kVec>(sg + col);
        const Vec<T, kVec> wv = load_vec<T, kVec>(w + col);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float g = to_float(gv.val[e]) * to_float(wv.val[e]);
          sums[0] += g;
          sums[1] += g * normalized<RMS>(to_float(xv.val[e]), mean, rstd);
        }
      }
    }
    group_allreduce(sums, tpr, red, SumOp());
    const float mean_g = RMS ? 0.f : sums[0] / hidden, mean_gx = sums[1] / hidden;

#pragma unroll
    for (int j = 0; j < kNormVecs; ++j) {
      const int col = (j * tpr + lane) * kVec;
      if (live && col < hidden) {
        const Vec<T, kVec> xv = load_vec<T, kVec>(sx + col), gv = load_vec<T, kVec>(sg + col);
        const Vec<T, kVec> wv = load_vec<T, kVec>(w + col);
        Vec<T, kVec> out;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float g = to_float(gv.val[e]);
          const float xh = normalized<RMS>(to_float(xv.val[e]), mean, rstd);
          out.val[e] = from_float<T>(rstd * (g * to_float(wv.val[e]) - mean_g - xh * mean_gx));
          dw[j][e] += g * xh;
          db[j][e] += g;
        }
        store_vec<T, kVec>(static_cast<T*>(a.dx) + row * hidden + col, out);
      }
    }
  }
  cp_async_wait<0>();

  // The block's partial row of each sum: its groups added in group order.
  float* group_sums = reinterpret_cast<float*>(smem);
  __syncthreads();  // every group is done with its stages
#pragma unroll
  for (int k = 0; k < (RMS ? 1 : 2); ++k) {
#pragma unroll
    for (int j = 0; j < kNormVecs; ++j) {
      const int col = (j * tpr + lane) * kVec;
      if (col < hidden) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          group_sums[group * hidden + col + e] = k == 0 ? dw[j][e] : db[j][e];
        }
      }
    }
    __syncthreads();
    float* partial = a.workspace + (static_cast<int64_t>(k) * gridDim.x + blockIdx.x) * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
      float sum = 0.f;
      for (int g = 0; g < groups; ++g) sum += group_sums[g * hidden + c];
      partial[c] = sum;
    }
    __syncthreads();
  }
}

// General path, dx: one block per row; the second pass re-reads the row (mostly from L2).
template <typename T, bool RMS>
__global__ void __launch_bounds__(kNormGeneralThreads)
    norm_backward_dx_general_kernel(NormBackwardArgs a) {
  __shared__ float red[2 * kNormGeneralThreads / 32];
  const int64_t row = blockIdx.x;
  const int hidden = a.hidden;
  const T* x = static_cast<const T*>(a.x) + row * hidden;
  const T* dy = static_cast<const T*>(a.dy) + row * hidden;
  const T* w = static_cast<const T*>(a.weight);
  const float mean = RMS ? 0.f : a.mean[row];
  const float rstd = a.rstd[row];
  float sums[2] = {0.f, 0.f};
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float g = to_float(dy[c]) * to_float(w[c]);
    sums[0] += g;
    sums[1] += g * normalized<RMS>(to_float(x[c]), mean, rstd);
  }
  group_allreduce(sums, blockDim.x, red, SumOp());
  const float mean_g = RMS ? 0.f : sums[0] / hidden, mean_gx = sums[1] / hidden;
  T* dx = static_cast<T*>(a.dx) + row * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float xh = normalized<RMS>(to_float(x[c]), mean, rstd);
    dx[c] = from_float<T>(rstd * (to_float(dy[c]) * to_float(w[c]) - mean_g - xh * mean_gx));
  }
}

// ------------------------------------------------------------------ column sums
// Column sums of N row-indexed values, one chunk of rows per blockIdx.y: a block is 32 columns by
// kColumnRows row lanes, each lane summing every kColumnRows-th row of the chunk, the lanes then
// added in lane order.

constexpr int kColumnRows = 16;

// Each row's contribution to dw (and db): dy * x_hat (and dy).
template <typename T, bool RMS>
struct RowGradients {
  static constexpr int N = RMS ? 1 : 2;
  const T* dy;
  const T* x;
  const float* mean;
  const float* rstd;
  int hidden;
  __device__ void add(int64_t row, int col, float (&acc)[N]) const {
    const float g = to_float(dy[row * hidden + col]);
    acc[0] += g * normalized<RMS>(to_float(x[row * hidden + col]), RMS ? 0.f : mean[row],
                                  rstd[row]);
    if (!RMS) acc[N - 1] += g;
  }
};

// Partial sums: N arrays of [rows, hidden] fp32, one after the other.
template <int N_>
struct Partials {
  static constexpr int N = N_;
  float* data;
  int64_t rows;
  int hidden;
  __device__ void add(int64_t row, int col, float (&acc)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] += data[(k * rows + row) * hidden + col];
  }
  __device__ void store(int64_t row, int col, const float (&acc)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) data[(k * rows + row) * hidden + col] = acc[k];
  }
};

// The final gradients, in the parameters' dtype: dw (and db).
template <typename T, int N_>
struct ParamGrads {
  static constexpr int N = N_;
  T* dweight;
  T* dbias;
  __device__ void store(int64_t, int col, const float (&acc)[N]) const {
    dweight[col] = from_float<T>(acc[0]);
    if (N == 2) dbias[col] = from_float<T>(acc[N - 1]);
  }
};

template <typename Source, typename Sink>
__global__ void __launch_bounds__(32 * kColumnRows)
    column_sum_kernel(Source src, Sink sink, int64_t rows, int hidden, int64_t rows_per_chunk) {
  constexpr int N = Source::N;
  __shared__ float lanes[N][kColumnRows][32];
  const int col = blockIdx.x * 32 + threadIdx.x;
  const int64_t begin = blockIdx.y * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
  float acc[N] = {};
  if (col < hidden) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kColumnRows) src.add(r, col, acc);
  }
#pragma unroll
  for (int k = 0; k < N; ++k) lanes[k][threadIdx.y][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      acc[k] = 0.f;
      for (int i = 0; i < kColumnRows; ++i) acc[k] += lanes[k][i][threadIdx.x];
    }
    sink.store(blockIdx.y, col, acc);
  }
}

// ------------------------------------------------------------------ launch

struct Plan {
  bool registers;
  int tpr, threads;        // registers path
  size_t smem;             // registers path: dynamic shared memory of a block
  int64_t partial_rows;    // rows of each partial-sum array
  int64_t rows_per_chunk;  // general path: rows summed into one partial row
};

template <typename T, bool RMS>
Plan plan_for(const NormBackwardArgs& a) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  Plan p{};
  p.registers = norm_registers_path<T>(a.hidden, {a.dy, a.x, a.weight, a.dx});
  if (p.registers) {
    p.tpr = threads_per_row(a.hidden / kNormVec<T>, kNormVecs);
    p.threads = block_threads(p.tpr, kNormMaxThreads);
    // Two stages of (x, dy) per group; the weight-gradient sums reuse them (never larger).
    p.smem = static_cast<size_t>(p.threads / p.tpr) * 4 * a.hidden * sizeof(T);
    const auto kernel = norm_backward_registers_kernel<T, RMS>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(p.smem));
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, p.threads, p.smem);
    const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    const int64_t needed = ceil_div(a.rows, p.threads / p.tpr);
    p.partial_rows = resident < needed ? resident : needed;
  } else {
    // Enough (column tile, chunk) blocks for a few waves, each lane of a block given rows.
    const int64_t tiles = ceil_div(a.hidden, 32);
    int64_t chunks = ceil_div(4 * static_cast<int64_t>(sms), tiles);
    const int64_t most = ceil_div(a.rows, kColumnRows);
    chunks = chunks < most ? chunks : most;
    p.rows_per_chunk = ceil_div(a.rows, chunks);
    p.partial_rows = ceil_div(a.rows, p.rows_per_chunk);
  }
  return p;
}

template <typename T, bool RMS>
cudaError_t launch(const NormBackwardArgs& a, cudaStream_t stream) {
  constexpr int kSums = RMS ? 1 : 2;
  const Plan p = plan_for<T, RMS>(a);
  const Partials<kSums> partials{a.workspace, p.partial_rows, a.hidden};
  const dim3 column_block(32, kColumnRows);
  const unsigned tiles = static_cast<unsigned>(ceil_div(a.hidden, 32));
  if (p.registers) {
    norm_backward_registers_kernel<T, RMS>
        <<<grid_1d(p.partial_rows), p.threads, p.smem, stream>>>(a, p.tpr);
  } else {
    norm_backward_dx_general_kernel<T, RMS>
        <<<grid_1d(a.rows), norm_general_threads(a.hidden), 0, stream>>>(a);
    const RowGradients<T, RMS> grads{static_cast<const T*>(a.dy), static_cast<const T*>(a.x),
                                     a.mean, a.rstd, a.hidden};
    column_sum_kernel<<<dim3(tiles, static_cast<unsigned>(p.partial_rows)), column_block, 0,
                        stream>>>(grads, partials, a.rows, a.hidden, p.rows_per_chunk);
  }
  const ParamGrads<T, kSums> out{static_cast<T*>(a.dweight), static_cast<T*>(a.dbias)};
  column_sum_kernel<<<dim3(tiles, 1), column_block, 0, stream>>>(partials, out, p.partial_rows,
                                                                  a.hidden, p.partial_rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const NormBackwardArgs& a, cudaStream_t stream) {
  return a.rms ? launch<T, true>(a, stream) : launch<T, false>(a, stream);
}

template <typename T>
size_t workspace_typed(const NormBackwardArgs& a) {
  const int64_t rows = a.rms ? plan_for<T, true>(a).partial_rows
                             : plan_for<T, false>(a).partial_rows;
  return static_cast<size_t>(a.rms ? 1 : 2) * rows * a.hidden;
}

}  // namespace

size_t norm_backward_workspace_floats(const NormBackwardArgs& args, DType dtype) {
  if (args.rows == 0) return 0;
  switch (dtype) {
    case DType::kFloat32:
      return workspace_typed<float>(args);
    case DType::kFloat16:
      return workspace_typed<__half>(args);
    case DType::kBFloat16:
      return workspace_typed<__nv_bfloat16>(args);
  }
  return 0;
}

cudaError_t norm_backward(const NormBackwardArgs& args, DType dtype, cudaStream_t stream) {
  if (args.rows == 0) {  // no rows: zero gradients
    const size_t bytes = static_cast<size_t>(args.hidden) * (dtype == DType::kFloat32 ? 4 : 2);
    const cudaError_t err = cudaMemsetAsync(args.dweight, 0, bytes, stream);
    return err != cudaSuccess || args.rms ? err : cudaMemsetAsync(args.dbias, 0, bytes, stream);
  }
  return dispatch_dtype<true>(dtype, [&](auto tag) {
    return launch_typed<typename decltype(tag)::type>(args, stream);
  });
}

}  // namespace mp_fused

// The CUDA runtime calls the launchers make, emulated, and C entry points to the launchers for
// ctypes (tests/test_fused_emulated.py). The emulated device has `emu_sms` multiprocessors, each
// holding one block of any kernel at a time.
#include "emu.h"
#include "fused_kernels.h"

using namespace mp_fused;

extern "C" {

int emu_sms = 2;

cudaError_t cudaGetLastError() {
  const cudaError_t error = emu_launch_error;
  emu_launch_error = cudaSuccess;
  return error;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu_sms : 0;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

int emu_softmax_forward(const void* x, void* y, const uint8_t* mask, int64_t rows,
                        int64_t rows_per_batch, int mask_batches, int sq, int sk, int kind,
                        float scale, int dtype) {
  const SoftmaxForwardArgs a{x, y, mask, rows, rows_per_batch, mask_batches, sq, sk,
                             SoftmaxMask(kind), scale};
  return softmax_forward(a, DType(dtype), nullptr);
}

int emu_softmax_backward(const void* dy, const void* y, void* dx, int64_t rows, int sq, int sk,
                         bool causal, float scale, int dtype) {
  const SoftmaxBackwardArgs a{dy, y, dx, rows, sq, sk, causal, scale};
  return softmax_backward(a, DType(dtype), nullptr);
}

int emu_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean,
                     float* rstd, int64_t rows, int hidden, float eps, int dtype) {
  const NormForwardArgs a{x, weight, bias, y, mean, rstd, rows, hidden, eps, bias == nullptr};
  return norm_forward(a, DType(dtype), nullptr);
}

int64_t emu_norm_workspace_floats(const void* dy, const void* x, const void* weight,
                                  const float* mean, const float* rstd, void* dx, void* dweight,
                                  void* dbias, int64_t rows, int hidden, int dtype) {
  const NormBackwardArgs a{dy, x, weight, mean, rstd, dx, dweight, dbias, nullptr, rows, hidden,
                           mean == nullptr};
  return static_cast<int64_t>(norm_backward_workspace_floats(a, DType(dtype)));
}

int emu_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                      const float* rstd, void* dx, void* dweight, void* dbias, float* workspace,
                      int64_t rows, int hidden, int dtype) {
  const NormBackwardArgs a{dy, x, weight, mean, rstd, dx, dweight, dbias, workspace, rows, hidden,
                           mean == nullptr};
  return norm_backward(a, DType(dtype), nullptr);
}

}  // extern "C"

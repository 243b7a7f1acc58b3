// CUDA fused solver step: one grid-stride kernel, 9 (storage x model dtype) instantiations.
//
// The step index is read on the device (no host sync, CUDA-graph safe); each block stages its
// table row in shared memory. Products and sums use __fmul_rn / __fadd_rn, which are never
// contracted into FMAs (and the file is compiled with -fmad=false as well), so the result
// rounds like the PyTorch reference. A step outside the table, a noise index past the draws or
// a slot past the history cannot raise on the device: the kernel then writes NaN to `out` and
// leaves the history alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "solver_step.h"

namespace diffrt {
namespace {

struct DeviceConv {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

  template <class T>
  static __device__ __forceinline__ T round(float v);

  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
};

template <>
__device__ __forceinline__ float DeviceConv::round<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half DeviceConv::round<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 DeviceConv::round<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

template <class T, class M>
__global__ void __launch_bounds__(kThreads) solver_step_kernel(StepArgs a) {
  extern __shared__ float shared[];
  const int width = table_width(a.n_out, a.n_slots);
  float* row = shared;
  int32_t* irow = reinterpret_cast<int32_t*>(shared + width);

  const int64_t step = *a.step;
  const bool step_ok = step >= 0 && step < a.n_steps;
  for (int c = threadIdx.x; c < width; c += blockDim.x) row[c] = step_ok ? a.table[step * width + c] : 0.0f;
  for (int c = threadIdx.x; c < 1 + a.n_out; c += blockDim.x) irow[c] = step_ok ? a.itable[step * (1 + a.n_out) + c] : -1;
  __syncthreads();
  const bool valid = step_ok && check_row(irow, a) == 0;

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel; i += stride) {
    if (valid) {
      step_element<DeviceConv, T, M>(i, a, row, irow);
    } else {
      static_cast<T*>(a.out)[i] = DeviceConv::round<T>(__int_as_float(0x7FC00000));
    }
  }
}

template <class T, class M>
cudaError_t launch(const StepArgs& a, cudaStream_t stream) {
  const int64_t wanted = (a.numel + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < kMaxBlocks ? wanted : kMaxBlocks);
  const size_t shared_bytes = sizeof(float) * table_width(a.n_out, a.n_slots) + sizeof(int32_t) * (1 + a.n_out);
  solver_step_kernel<T, M><<<blocks, kThreads, shared_bytes, stream>>>(a);
  return cudaGetLastError();
}

template <class T>
cudaError_t dispatch_model(const StepArgs& a, int model_dtype, cudaStream_t stream) {
  switch (model_dtype) {
    case kFloat32: return launch<T, float>(a, stream);
    case kFloat16: return launch<T, __half>(a, stream);
    case kBFloat16: return launch<T, __nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int solver_step_cuda(const StepArgs& a, int x_dtype, int model_dtype, void* stream_handle) {
  if (a.n_slots < 0 || a.n_slots > kMaxSlots || a.n_out < 1 || (a.n_out > 1 && a.history == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (a.numel == 0) return cudaSuccess;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  switch (x_dtype) {
    case kFloat32: return dispatch_model<float>(a, model_dtype, stream);
    case kFloat16: return dispatch_model<__half>(a, model_dtype, stream);
    case kBFloat16: return dispatch_model<__nv_bfloat16>(a, model_dtype, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace diffrt

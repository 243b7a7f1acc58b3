// CUDA fused solver step: one kernel per storage dtype T x model dtype M x history slot count S
// (3 x 3 x (kMaxSlots + 1) instantiations), picked by a switch on the host. What one thread does
// (vectors of 16 bytes, history in registers, a scalar tail) is in solver_step_cuda.cuh.
//
// The step index is read on the device (no host sync, CUDA-graph safe); each block stages its
// table row in shared memory. Products and sums use __fmul_rn / __fadd_rn, which are never
// contracted into FMAs (and the file is compiled with -fmad=false as well), so the result rounds
// like the PyTorch reference. A step outside the table, a noise index past the draws or a slot
// past the history cannot raise on the device: the kernel then writes NaN to `out` and leaves the
// history alone.
//
// tests/test_solver_step_sass.py compiles this file for each architecture of the build and checks
// its SASS: no local memory, 16-byte loads and stores, no FMA.
#include <cuda_runtime.h>

#include <cstdint>

#include "solver_step.h"
#include "solver_step_cuda.cuh"

namespace diffrt {
namespace {

using namespace cuda_step;

template <class T, class M, int S>
__global__ void __launch_bounds__(kThreads) solver_step_kernel(StepArgs a, bool vectorized) {
  extern __shared__ float shared[];
  const int width = table_width(a.n_out, S);
  float* row = shared;
  int32_t* irow = reinterpret_cast<int32_t*>(shared + width);

  const int64_t step = *a.step;
  const bool step_ok = step >= 0 && step < a.n_steps;
  for (int c = threadIdx.x; c < width; c += blockDim.x) row[c] = step_ok ? a.table[step * width + c] : 0.0f;
  for (int c = threadIdx.x; c < 1 + a.n_out; c += blockDim.x) irow[c] = step_ok ? a.itable[step * (1 + a.n_out) + c] : -1;
  __syncthreads();
  const bool valid = step_ok && check_row(irow, a) == 0;
  step_range<T, M, S>(a, row, irow, valid, vectorized, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                      static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// Launches solver_step_kernel<T, M, S> on a stream (the `Launcher` of dispatch()).
struct KernelLauncher {
  cudaStream_t stream;

  template <class T, class M, int S>
  cudaError_t run(const StepArgs& a) const {
    const bool vectorized = can_vectorize<T>(a);
    const size_t shared_bytes = sizeof(float) * table_width(a.n_out, S) + sizeof(int32_t) * (1 + a.n_out);
    solver_step_kernel<T, M, S><<<grid_blocks<T>(a, vectorized), kThreads, shared_bytes, stream>>>(a, vectorized);
    return cudaGetLastError();
  }
};

}  // namespace

int solver_step_cuda(const StepArgs& a, int x_dtype, int model_dtype, void* stream_handle) {
  return dispatch(a, x_dtype, model_dtype, KernelLauncher{static_cast<cudaStream_t>(stream_handle)});
}

}  // namespace diffrt

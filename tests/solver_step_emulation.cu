// The CUDA solver step's per-thread code (csrc/solver_step_cuda.cuh) run on the CPU: the same
// dispatch (dtypes, slot count S), vector / scalar choice and step_range as the kernel, one
// emulated thread after another. Threads of the kernel touch disjoint elements, so running them
// in sequence gives the kernel's results. Built by tests/test_solver_step_sass.py as a shared
// library (nvcc, host code only; -ffp-contract=off) and called through ctypes on CPU tensors.
#include <cstdint>

#include "solver_step_cuda.cuh"

namespace {

using namespace diffrt;
using namespace diffrt::cuda_step;

// The `Launcher` of dispatch(): stages the row as a block would, then runs every thread of the grid
// (or `threads` of them, to make each one stride over several vectors).
struct EmulatedLauncher {
  int64_t threads;   // 0: the kernel's own grid (grid_blocks * kThreads)
  int* vectorized;   // out: whether the vector path ran

  template <class T, class M, int S>
  cudaError_t run(const StepArgs& a) const {
    if (a.n_out > 8) return cudaErrorInvalidValue;  // the row arrays below; the kernel has no such limit
    *vectorized = can_vectorize<T>(a);
    const int64_t total = threads > 0 ? threads : static_cast<int64_t>(grid_blocks<T>(a, *vectorized)) * kThreads;
    const int width = table_width(a.n_out, S);
    const int64_t step = *a.step;
    const bool step_ok = step >= 0 && step < a.n_steps;
    float row[kX0Cols + 8 * (kOutFixedCols + kMaxSlots)];
    int32_t irow[1 + 8];
    for (int c = 0; c < width; ++c) row[c] = step_ok ? a.table[step * width + c] : 0.0f;
    for (int c = 0; c < 1 + a.n_out; ++c) irow[c] = step_ok ? a.itable[step * (1 + a.n_out) + c] : -1;
    const bool valid = step_ok && check_row(irow, a) == 0;
    for (int64_t t = 0; t < total; ++t) step_range<T, M, S>(a, row, irow, valid, *vectorized, t, total);
    return cudaSuccess;
  }
};

}  // namespace

// solver_step_cuda's arguments (pointers as integers, as in csrc/bindings.cpp), with `threads`
// in place of the stream. Returns the dispatch's cudaError_t value; *vectorized tells the path.
extern "C" int emulate_solver_step(uintptr_t x, uintptr_t cond, uintptr_t uncond, uintptr_t history, uintptr_t noise,
                                   uintptr_t out, uintptr_t table, uintptr_t itable, uintptr_t step, int64_t numel,
                                   int64_t n_steps, int64_t n_noise, int n_out, int n_slots, int x_dtype,
                                   int model_dtype, int64_t threads, int* vectorized) {
  StepArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.cond = reinterpret_cast<const void*>(cond);
  a.uncond = reinterpret_cast<const void*>(uncond);
  a.history = reinterpret_cast<void*>(history);
  a.noise = reinterpret_cast<const void*>(noise);
  a.out = reinterpret_cast<void*>(out);
  a.table = reinterpret_cast<const float*>(table);
  a.itable = reinterpret_cast<const int32_t*>(itable);
  a.step = reinterpret_cast<const int64_t*>(step);
  a.numel = numel;
  a.n_steps = n_steps;
  a.n_noise = noise == 0 ? 0 : n_noise;
  a.n_out = n_out;
  a.n_slots = n_slots;
  *vectorized = -1;
  return dispatch(a, x_dtype, model_dtype, EmulatedLauncher{threads, vectorized});
}

// C++ (CPU) fused solver step: OpenMP over elements, 9 (storage x model dtype) instantiations.
//
// Formula and order: solver_step.h. Compiled with -ffp-contract=off so that `a*b + c` rounds
// twice, like the PyTorch reference; fp32 results are then bit-identical to it, and fp16 /
// bf16 results too, since the conversions round to nearest even as torch's do.
#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "half_convert.h"
#include "solver_step.h"

namespace diffrt {
namespace {

struct HostConv {
  static float to_float(float v) { return v; }
  static float to_float(Half v) { return half_bits_to_float(v.bits); }
  static float to_float(BFloat16 v) { return bf16_bits_to_float(v.bits); }

  template <class T>
  static T round(float v);

  static float mul(float a, float b) { return a * b; }
  static float add(float a, float b) { return a + b; }
};

template <>
inline float HostConv::round<float>(float v) {
  return v;
}
template <>
inline Half HostConv::round<Half>(float v) {
  return Half{float_to_half_bits(v)};
}
template <>
inline BFloat16 HostConv::round<BFloat16>(float v) {
  return BFloat16{float_to_bf16_bits(v)};
}

// Below this many elements the loop runs on the calling thread (thread start-up costs more).
constexpr int64_t kParallelThreshold = 1 << 15;

template <class T, class M>
void run(const StepArgs& a, const float* row, const int32_t* irow, int threads) {
  const int64_t numel = a.numel;
#ifdef _OPENMP
  const int team = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(team) if (numel >= kParallelThreshold)
#endif
  for (int64_t i = 0; i < numel; ++i) {
    step_element<HostConv, T, M>(i, a, row, irow);
  }
  (void)threads;
}

template <class T>
void dispatch_model(const StepArgs& a, int model_dtype, const float* row, const int32_t* irow, int threads) {
  switch (model_dtype) {
    case kFloat32: return run<T, float>(a, row, irow, threads);
    case kFloat16: return run<T, Half>(a, row, irow, threads);
    case kBFloat16: return run<T, BFloat16>(a, row, irow, threads);
    default: throw std::invalid_argument("solver_step_cpu: unknown model dtype code " + std::to_string(model_dtype));
  }
}

}  // namespace

void solver_step_cpu(const StepArgs& a, int x_dtype, int model_dtype, int threads) {
  if (a.n_slots < 0 || a.n_slots > kMaxSlots) {
    throw std::invalid_argument("solver_step_cpu: " + std::to_string(a.n_slots) + " history slots; the kernel keeps at most " +
                                std::to_string(kMaxSlots));
  }
  if (a.n_out < 1) throw std::invalid_argument("solver_step_cpu: n_out must be >= 1");
  if (a.n_out > 1 && a.history == nullptr) {
    throw std::invalid_argument("solver_step_cpu: " + std::to_string(a.n_out) + " outputs need a history tensor");
  }
  const int64_t step = *a.step;
  if (step < 0 || step >= a.n_steps) {
    throw std::invalid_argument("solver_step: step index " + std::to_string(step) + " is outside the table's " +
                                std::to_string(a.n_steps) + " rows");
  }
  const float* row = a.table + step * table_width(a.n_out, a.n_slots);
  const int32_t* irow = a.itable + step * (1 + a.n_out);
  switch (check_row(irow, a)) {
    case 1:
      throw std::invalid_argument("solver_step: row " + std::to_string(step) + " draws noise " + std::to_string(irow[0]) +
                                  " but noise has " + std::to_string(a.n_noise) + " draws");
    case 2:
      throw std::invalid_argument("solver_step: row " + std::to_string(step) + " writes a history slot >= " +
                                  std::to_string(a.n_slots) + " (the history has " + std::to_string(a.n_slots) + " slots)");
    default: break;
  }
  if (a.numel == 0) return;
  switch (x_dtype) {
    case kFloat32: return dispatch_model<float>(a, model_dtype, row, irow, threads);
    case kFloat16: return dispatch_model<Half>(a, model_dtype, row, irow, threads);
    case kBFloat16: return dispatch_model<BFloat16>(a, model_dtype, row, irow, threads);
    default: throw std::invalid_argument("solver_step_cpu: unknown storage dtype code " + std::to_string(x_dtype));
  }
}

}  // namespace diffrt

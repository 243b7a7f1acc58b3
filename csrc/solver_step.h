// The fused solver step, shared by the C++ (CPU) and CUDA kernels.
//
// Spec: kernels/solver_step.py. For each element i of the sample (fp32 arithmetic, this order):
//
//   xv = x[i], mc = cond[i], mu = uncond[i]
//   x0 = pc*mc + px*xv;  x0 = x0 + pu*mu (uncond given)
//   x0 = min(max(x0, lo), hi)  (NaN propagates), then rounded to the storage dtype and back
//   o_k = a_k*xv + b_k*x0;  o_k = o_k + cc_k*mc;  o_k = o_k + cu_k*mu (uncond given);
//   o_k = o_k + d_k*noise[nidx][i] (noise given);  o_k = o_k + w_kj*H[j][i] for j = 0..S-1
//   out[i] = o_0;  H[slot_k][i] = o_k for k >= 1 where slot_k >= 0
//
// Every input of an element is read before any of its outputs is written, so `out` may alias
// `x`, and a history slot may be both read and written. Products and sums go through
// Conv::mul / Conv::add, which never contract into an FMA, so the result rounds exactly
// like the PyTorch reference (one rounding per operation).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DIFFRT_HD __host__ __device__ __forceinline__
#else
#define DIFFRT_HD inline
#endif
// Unrolls a loop with a compile-time trip count in device code (host compilers don't know the pragma).
#if defined(__CUDA_ARCH__)
#define DIFFRT_UNROLL _Pragma("unroll")
#else
#define DIFFRT_UNROLL
#endif

namespace diffrt {

// Storage-dtype codes, shared with kernels/launch.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// History slots one element keeps in registers; the launcher routes larger S to the reference.
constexpr int kMaxSlots = 8;

// Columns before the per-output blocks, and fixed columns per output (then S weights).
constexpr int kX0Cols = 5;
constexpr int kOutFixedCols = 5;

struct StepArgs {
  const void* x;          // [numel], storage dtype
  const void* cond;       // [numel], model dtype
  const void* uncond;     // [numel], model dtype, or null
  void* history;          // [n_slots, numel], storage dtype, or null
  const void* noise;      // [n_noise, numel], storage dtype, or null
  void* out;              // [numel], storage dtype (may equal x)
  const float* table;     // [n_steps, width] fp32
  const int32_t* itable;  // [n_steps, 1 + n_out] int32
  const int64_t* step;    // 0-dim int64 (device pointer for CUDA)
  int64_t numel;
  int64_t n_steps;
  int64_t n_noise;        // 0 when noise is null
  int n_out;
  int n_slots;
  // C++ (CPU) kernel only: when not null, also writes scaled[c * numel + i] = round(widen(out[i]) * scale)
  // for c < scaled_copies: the next step's model input c_in * x (one multiply, as `x * c_in` rounds), twice
  // for a CFG batch [x; x], so the caller needs no extra op.
  void* scaled = nullptr;  // [scaled_copies, numel], storage dtype, or null
  float scale = 1.0f;
  int scaled_copies = 1;
};

DIFFRT_HD int table_width(int n_out, int n_slots) { return kX0Cols + n_out * (kOutFixedCols + n_slots); }

// Whether a row is usable: noise index below n_noise (negative means draw 0, as the
// reference clamps), slots below n_slots. Returns 0, or 1 (noise index) / 2 (slot).
DIFFRT_HD int check_row(const int32_t* irow, const StepArgs& a) {
  if (a.noise != nullptr && a.n_noise > 0 && irow[0] >= a.n_noise) return 1;
  for (int k = 1; k < a.n_out; ++k) {
    if (irow[1 + k] >= a.n_slots) return 2;
  }
  return 0;
}

// NaN-propagating clamp: min(max(v, lo), hi) as torch.maximum / torch.minimum compute it.
DIFFRT_HD float clamp_nan(float v, float lo, float hi) {
  float r = (v != v || lo != lo) ? v + lo : (v < lo ? lo : v);
  return (r != r || hi != hi) ? r + hi : (r > hi ? hi : r);
}

// x0 of one element: pc*mc + px*xv (+ pu*mu), clamped, rounded to the storage dtype T and back.
// `Conv` supplies to_float(T) overloads, round<T>(float) -> T, mul and add.
template <class Conv, class T>
DIFFRT_HD float step_x0(const float* row, float xv, float mc, float mu, bool has_uncond) {
  float x0 = Conv::add(Conv::mul(row[0], mc), Conv::mul(row[2], xv));
  if (has_uncond) x0 = Conv::add(x0, Conv::mul(row[1], mu));
  x0 = clamp_nan(x0, row[3], row[4]);
  return Conv::to_float(Conv::template round<T>(x0));
}

// o_k of one element, before rounding: `c` is the output's kOutFixedCols + S columns, `hist(j)`
// the element's value in history slot j (as float), called for j = 0..S-1 in order. S is a
// compile-time constant, so a caller's per-slot values can live in registers.
template <class Conv, int S, class Hist>
DIFFRT_HD float step_output(const float* c, float xv, float x0, float mc, float mu, float eps, bool has_uncond,
                            bool has_noise, const Hist& hist) {
  float o = Conv::add(Conv::mul(c[0], xv), Conv::mul(c[1], x0));
  o = Conv::add(o, Conv::mul(c[2], mc));
  if (has_uncond) o = Conv::add(o, Conv::mul(c[3], mu));
  if (has_noise) o = Conv::add(o, Conv::mul(c[4], eps));
  DIFFRT_UNROLL
  for (int j = 0; j < S; ++j) o = Conv::add(o, Conv::mul(c[kOutFixedCols + j], hist(j)));
  return o;
}

// The noise draw a row reads (the reference clamps a negative index to 0), or null without noise.
template <class T>
DIFFRT_HD const T* noise_draw(const int32_t* irow, const StepArgs& a) {
  if (a.noise == nullptr || a.n_noise <= 0) return nullptr;
  const int64_t draw = irow[0] < 0 ? 0 : irow[0];
  return static_cast<const T*>(a.noise) + draw * a.numel;
}

// One element i, for a valid row (check_row) of a table with S = a.n_slots history slots.
template <class Conv, class T, class M, int S>
DIFFRT_HD void step_element(int64_t i, const StepArgs& a, const float* row, const int32_t* irow) {
  const int64_t numel = a.numel;
  const bool has_uncond = a.uncond != nullptr;
  const T* noise = noise_draw<T>(irow, a);
  T* const history = static_cast<T*>(a.history);

  const float xv = Conv::to_float(static_cast<const T*>(a.x)[i]);
  const float mc = Conv::to_float(static_cast<const M*>(a.cond)[i]);
  const float mu = has_uncond ? Conv::to_float(static_cast<const M*>(a.uncond)[i]) : 0.0f;
  const float eps = noise != nullptr ? Conv::to_float(noise[i]) : 0.0f;
  float hist[S > 0 ? S : 1];
  DIFFRT_UNROLL
  for (int j = 0; j < S; ++j) hist[j] = Conv::to_float(history[j * numel + i]);

  const float x0 = step_x0<Conv, T>(row, xv, mc, mu, has_uncond);
  for (int k = 0; k < a.n_out; ++k) {
    const float* c = row + kX0Cols + k * (kOutFixedCols + S);
    const T o = Conv::template round<T>(
        step_output<Conv, S>(c, xv, x0, mc, mu, eps, has_uncond, noise != nullptr, [&](int j) { return hist[j]; }));
    if (k == 0) {
      static_cast<T*>(a.out)[i] = o;
    } else if (irow[1 + k] >= 0) {
      history[irow[1 + k] * numel + i] = o;
    }
  }
}

// Entry points (solver_step_cpu.cpp / solver_step_cuda.cu). The CPU one throws
// std::invalid_argument with a message on a bad dtype code, step or row; the CUDA one returns
// a cudaError_t value (0: launched) and marks a bad step or row by writing NaN to `out`.
void solver_step_cpu(const StepArgs& args, int x_dtype, int model_dtype, int threads);
int solver_step_cuda(const StepArgs& args, int x_dtype, int model_dtype, void* stream);

}  // namespace diffrt

// The CUDA solver step's per-thread work and its dispatch, apart from the kernel and its launch
// (solver_step_cuda.cu): everything here is __host__ __device__ or host code, so a test can run it
// on the CPU, thread by thread (tests/solver_step_emulation.cu).
//
// Each thread steps vectors of kVector<T> consecutive elements (16 bytes of the storage dtype: 4
// fp32 or 8 fp16 / bf16 values): x, noise, history and out move in 16-byte loads and stores, cond /
// uncond in pieces of up to 16 bytes, and the S history values of a vector stay in registers (S is
// a template parameter, so every loop over the slots unrolls). The vector path needs every pointer
// 16-byte aligned and, where a history slot or noise draw other than the first is addressed (slot
// j starts at history + j*numel), numel a multiple of the vector; the elements it does not cover
// (the last numel % kVector, or all of them when the pointers do not allow it) go through the
// scalar step_element of solver_step.h. Both read all of an element's inputs before writing its
// outputs, and each element belongs to one thread, so `out` may alias `x`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>

#include "solver_step.h"

namespace diffrt {
namespace cuda_step {

struct DeviceConv {
  static DIFFRT_HD float to_float(float v) { return v; }
  static DIFFRT_HD float to_float(__half v) { return __half2float(v); }
  static DIFFRT_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

  template <class T>
  static DIFFRT_HD T round(float v);

  // One rounding each, never fused into an FMA (on the host: compile with -ffp-contract=off).
  static DIFFRT_HD float mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
  static DIFFRT_HD float add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
  }
};

template <>
DIFFRT_HD float DeviceConv::round<float>(float v) {
  return v;
}
template <>
DIFFRT_HD __half DeviceConv::round<__half>(float v) {
  return __float2half_rn(v);
}
template <>
DIFFRT_HD __nv_bfloat16 DeviceConv::round<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

DIFFRT_HD float quiet_nan() {
#ifdef __CUDA_ARCH__
  return __int_as_float(0x7FC00000);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

constexpr int kThreads = 256;  // per block
constexpr int64_t kMaxBlocks = 8192;
constexpr int kVectorBytes = 16;

// Elements per thread vector: 16 bytes of the storage dtype.
template <class T>
constexpr int kVector = kVectorBytes / static_cast<int>(sizeof(T));

// p[0 .. V) into v, in loads of min(16, V * sizeof(E)) bytes; p must be aligned to that width.
template <int V, class E>
DIFFRT_HD void load_vector(const E* p, E (&v)[V]) {
  constexpr int kPiece = kVectorBytes / static_cast<int>(sizeof(E)) < V ? kVectorBytes / static_cast<int>(sizeof(E)) : V;
  struct alignas(kPiece * sizeof(E)) Piece {
    E e[kPiece];
  };
  DIFFRT_UNROLL
  for (int q = 0; q < V; q += kPiece) {
    const Piece piece = *reinterpret_cast<const Piece*>(p + q);
    DIFFRT_UNROLL
    for (int e = 0; e < kPiece; ++e) v[q + e] = piece.e[e];
  }
}

// v into p[0 .. V), in one 16-byte store (V * sizeof(E) == 16); p must be 16-byte aligned.
template <int V, class E>
DIFFRT_HD void store_vector(E* p, const E (&v)[V]) {
  static_assert(V * sizeof(E) == kVectorBytes, "outputs are stored 16 bytes at a time");
  struct alignas(kVectorBytes) Piece {
    E e[V];
  };
  Piece piece;
  DIFFRT_UNROLL
  for (int e = 0; e < V; ++e) piece.e[e] = v[e];
  *reinterpret_cast<Piece*>(p) = piece;
}

// Elements [i, i + kVector<T>) of a valid row: step_element's formula and order, one vector at a
// time (all loads, then each output's stores).
template <class T, class M, int S>
DIFFRT_HD void step_vector(int64_t i, const StepArgs& a, const float* row, const int32_t* irow) {
  constexpr int V = kVector<T>;
  using C = DeviceConv;
  const int64_t numel = a.numel;
  const bool has_uncond = a.uncond != nullptr;
  const T* noise = noise_draw<T>(irow, a);
  T* const history = static_cast<T*>(a.history);

  T xv[V], eps[V];
  M mc[V], mu[V];
  T hist[S > 0 ? S : 1][V];
  load_vector(static_cast<const T*>(a.x) + i, xv);
  load_vector(static_cast<const M*>(a.cond) + i, mc);
  if (has_uncond) load_vector(static_cast<const M*>(a.uncond) + i, mu);
  if (noise != nullptr) load_vector(noise + i, eps);
  DIFFRT_UNROLL
  for (int j = 0; j < S; ++j) load_vector(history + j * numel + i, hist[j]);

  float x0[V];
  DIFFRT_UNROLL
  for (int e = 0; e < V; ++e) {
    x0[e] = step_x0<C, T>(row, C::to_float(xv[e]), C::to_float(mc[e]), has_uncond ? C::to_float(mu[e]) : 0.0f,
                          has_uncond);
  }
  for (int k = 0; k < a.n_out; ++k) {
    T* const dst = k == 0 ? static_cast<T*>(a.out) : irow[1 + k] >= 0 ? history + irow[1 + k] * numel : nullptr;
    if (dst == nullptr) continue;
    const float* c = row + kX0Cols + k * (kOutFixedCols + S);
    T o[V];
    DIFFRT_UNROLL
    for (int e = 0; e < V; ++e) {
      o[e] = C::round<T>(step_output<C, S>(c, C::to_float(xv[e]), x0[e], C::to_float(mc[e]),
                                           has_uncond ? C::to_float(mu[e]) : 0.0f,
                                           noise != nullptr ? C::to_float(eps[e]) : 0.0f, has_uncond, noise != nullptr,
                                           [&](int j) { return C::to_float(hist[j][e]); }));
    }
    store_vector(dst + i, o);
  }
}

// One thread's share of the step: vectors first, v = first, first + stride, ... (when `vectorized`),
// then the elements after the last whole vector (all of them when not `vectorized`). An invalid row
// fills this share of `out` with NaN.
template <class T, class M, int S>
DIFFRT_HD void step_range(const StepArgs& a, const float* row, const int32_t* irow, bool valid, bool vectorized,
                          int64_t first, int64_t stride) {
  if (!valid) {
    for (int64_t i = first; i < a.numel; i += stride) static_cast<T*>(a.out)[i] = DeviceConv::round<T>(quiet_nan());
    return;
  }
  constexpr int V = kVector<T>;
  const int64_t n_vectors = vectorized ? a.numel / V : 0;
  for (int64_t v = first; v < n_vectors; v += stride) step_vector<T, M, S>(v * V, a, row, irow);
  for (int64_t i = n_vectors * V + first; i < a.numel; i += stride) step_element<DeviceConv, T, M, S>(i, a, row, irow);
}

// Whether the vector path may run: every pointer (null ones pass) 16-byte aligned, and numel a
// multiple of the vector wherever a history slot or noise draw other than the first is addressed.
template <class T>
bool can_vectorize(const StepArgs& a) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kVectorBytes == 0; };
  const bool offsets_aligned = a.numel % kVector<T> == 0 || (a.n_slots <= 1 && a.n_noise <= 1);
  return offsets_aligned && aligned(a.x) && aligned(a.cond) && aligned(a.uncond) && aligned(a.history) &&
         aligned(a.noise) && aligned(a.out);
}

// Blocks of kThreads for a launch: one thread per vector and per element after them (grid-stride
// loops cover the rest above kMaxBlocks blocks).
template <class T>
int grid_blocks(const StepArgs& a, bool vectorized) {
  const int64_t items = vectorized ? a.numel / kVector<T> + a.numel % kVector<T> : a.numel;
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < kMaxBlocks ? wanted : kMaxBlocks);
}

// Calls launcher.run<T, M, S>(a) for S = a.n_slots (0 .. kMaxSlots, checked by the caller).
template <class T, class M, int S = 0, class Launcher>
cudaError_t dispatch_slots(const StepArgs& a, const Launcher& launcher) {
  if constexpr (S < kMaxSlots) {
    if (a.n_slots != S) return dispatch_slots<T, M, S + 1>(a, launcher);
  }
  return launcher.template run<T, M, S>(a);
}

template <class T, class Launcher>
cudaError_t dispatch_model(const StepArgs& a, int model_dtype, const Launcher& launcher) {
  switch (model_dtype) {
    case kFloat32: return dispatch_slots<T, float>(a, launcher);
    case kFloat16: return dispatch_slots<T, __half>(a, launcher);
    case kBFloat16: return dispatch_slots<T, __nv_bfloat16>(a, launcher);
    default: return cudaErrorInvalidValue;
  }
}

// Checks the sizes and dtype codes, then calls launcher.run<T, M, S>(a) for the call's types.
template <class Launcher>
cudaError_t dispatch(const StepArgs& a, int x_dtype, int model_dtype, const Launcher& launcher) {
  if (a.n_slots < 0 || a.n_slots > kMaxSlots || a.n_out < 1 || (a.n_out > 1 && a.history == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (a.numel == 0) return cudaSuccess;
  switch (x_dtype) {
    case kFloat32: return dispatch_model<float>(a, model_dtype, launcher);
    case kFloat16: return dispatch_model<__half>(a, model_dtype, launcher);
    case kBFloat16: return dispatch_model<__nv_bfloat16>(a, model_dtype, launcher);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda_step
}  // namespace diffrt

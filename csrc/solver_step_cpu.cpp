// C++ (CPU) fused solver step: chunks of elements, OpenMP over chunks, 9 (storage x model dtype)
// instantiations, each compiled for baseline x86-64 and for AVX2 + F16C (picked at run time).
//
// Formula and order: solver_step.h (step_element is the per-element spec). The results must be
// bit-identical to the PyTorch reference, which runs one whole-tensor op at a time: every product
// and every sum rounds to fp32 on its own, and the terms of an output are added left to right.
// This file does the same on kChunk elements at a time:
//   1. widen the chunk's inputs to fp32 scratch arrays (fp32 inputs are read in place),
//   2. x0, then each output, term by term: one simple loop over the chunk per term, in exactly
//      the reference's order (o = a*x + b*x0; o = o + cc*mc; o = o + cu*mu; ...). Terms the
//      reference skips (no uncond, no noise) are skipped, not added as zeros: adding 0*v is not
//      a no-op in IEEE arithmetic (-0 + 0 = +0, inf*0 = NaN). Never reorder or merge the terms.
//   3. round and store the outputs, after all of the chunk's inputs were read (`out` may alias
//      `x`, and a history slot may be both read and written).
// The loops vectorise. Vector mul/add round exactly like scalar ones, and the file is compiled
// with -ffp-contract=off, so no `a*b + c` becomes an FMA. The conversions are branch-free (so
// they vectorise too) and give the same bits as half_convert.h for every input.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DIFFRT_X86 1
#endif

#include "half_convert.h"
#include "solver_step.h"

#define DIFFRT_INLINE inline __attribute__((always_inline))

namespace diffrt {
namespace {

// Elements per chunk: one chunk's scratch arrays stay in L1 / L2.
constexpr int kChunk = 1024;
// Below this many elements the step runs on the calling thread (thread start-up costs more).
constexpr int64_t kParallelThreshold = 1 << 15;

// `c ? a : b` as a bit mask. With `?:`, GCC keeps a branch around a float operation in either
// arm (under -ftrapping-math it may not run it speculatively) and the loop does not vectorise.
DIFFRT_INLINE uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}
DIFFRT_INLINE float pick(bool c, float a, float b) { return bits_float(pick(c, float_bits(a), float_bits(b))); }

// clamp_nan of solver_step.h, branch-free; the same bits unless v and a bound are both NaN.
DIFFRT_INLINE float clamp_nan_v(float v, float lo, float hi) {
  const float r = pick((v != v) | (lo != lo), v + lo, pick(v < lo, lo, v));
  return pick((r != r) | (hi != hi), r + hi, pick(r > hi, hi, r));
}

// Conversions: the same bits as half_convert.h for every input (checked exhaustively).
DIFFRT_INLINE float widen(BFloat16 v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }
DIFFRT_INLINE float widen(Half v) {
  const uint32_t h = v.bits, em = h & 0x7FFFu, sign = (h & 0x8000u) << 16;
  const uint32_t normal = (em << 13) + (112u << 23);                            // rebias 15 -> 127
  const uint32_t subnormal = float_bits(bits_float(em | (126u << 23)) - 0.5f);  // (0.5 + m*2^-24) - 0.5, exact
  const uint32_t inf_nan = (em << 13) | 0x7F800000u;                            // payload kept
  return bits_float(sign | pick(em < 0x400u, subnormal, pick(em >= 0x7C00u, inf_nan, normal)));
}

template <class T>
DIFFRT_INLINE T narrow(float v);
template <>
DIFFRT_INLINE BFloat16 narrow<BFloat16>(float v) {
  const uint32_t b = float_bits(v);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;  // ties to even
  return BFloat16{static_cast<uint16_t>(pick((b & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded))};
}
template <>
DIFFRT_INLINE Half narrow<Half>(float v) {
  const uint32_t b = float_bits(v), mag = b & 0x7FFFFFFFu, sign = (b >> 16) & 0x8000u;
  const uint32_t inf_nan = pick(mag > 0x7F800000u, 0x7E00u, 0x7C00u);  // |v| >= 65536; 65520.. rounds up below
  // |v| < 2^-14: adding 0.5 rounds to a multiple of 2^-24 (nearest even); the mantissa is the result.
  const uint32_t subnormal = float_bits(bits_float(mag) + 0.5f) - 0x3F000000u;
  // normal: rebias 127 -> 15 (mod 2^32), add half an ulp (-1 on an even lsb), shift.
  const uint32_t normal = (mag + 0xC8000FFFu + ((mag >> 13) & 1u)) >> 13;
  return Half{static_cast<uint16_t>(sign | pick(mag >= 0x47800000u, inf_nan, pick(mag < 0x38800000u, subnormal, normal)))};
}

#ifdef DIFFRT_X86
// fp16 <-> fp32 with F16C (AVX2 build): exact, and round-to-nearest-even whatever MXCSR says.
// F16C treats NaN payloads its own way, so 8 lanes holding a NaN go through the conversions
// above instead.
#define DIFFRT_AVX2 __attribute__((target("avx2,f16c")))
DIFFRT_AVX2 void widen_f16c(const Half* src, int n, float* dst) {
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c)));
    _mm256_storeu_ps(dst + c, f);
    if (_mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)) != 0) {
      for (int i = c; i < c + 8; ++i) dst[i] = widen(src[i]);
    }
  }
  for (; c < n; ++c) dst[c] = widen(src[c]);
}
DIFFRT_AVX2 void narrow_f16c(const float* src, int n, Half* dst) {
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 f = _mm256_loadu_ps(src + c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (_mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)) != 0) {
      for (int i = c; i < c + 8; ++i) dst[i] = narrow<Half>(src[i]);
    }
  }
  for (; c < n; ++c) dst[c] = narrow<Half>(src[c]);
}
#endif

// A chunk of n inputs as fp32: converted into `scratch`, or read in place when already fp32.
template <bool F16C, class T>
DIFFRT_INLINE const float* load(const T* __restrict src, int n, float* __restrict scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
#ifdef DIFFRT_X86
    if constexpr (F16C && std::is_same_v<T, Half>) {
      widen_f16c(src, n, scratch);
      return scratch;
    }
#endif
    for (int c = 0; c < n; ++c) scratch[c] = widen(src[c]);
    return scratch;
  }
}
// n fp32 values rounded to T.
template <bool F16C, class T>
DIFFRT_INLINE void store(const float* __restrict src, int n, T* __restrict dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
#ifdef DIFFRT_X86
    if constexpr (F16C && std::is_same_v<T, Half>) return narrow_f16c(src, n, dst);
#endif
    for (int c = 0; c < n; ++c) dst[c] = narrow<T>(src[c]);
  }
}

// One term of the formula over a chunk: o = a*x + b*y, or o = o + a*x (one rounding each).
DIFFRT_INLINE void first_terms(float* __restrict o, float a, const float* __restrict x, float b,
                               const float* __restrict y, int n) {
  for (int c = 0; c < n; ++c) o[c] = a * x[c] + b * y[c];
}
DIFFRT_INLINE void add_term(float* __restrict o, float a, const float* __restrict x, int n) {
  for (int c = 0; c < n; ++c) o[c] = o[c] + a * x[c];
}

// Elements [begin, begin + n) of the step; `buf` holds (5 + n_slots + n_out) * kChunk floats.
template <bool F16C, class T, class M>
DIFFRT_INLINE void chunk_body(const StepArgs& a, const float* row, const int32_t* irow, int64_t begin, int n,
                              float* buf) {
  const int64_t numel = a.numel;
  const int S = a.n_slots;
  const bool has_uncond = a.uncond != nullptr;
  const bool has_noise = a.noise != nullptr && a.n_noise > 0;
  float* const x0 = buf;
  float* const in = buf + kChunk;                // x, cond, uncond, noise, history 0..S-1
  float* const outs = in + (4 + S) * kChunk;     // o_0 .. o_{n_out-1}

  // 1. inputs
  const float* xv = load<F16C>(static_cast<const T*>(a.x) + begin, n, in);
  const float* mc = load<F16C>(static_cast<const M*>(a.cond) + begin, n, in + kChunk);
  const float* mu = has_uncond ? load<F16C>(static_cast<const M*>(a.uncond) + begin, n, in + 2 * kChunk) : nullptr;
  const float* eps = nullptr;
  if (has_noise) {
    const int64_t draw = irow[0] < 0 ? 0 : irow[0];  // the reference clamps a negative index to 0
    eps = load<F16C>(static_cast<const T*>(a.noise) + draw * numel + begin, n, in + 3 * kChunk);
  }
  const float* hist[kMaxSlots];
  for (int j = 0; j < S; ++j) {
    hist[j] = load<F16C>(static_cast<const T*>(a.history) + j * numel + begin, n, in + (4 + j) * kChunk);
  }

  // 2a. x0 = pc*mc + px*x; x0 = x0 + pu*mu (uncond); clamp; rounded to the storage dtype and back.
  first_terms(x0, row[0], mc, row[2], xv, n);
  if (has_uncond) add_term(x0, row[1], mu, n);
  const float lo = row[3], hi = row[4];
  if (lo != lo || hi != hi) {  // NaN bound: solver_step.h's clamp, which picks the NaN it propagates
    for (int c = 0; c < n; ++c) x0[c] = clamp_nan(x0[c], lo, hi);
  } else {
    for (int c = 0; c < n; ++c) x0[c] = clamp_nan_v(x0[c], lo, hi);
  }
  if constexpr (!std::is_same_v<T, float>) {
    T rounded[kChunk];
    store<F16C>(x0, n, rounded);
    load<F16C>(rounded, n, x0);
  }

  // 2b. o_k = a*x + b*x0; + cc*mc; + cu*mu (uncond); + d*noise (noise); + w_j*H[j], j = 0..S-1.
  for (int k = 0; k < a.n_out; ++k) {
    const float* cf = row + kX0Cols + k * (kOutFixedCols + S);
    float* o = outs + k * kChunk;
    first_terms(o, cf[0], xv, cf[1], x0, n);
    add_term(o, cf[2], mc, n);
    if (has_uncond) add_term(o, cf[3], mu, n);
    if (has_noise) add_term(o, cf[4], eps, n);
    for (int j = 0; j < S; ++j) add_term(o, cf[kOutFixedCols + j], hist[j], n);
  }

  // 3. stores, in output order (a later output wins a slot written twice, as in the reference).
  store<F16C>(outs, n, static_cast<T*>(a.out) + begin);
  for (int k = 1; k < a.n_out; ++k) {
    if (irow[1 + k] >= 0) store<F16C>(outs + k * kChunk, n, static_cast<T*>(a.history) + irow[1 + k] * numel + begin);
  }

  // 4. the next model input, scaled = out * scale (scaled_copies times): from the rounded output, one
  //    rounding, as `out * c_in`.
  if (a.scaled != nullptr) {
    const float* rounded = outs;
    if constexpr (!std::is_same_v<T, float>) rounded = load<F16C>(static_cast<const T*>(a.out) + begin, n, x0);
    const float scale = a.scale;
    for (int c = 0; c < n; ++c) x0[c] = rounded[c] * scale;
    for (int copy = 0; copy < a.scaled_copies; ++copy) store<F16C>(x0, n, static_cast<T*>(a.scaled) + copy * numel + begin);
  }
}

// The same body compiled twice: for any x86-64 (SSE2), and for AVX2 + F16C.
using ChunkFn = void (*)(const StepArgs&, const float*, const int32_t*, int64_t, int, float*);
template <class T, class M>
void chunk_base(const StepArgs& a, const float* row, const int32_t* irow, int64_t begin, int n, float* buf) {
  chunk_body<false, T, M>(a, row, irow, begin, n, buf);
}
#ifdef DIFFRT_X86
template <class T, class M>
DIFFRT_AVX2 void chunk_avx2(const StepArgs& a, const float* row, const int32_t* irow, int64_t begin, int n, float* buf) {
  chunk_body<true, T, M>(a, row, irow, begin, n, buf);
}
#endif

template <class T, class M>
ChunkFn pick_chunk() {
#ifdef DIFFRT_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (avx2) return &chunk_avx2<T, M>;
#endif
  return &chunk_base<T, M>;
}

template <class T, class M>
void run(const StepArgs& a, const float* row, const int32_t* irow, int threads) {
  const ChunkFn chunk = pick_chunk<T, M>();
  const int64_t numel = a.numel;
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  const size_t per_thread = static_cast<size_t>(5 + a.n_slots + a.n_out) * kChunk;
  int team = 1;
#ifdef _OPENMP
  if (numel >= kParallelThreshold) team = threads > 0 ? threads : omp_get_max_threads();
#endif
  // Scratch kept per calling thread and grown, never shrunk: allocating (and zeroing) it on every call cost
  // more than the step itself on small latents. Sized here: nothing may throw in the parallel region.
  // (thread_local: inside the parallel region `buf` would name each worker's own, empty, vector, so the
  // region uses `scratch`, the calling thread's storage.)
  thread_local std::vector<float> buf;
  if (buf.size() < per_thread * team) buf.resize(per_thread * team);
  float* const scratch = buf.data();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
#endif
  for (int64_t ch = 0; ch < n_chunks; ++ch) {
    int thread = 0;
#ifdef _OPENMP
    thread = omp_get_thread_num();
#endif
    const int64_t begin = ch * kChunk;
    chunk(a, row, irow, begin, static_cast<int>(std::min<int64_t>(kChunk, numel - begin)), scratch + thread * per_thread);
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

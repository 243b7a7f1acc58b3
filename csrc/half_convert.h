// Host-side fp16 / bf16 <-> fp32 conversions without torch (round-to-nearest-even).
//
// float_to_half_bits / float_to_bf16_bits round like torch's `.to(torch.float16)` and
// `.to(torch.bfloat16)`: ties to even, overflow to +-inf, fp16 subnormals kept, NaN stays NaN
// (quiet, sign kept for fp16; canonical 0x7FC0 for bf16, as c10 does). The widening
// conversions are exact. Storage types are 16-bit wrappers so the kernels can be templated on
// them; they are layout-compatible with torch's Half and BFloat16.
#pragma once

#include <cstdint>
#include <cstring>

namespace diffrt {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types");

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// fp16 -> fp32, exact (normals, subnormals, inf, NaN).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) {  // inf / NaN
    return bits_float(sign | 0x7F800000u | (mantissa << 13));
  }
  if (exponent != 0) {  // normal: rebias 15 -> 127
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  if (mantissa == 0) {
    return bits_float(sign);
  }
  int shift = 0;  // subnormal: normalise the mantissa
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shift;
  }
  mantissa &= 0x3FFu;
  return bits_float(sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13));
}

// fp32 -> fp16 bits, round to nearest, ties to even.
inline uint16_t float_to_half_bits(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) {  // NaN -> quiet NaN
    return sign | 0x7E00u;
  }
  if (magnitude >= 0x477FF000u) {  // >= 65520 rounds to inf (and inf itself)
    return sign | 0x7C00u;
  }
  if (magnitude >= 0x38800000u) {  // normal fp16 range: |value| >= 2^-14
    const uint32_t lsb = (magnitude >> 13) & 1u;
    const uint32_t rounded = magnitude + 0xFFFu + lsb;  // add half-ulp (-1 on even lsb): ties to even
    return sign | static_cast<uint16_t>((rounded >> 13) - (112u << 10));
  }
  if (magnitude <= 0x33000000u) {  // |value| <= 2^-25: rounds to zero (the tie 2^-25 goes to even 0)
    return sign;
  }
  // fp16 subnormal: value = m * 2^-24 with m in [1, 1023], rounded to nearest even.
  const uint32_t exponent = magnitude >> 23;          // 102 .. 112
  const uint32_t mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - exponent;             // 14 .. 24: bits dropped below 2^-24
  const uint32_t kept = mantissa >> shift;
  const uint32_t dropped = mantissa & ((1u << shift) - 1u);
  const uint32_t half_way = 1u << (shift - 1u);
  const uint32_t round_up = (dropped > half_way || (dropped == half_way && (kept & 1u))) ? 1u : 0u;
  return sign | static_cast<uint16_t>(kept + round_up);
}

// bf16 -> fp32, exact.
inline float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// fp32 -> bf16 bits, round to nearest, ties to even (c10's round_to_nearest_even).
inline uint16_t float_to_bf16_bits(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    return 0x7FC0u;
  }
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

}  // namespace diffrt

// Per-element math shared by the CPU and CUDA kernels: bf16/fp16 <-> fp32 conversion and the
// correctly rounded fp32 add/mul/div used by every fused loop.
//
// Conversions are integer bit tricks, not hardware converts: some hardware bf16 converts flush
// subnormals, and the CPU tests cover these exact functions, so both backends round alike.
// fp32 -> bf16/fp16 is round-to-nearest-even, bit-identical to torch's `.to(dtype)` for every
// non-NaN input; NaN stays NaN (torch itself is not consistent about NaN payloads across paths).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SG_HD __host__ __device__ __forceinline__
#else
#define SG_HD inline __attribute__((always_inline))
#endif

namespace safegene {

// Storage types: 16-bit patterns tagged with their format, so kernels overload on them.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

SG_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

SG_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Separately rounded fp32 operations. nvcc contracts a*b+c into an FMA by default and the
// host build is compiled with -ffp-contract=off, so results match torch's unfused expression.
SG_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SG_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
SG_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SG_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

SG_HD float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

SG_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  return f != f ? uint16_t(0x7FC0) : uint16_t(rounded);             // NaN: canonical quiet NaN
}

// IEEE half -> float, branch-free (the FP16 library's algorithm by Marat Dukhan, MIT).
SG_HD float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = mul_rn(bits_f32((two_w >> 4) + (0xE0u << 23)), 0x1.0p-112f);
  const float denormalized = sub_rn(bits_f32((two_w >> 17) | (126u << 23)), 0.5f);
  const uint32_t magnitude = two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized);
  return bits_f32(sign | magnitude);
}

// float -> IEEE half, round to nearest even, subnormals kept (same source as above).
SG_HD uint16_t f32_to_f16(float f) {
  const uint32_t w = f32_bits(f);
  const float abs_f = bits_f32(w & 0x7FFFFFFFu);
  float base = mul_rn(mul_rn(abs_f, 0x1.0p+112f), 0x1.0p-110f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = add_rn(bits_f32((bias >> 1) + 0x07800000u), base);
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

SG_HD float to_f32(float v) { return v; }
SG_HD float to_f32(bf16_t v) { return bf16_to_f32(v.bits); }
SG_HD float to_f32(f16_t v) { return f16_to_f32(v.bits); }

template <class T> SG_HD T from_f32(float v);
template <> SG_HD float from_f32<float>(float v) { return v; }
template <> SG_HD bf16_t from_f32<bf16_t>(float v) { return bf16_t{f32_to_bf16(v)}; }
template <> SG_HD f16_t from_f32<f16_t>(float v) { return f16_t{f32_to_f16(v)}; }

// The one formula of merge_dense_ (and the epilogue of merge_lowrank_): w + alpha*d, rounded
// twice in fp32 exactly like torch's `w.float() + alpha * d.float()`, then once to w's dtype.
template <class W, class D>
SG_HD W merged_value(W w, D d, float alpha) {
  return from_f32<W>(add_rn(to_f32(w), mul_rn(alpha, to_f32(d))));
}

// The one formula of delta: a - (b_1 + ... + b_K) / K, summed in fp32 in source order.
SG_HD float delta_value(float a, float sum_b, float k) { return sub_rn(a, div_rn(sum_b, k)); }

// Elementwise select that keeps the storage type (plain bits for the 16-bit types, so loops
// with it still vectorize).
SG_HD float select(bool c, float x, float y) { return c ? x : y; }
SG_HD bf16_t select(bool c, bf16_t x, bf16_t y) { return bf16_t{uint16_t(c ? x.bits : y.bits)}; }
SG_HD f16_t select(bool c, f16_t x, f16_t y) { return f16_t{uint16_t(c ? x.bits : y.bits)}; }

SG_HD bool is_finite_f32(float v) { return (f32_bits(v) & 0x7F800000u) != 0x7F800000u; }

// The one formula of merge_diff: w + alpha * (a - b) as merge_dense_(w, delta(a, [b]), alpha)
// computes it, or w itself where a - b is not finite (ok is false then).
template <class W, class A, class B>
SG_HD W merged_diff_value(W w, A a, B b, float alpha, bool& ok) {
  const float d = sub_rn(to_f32(a), to_f32(b));
  ok = is_finite_f32(d);
  return select(ok, merged_value(w, d, alpha), w);
}

}  // namespace safegene

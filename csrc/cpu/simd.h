// Lanes for the CPU kernels of the fused loss: fp32 work runs on vectors of 8 floats (GCC
// vector extensions: AVX2 instructions in the AVX2 build, pairs of SSE ones in the baseline
// build), fp64 work on plain doubles, one lane. The kernels are written once against Lanes<acc>
// and the shared formulas of mcloss_math.h run unchanged on either (FloatOps<f32x8> below).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "mcloss_math.h"

// Passing 32-byte vectors by value in the baseline (pre-AVX) build changes the calling
// convention; all of these are inline functions within one translation unit, so it is moot.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace MCLOSS_NS {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

template <>
struct FloatOps<f32x8> {
  using Mask = i32x8;  // what a comparison of two f32x8 gives: -1 (true) or 0 per lane
  using Int = i32x8;
  static f32x8 splat(float v) { return f32x8{} + v; }
  static f32x8 select(i32x8 m, f32x8 a, f32x8 b) { return m ? a : b; }
  // as ScalarOps: a NaN in a gives b, which is what the x86 max and min instructions do
  static f32x8 max(f32x8 a, f32x8 b) {
#if defined(__AVX__)
    return _mm256_max_ps(a, b);
#else
    return a > b ? a : b;
#endif
  }
  static f32x8 min(f32x8 a, f32x8 b) {
#if defined(__AVX__)
    return _mm256_min_ps(a, b);
#else
    return a < b ? a : b;
#endif
  }
  static f32x8 mul_add(f32x8 a, f32x8 b, f32x8 c) {
#if defined(__FMA__)
    return _mm256_fmadd_ps(a, b, c);
#else
    return a * b + c;
#endif
  }
  static i32x8 to_int(f32x8 v) { return __builtin_convertvector(v, i32x8); }
  static f32x8 pow2i(i32x8 e) { return reinterpret_cast<f32x8>((e + 127) << 23); }
};

template <typename acc>
struct Lanes;

template <>
struct Lanes<float> {
  using V = f32x8;
  using Mask = i32x8;
  using Index = i32x8;  // a channel index within its group, per lane
  using IndexLane = int32_t;
  static constexpr int N = 8;

  // Buffers hold plain floats and ints (std::vector does not align to 32 bytes), so loads and
  // stores are unaligned ones.
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
  static Index load(const int32_t* p) {
    Index v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(int32_t* p, Index v) { std::memcpy(p, &v, sizeof v); }
  static void store_first(float* p, V v, int64_t n) { std::memcpy(p, &v, n * sizeof(float)); }
  static V splat(float v) { return FloatOps<V>::splat(v); }
  static Index index(int64_t j) { return Index{} + static_cast<int32_t>(j); }
  static Mask lanes_below(int64_t n) {
    const Index iota = {0, 1, 2, 3, 4, 5, 6, 7};
    return iota < static_cast<int32_t>(n);
  }
  static V exp(V v) { return exp_f32(v); }
  // fixed orders, so that results repeat bit for bit
  static float sum(V v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
  static float max(V v) {  // skips NaN lanes, as max_fixed_order does
    float m = v[0];
    for (int l = 1; l < N; ++l) m = v[l] > m ? v[l] : m;
    return m;
  }
};

template <>
struct Lanes<double> {
  using V = double;
  using Mask = bool;
  using Index = int64_t;
  using IndexLane = int64_t;
  static constexpr int N = 1;

  static V load(const double* p) { return *p; }
  static void store(double* p, V v) { *p = v; }
  static Index load(const int64_t* p) { return *p; }
  static void store(int64_t* p, Index v) { *p = v; }
  static void store_first(double* p, V v, int64_t n) {
    if (n > 0) *p = v;
  }
  static V splat(double v) { return v; }
  static Index index(int64_t j) { return j; }
  static Mask lanes_below(int64_t n) { return n > 0; }
  static V exp(V v) { return exp_f64(v); }
  static double sum(V v) { return v; }
  static double max(V v) { return v; }
};

}  // namespace MCLOSS_NS

#pragma GCC diagnostic pop

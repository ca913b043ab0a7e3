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

// AVX instructions (max/min, masked loads and stores) where this copy of the kernels is built
// for AVX2: with -mavx2, or under the `#pragma GCC target("avx2,fma")` of kernels_avx2.cpp,
// which does not define __AVX__, so that file defines MCLOSS_AVX2 itself.
#if defined(__x86_64__) && defined(__GNUC__) && (defined(__AVX__) || defined(MCLOSS_AVX2))
#define MCLOSS_SIMD_AVX 1
#endif

// Passing 32-byte vectors by value in the baseline (pre-AVX) build changes the calling
// convention; all of these are inline functions within one translation unit, so it is moot.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace MCLOSS_NS {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <>
struct FloatOps<f32x8> {
  using Mask = i32x8;  // what a comparison of two f32x8 gives: -1 (true) or 0 per lane
  static f32x8 splat(float v) { return f32x8{} + v; }
  static f32x8 select(i32x8 m, f32x8 a, f32x8 b) { return m ? a : b; }
  // as ScalarOps: a NaN in a gives b, which is what the x86 max and min instructions do
  static f32x8 max(f32x8 a, f32x8 b) {
#if defined(MCLOSS_SIMD_AVX)
    return _mm256_max_ps(a, b);
#else
    return a > b ? a : b;
#endif
  }
  static f32x8 min(f32x8 a, f32x8 b) {
#if defined(MCLOSS_SIMD_AVX)
    return _mm256_min_ps(a, b);
#else
    return a < b ? a : b;
#endif
  }
  static f32x8 mul_add(f32x8 a, f32x8 b, f32x8 c) {
#if defined(MCLOSS_HAS_FMA)
    return _mm256_fmadd_ps(a, b, c);
#else
    return a * b + c;
#endif
  }
  static f32x8 pow2_plus64(f32x8 shifted) {  // as FloatOps<float>, lane by lane
    const u32x8 bits = reinterpret_cast<u32x8>(shifted);
    return reinterpret_cast<f32x8>((bits << 23) + (191u << 23));
  }
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
  // the first n (< N) floats at p, and `pad` in the other lanes; reads nothing beyond p + n
  static V load_first(const float* p, int64_t n, float pad) {
#if defined(MCLOSS_SIMD_AVX)
    const Mask m = lanes_below(n);
    return m ? V(_mm256_maskload_ps(p, reinterpret_cast<__m256i>(m))) : splat(pad);
#else
    float buf[N];
    for (int l = 0; l < N; ++l) buf[l] = l < n ? p[l] : pad;
    return load(buf);
#endif
  }
  // the first n (< N) lanes of v to p; writes nothing beyond p + n
  static void store_first(float* p, V v, int64_t n) {
#if defined(MCLOSS_SIMD_AVX)
    _mm256_maskstore_ps(p, reinterpret_cast<__m256i>(lanes_below(n)), v);
#else
    std::memcpy(p, &v, n * sizeof(float));
#endif
  }
  static V splat(float v) { return FloatOps<V>::splat(v); }
  static Index index(int64_t j) { return Index{} + static_cast<int32_t>(j); }
  static Mask lanes_below(int64_t n) {
    const Index iota = {0, 1, 2, 3, 4, 5, 6, 7};
    return iota < static_cast<int32_t>(n);
  }
  static V exp(V v) { return exp_f32(v); }
  // Reductions across the lanes by a butterfly of shuffles, in one fixed order so that
  // results repeat bit for bit, with the result in every lane (a + b == b + a exactly, so the
  // lanes agree).
  static V sum_all(V v) {
    v += __builtin_shuffle(v, Index{4, 5, 6, 7, 0, 1, 2, 3});
    v += __builtin_shuffle(v, Index{2, 3, 0, 1, 6, 7, 4, 5});
    return v + __builtin_shuffle(v, Index{1, 0, 3, 2, 5, 4, 7, 6});
  }
  // The same for a > b ? a : b, which skips a NaN in b: lanes can then disagree, but a NaN
  // anywhere in a softmax row makes its sum, hence every p, NaN whatever the max.
  static V max_all(V v) {
    V o = __builtin_shuffle(v, Index{4, 5, 6, 7, 0, 1, 2, 3});
    v = v > o ? v : o;
    o = __builtin_shuffle(v, Index{2, 3, 0, 1, 6, 7, 4, 5});
    v = v > o ? v : o;
    o = __builtin_shuffle(v, Index{1, 0, 3, 2, 5, 4, 7, 6});
    return v > o ? v : o;
  }
  static float sum(V v) { return sum_all(v)[0]; }
  static bool any_equal(V v, float s) {
    bool any = false;
    for (int l = 0; l < N; ++l) any |= v[l] == s;
    return any;
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
  static V load_first(const double* p, int64_t n, double pad) { return n > 0 ? *p : pad; }
  static V splat(double v) { return v; }
  static Index index(int64_t j) { return j; }
  static Mask lanes_below(int64_t n) { return n > 0; }
  static V exp(V v) { return exp_f64(v); }
  static V sum_all(V v) { return v; }
  static V max_all(V v) { return v; }
  static double sum(V v) { return v; }
  static bool any_equal(V v, double s) { return v == s; }
};

}  // namespace MCLOSS_NS

#pragma GCC diagnostic pop

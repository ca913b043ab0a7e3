// The per-element math of MC-Loss, shared by the CPU and the CUDA kernels, so that the CPU
// tests exercise the formulas the GPU runs: the exponential, online softmax statistics, the
// first-max rule and the mask rule. Plain C++ with no ATen, usable in __device__ code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MC_HD __host__ __device__ __forceinline__
#else
#define MC_HD inline
#endif

// The CPU kernels are compiled twice, for baseline x86-64 and for AVX2+FMA; the AVX2 copy
// includes this header inside its own namespace (MCLOSS_NS) so the two never share symbols.
#ifndef MCLOSS_NS
#define MCLOSS_NS mcloss
#endif

namespace MCLOSS_NS {

// fp16/bf16/fp32 accumulate in fp32; fp64 stays fp64 (gradcheck needs it).
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// Where element (b, c, k) of a (B, C, H*W) map lives: b*sB + c*sC + k*sK. A contiguous map has
// (C*HW, HW, 1), a channels_last one (HW*C, 1, C); k = h*W + w works for both.
struct MapLayout {
  int64_t sB, sC, sK;
  MC_HD int64_t at(int64_t b, int64_t c, int64_t k) const { return b * sB + c * sC + k * sK; }
};

// Whether this copy of the code may use fused multiply-add on the CPU: built with -mfma
// (__FMA__), or the AVX2+FMA copy of the CPU kernels, whose `#pragma GCC target("avx2,fma")`
// does not define __FMA__, so kernels_avx2.cpp defines MCLOSS_AVX2 before including us.
#if defined(__FMA__) || defined(MCLOSS_AVX2)
#define MCLOSS_HAS_FMA 1
#endif

// How the shared formulas compute on a type F of floats: F is a scalar (float on the GPU and
// the CPU, double for fp64) or, in the CPU kernels, a vector of 8 floats (cpu/simd.h adds
// FloatOps for it). Mask is what a comparison of two F gives (bool for a scalar).
template <typename F>
struct FloatOps;

template <typename T>
struct ScalarOps {
  using Mask = bool;
  MC_HD static T splat(T v) { return v; }
  MC_HD static T select(bool m, T a, T b) { return m ? a : b; }
  // a > b ? a : b and a < b ? a : b: a NaN in a gives b
  MC_HD static T max(T a, T b) { return a > b ? a : b; }
  MC_HD static T min(T a, T b) { return a < b ? a : b; }
};

template <>
struct FloatOps<double> : ScalarOps<double> {};

template <>
struct FloatOps<float> : ScalarOps<float> {
  MC_HD static float mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#elif defined(MCLOSS_HAS_FMA)
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;  // no FMA on baseline x86-64; exp_f32's split of ln 2 keeps it accurate
#endif
  }
  // 2^(n + 64) for the n = round(t) that shifted = t + 1.5 * 2^23 holds in its low mantissa
  // bits (|t| < 2^22, -190 <= n + 64 <= 127): those bits shifted left by 23 are n << 23
  // modulo 2^32, and adding (64 + 127) << 23 makes the float 2^(n + 64).
  MC_HD static float pow2_plus64(float shifted) {
#if defined(__CUDA_ARCH__)
    const unsigned bits = static_cast<unsigned>(__float_as_int(shifted));
    return __int_as_float(static_cast<int>((bits << 23) + (191u << 23)));
#else
    uint32_t bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    bits = (bits << 23) + (191u << 23);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
  }
};

template <typename F>
MC_HD auto is_nan(F v) {
  return v != v;
}

// The first-max rule. Scanning a group's channels in increasing order, a candidate replaces the
// best so far only if it is strictly greater, so among equal maxima the lowest-index channel
// wins; a NaN beats any number and the first NaN stays, so a NaN in a group yields NaN (as
// torch.max does) and its gradient goes to the first NaN channel.
// (Bitwise operators, not short-circuit ones: no branch, and the same expression works lane
// by lane on vectors.)
template <typename F>
MC_HD typename FloatOps<F>::Mask beats(F candidate, F best) {
  return (candidate > best) | ((candidate != candidate) & (best == best));
}

// The mask rule: channel-wise attention multiplies, exactly as the published `x * mask`, so a
// masked channel takes part in the max with value 0 (and NaN * 0 stays NaN).
template <typename F, typename T>
MC_HD F apply_mask(F v, T m) {
  return v * m;
}

// exp(x) in fp32 for x <= 0, within ~2 ulp, with no table and no branch, so that the CPU runs
// it on 8 lanes at once and the GPU runs the very same formula. Softmax only ever takes exp of
// x - max <= 0, so the domain stops at 0 (a larger x is taken as 0). exp(x) = 2^n * exp(r),
// n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two so that n * ln2_hi
// is exact), exp(r) by a degree-6 minimax polynomial (relative error < 2e-9 before rounding).
// 2^n is applied as 2^-64 * 2^(n+64), 2^(n+64) being an exact power of two for every n >= -150,
// with the 2^-64 folded into the polynomial's coefficients (exact: a power of two, and every
// step of the polynomial stays in the normal range), so that the one multiplication by
// 2^(n+64) is the only rounding outside the polynomial and results down to the subnormal
// range round correctly. -inf gives 0 (as does anything below -104, where exp is under half
// the least subnormal); NaN stays NaN.
template <typename F>
MC_HD F exp_f32(F x) {
  using O = FloatOps<F>;
  constexpr float k2m64 = 5.42101086242752217e-20f;  // 2^-64
  // Clamped to [-104, 0]. A NaN passes both clamps (O::max and O::min return their second
  // operand for a NaN) and every step after them, down to p: whatever bits it leaves in the
  // factor 2^(n+64), NaN times them is NaN, so no final test for NaN is needed.
  const F xc = O::min(O::splat(0.0f), O::max(O::splat(-104.0f), x));
  const F shifted = xc * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23
  const F n = shifted - 12582912.0f;  // x / ln 2 rounded to the nearest integer
  F r = O::mul_add(n, O::splat(-0.693359375f), xc);
  r = O::mul_add(n, O::splat(2.12194440e-4f), r);
  // 2^-64 * exp(r)
  F p = O::splat(1.38368458e-3f * k2m64);
  p = O::mul_add(p, r, O::splat(8.37481581e-3f * k2m64));
  p = O::mul_add(p, r, O::splat(4.16682251e-2f * k2m64));
  p = O::mul_add(p, r, O::splat(1.66664198e-1f * k2m64));
  p = O::mul_add(p, r, O::splat(4.99999911e-1f * k2m64));
  p = O::mul_add(p, r, O::splat(k2m64));
  p = O::mul_add(p, r, O::splat(k2m64));
  return p * O::pow2_plus64(shifted);
}

MC_HD double exp_f64(double x) { return exp(x); }

// fp32 exp for x <= 0 (softmax only takes exp of x - max). On the GPU: exp2f(x * log2 e),
// which nvcc compiles to the special-function unit's EX2 (MUFU.EX2, ~2 ulp) plus its range
// scaling, a few instructions instead of exp_f32's dozen; the rounding of x * log2 e adds a
// relative error of at most |x| * 2^-24 * ln 2 ~ 4e-8 |x| (under 1e-6 wherever exp(x) is
// above 2^-30, far below what the fp32 sums lose). On the CPU: exp_f32, 8 lanes at a time.
MC_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x * 1.44269504088896341f);
#else
  return exp_f32(x);
#endif
}
MC_HD double exp_acc(double x) { return exp_f64(x); }

// Softmax statistics of one channel's map: its max M and S = sum_k exp(x_k - M), built online
// one element at a time (add) and combined across threads (merge). NaN and +-Inf behave as in
// torch.softmax: a NaN or a +Inf makes the whole row NaN; -Inf contributes 0; an all -Inf row
// is NaN.
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;

  MC_HD SoftmaxStats() : max(-INFINITY), sum(0) {}
  MC_HD SoftmaxStats(T m, T s) : max(m), sum(s) {}

  MC_HD void add(T v) {
    if (beats(v, max)) {
      // rescale what was summed so far to the new max (0 when nothing was), then add
      // exp(v - v): 1 for a finite v, NaN for +Inf or NaN, as torch.softmax has it
      sum = (sum == T(0) ? T(0) : sum * exp_acc(max - v)) + (T(1) + (v - v));
      max = v;
    } else if (v != -INFINITY) {
      sum += exp_acc(v - max);
    }
  }

  MC_HD void merge(const SoftmaxStats& o) {
    SoftmaxStats hi = *this, lo = o;
    if (beats(o.max, max)) {
      hi = o;
      lo = *this;
    }
    max = hi.max;
    sum = hi.sum + (lo.sum == T(0) ? T(0) : lo.sum * exp_acc(lo.max - hi.max));
  }
};

// p = exp(x - M) / S, evaluated as exp(x - M) * (1 / S) everywhere.
template <typename T>
struct ChannelSoftmax {
  T max;
  T inv_sum;

  MC_HD ChannelSoftmax() : max(0), inv_sum(0) {}
  MC_HD explicit ChannelSoftmax(const SoftmaxStats<T>& s) : max(s.max), inv_sum(T(1) / s.sum) {}
  MC_HD static ChannelSoftmax from(T max, T inv_sum) {
    ChannelSoftmax c;
    c.max = max;
    c.inv_sum = inv_sum;
    return c;
  }
  MC_HD T operator()(T v) const { return exp_acc(v - max) * inv_sum; }
};

// The two per-position winners of a group at one position k, found in one scan over its
// channels: the diversity winner (largest softmax probability) and the discriminality winner
// (largest masked value). Indices are relative to the group's first channel.
template <typename T>
struct GroupWinners {
  T prob, masked;
  int64_t prob_at, masked_at;

  MC_HD GroupWinners() : prob(0), masked(0), prob_at(-1), masked_at(-1) {}

  MC_HD void offer(int64_t j, T p, T mv) {
    if (prob_at < 0 || beats(p, prob)) {
      prob = p;
      prob_at = j;
    }
    if (masked_at < 0 || beats(mv, masked)) {
      masked = mv;
      masked_at = j;
    }
  }
};

// Gradient of one element of a group w.r.t. the features, in the form autograd gives through
// softmax, CCMP and the mask (so that NaN and Inf reach the same elements as there):
//   dx[j,k] = p[j,k] * (g[j,k] - S_j)  +  (gl / HW) * [wm(k) == j] * m_j
// with g[j,k] = gh where channel j wins the diversity max at k (w(k) == j) and 0 elsewhere, and
// S_j = sum_k g[j,k] * p[j,k]. A NaN softmax row (all of its p NaN) makes its whole gradient
// NaN through the factor p, as torch's softmax backward does, whether or not the channel wins
// anywhere. The last term is (gl / HW) * m_j where channel j wins the masked max and 0 * m_j
// elsewhere: the same for a 0/1 mask, and NaN over the channel for an infinite or NaN mask
// value, as autograd's grad * mask gives. Both are taken ready-made, once per channel. With
// average pooling (CCAP) every channel of the group takes part at every position: the term is
// (gl / (HW n_i)) * m_j everywhere (every_channel, gl_per_pos already divided by n_i).
template <typename T>
struct LogitGrad {
  T win, lose;
  MC_HD LogitGrad(T gl_per_pos, T m, bool every_channel)
      : win(gl_per_pos * m), lose(every_channel ? win : T(0) * m) {}
};

template <typename F, typename M>
MC_HD F div_grad_in(F gh, M wins_prob) {
  return FloatOps<F>::select(wins_prob, gh, F{});
}

template <typename F, typename M>
MC_HD F mc_grad(F g_div, F s_div, F p, F logit_win, F logit_lose, M wins_masked) {
  return p * (g_div - s_div) + FloatOps<F>::select(wins_masked, logit_win, logit_lose);
}

// ---- the (B, K) end of the loss: cross-entropy over the logits, and the diversity term

MC_HD float log_acc(float v) {
#if defined(__CUDA_ARCH__)
  return logf(v);
#else
  return std::log(v);
#endif
}
MC_HD double log_acc(double v) {
#if defined(__CUDA_ARCH__)
  return ::log(v);
#else
  return std::log(v);
#endif
}

// log softmax of one row of K logits as torch.log_softmax evaluates it, (v - M) - log S, from
// the row's max M and log S = log sum_i exp(row[i] - M) kept apart: M + log S as one number
// would lose the low bits of log S to the rounding of a large M. NaN and +-inf behave as in
// torch: a NaN or +inf in the row makes log S NaN; an all -inf row gives -inf - -inf = NaN.
template <typename T>
struct RowLogSoftmax {
  T max, log_sum;
  MC_HD RowLogSoftmax(T m, T ls) : max(m), log_sum(ls) {}
  MC_HD static RowLogSoftmax of(const T* row, int64_t K) {
    SoftmaxStats<T> s;
    for (int64_t i = 0; i < K; ++i) s.add(row[i]);
    return RowLogSoftmax(s.max, log_acc(s.sum));
  }
  MC_HD T operator()(T v) const { return (v - max) - log_sum; }
};

// The discriminality cross-entropy's options, as F.cross_entropy takes them: class weights
// (K,) or none, label smoothing eps, and the reduction (at::Reduction: 0 none, 1 mean, 2 sum).
constexpr int64_t kReduceNone = 0, kReduceMean = 1, kReduceSum = 2;

template <typename T>
struct CrossEntropyOptions {
  const T* weight;  // (K,) or null for 1
  T smoothing;
  int64_t reduction;
  MC_HD T weight_of(int64_t i) const { return weight ? weight[i] : T(1); }
};

// One row's cross-entropy before the reduction, F.cross_entropy's:
//   (1 - eps) w_t (-log p_t) + (eps / K) sum_i w_i (-log p_i),   p = softmax(row),
// and w_t, the row's share of the mean's divisor. A class index t outside [0, K) (only a
// direct op call on CUDA can pass one; the checks refuse it everywhere else) gives NaN for
// both instead of reading out of bounds.
template <typename T>
MC_HD T row_cross_entropy(const T* row, const RowLogSoftmax<T>& ls, int64_t t, int64_t K,
                          const CrossEntropyOptions<T>& o, T& target_weight) {
  if (t < 0 || t >= K) {
    target_weight = T(NAN);
    return T(NAN);
  }
  target_weight = o.weight_of(t);
  T ce = -ls(row[t]);
  if (o.weight) ce *= target_weight;
  if (o.smoothing != T(0)) {
    T smooth = 0;
    for (int64_t i = 0; i < K; ++i) smooth += o.weight_of(i) * -ls(row[i]);
    ce = (T(1) - o.smoothing) * ce + o.smoothing / static_cast<T>(K) * smooth;
  }
  return ce;
}

// d row_cross_entropy / d row[i], times the row's gradient g_row:
//   (1 - eps) w_t (p_i - [i == t]) + (eps / K) (W p_i - w_i),   W = sum_i w_i;
// NaN over the row for a class index t outside [0, K), as row_cross_entropy gives.
template <typename T>
MC_HD T ce_logit_grad(T g_row, T logit, const RowLogSoftmax<T>& ls, int64_t i, int64_t t, int64_t K,
                      const CrossEntropyOptions<T>& o, T weight_total) {
  if (t < 0 || t >= K) return T(NAN);
  const T p = exp_acc(ls(logit));
  T d = p - (i == t ? T(1) : T(0));
  if (o.weight) d *= o.weight[t];
  if (o.smoothing != T(0)) {
    d = (T(1) - o.smoothing) * d +
        o.smoothing / static_cast<T>(K) * (weight_total * p - o.weight_of(i));
  }
  return g_row * d;
}

// n_i = offsets[i + 1] - offsets[i] as a divisor. Offsets that are not a partition (only a
// direct op call can pass them to a kernel unchecked) give NaN for an empty or reversed group
// rather than a division by zero or a negative count; the difference is taken unsigned, which
// cannot overflow.
template <typename T>
MC_HD T group_size(const int64_t* offsets, int64_t i) {
  const int64_t lo = offsets[i], hi = offsets[i + 1];
  return hi > lo ? static_cast<T>(static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo)) : T(NAN);
}

// ---- the random channel mask (CWA), drawn where the loss runs
//
// Each channel c of mask row r gets a 64-bit key from Philox4x32-10 (counter-based: the key
// depends only on (seed, offset, r * C + c), so any thread can draw any channel, on the CPU
// and the GPU alike), and in each group the d channels with the smallest keys are dropped
// (ties, about one in 2^64 per pair, go to the lower channel): every d-subset of the group is
// equally likely. seed and offset come from torch's generator (csrc/cpu, csrc/cuda).

struct PhiloxKey {
  uint32_t k0, k1;
};

MC_HD uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11), on counter c under key k.
MC_HD void philox4x32_10(uint32_t c[4], PhiloxKey k) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mul_hi_lo(0xD2511F53u, c[0], hi0);
    const uint32_t lo1 = mul_hi_lo(0xCD9E8D57u, c[2], hi1);
    const uint32_t n0 = hi1 ^ c[1] ^ k.k0, n2 = hi0 ^ c[3] ^ k.k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k.k0 += 0x9E3779B9u;
    k.k1 += 0xBB67AE85u;
  }
}

// The counter as torch's Philox users lay it out (curand_init(seed, subsequence, offset)): the
// generator's offset, in blocks of 4 values, then the subsequence, here the channel's index, so
// that the block (offset / 4, index) belongs to this draw alone.
MC_HD uint64_t channel_key(uint64_t seed, uint64_t offset, uint64_t index) {
  const uint64_t block = offset / 4;
  uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                   static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32)};
  philox4x32_10(c, PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
  return (static_cast<uint64_t>(c[0]) << 32) | c[1];
}

// Channels a group of n drops: `drop` when it is >= 0, else floor(n * fraction) (fraction 0.5:
// the published n // 2), at most n.
MC_HD int64_t dropped_in_group(int64_t n, int64_t drop, double fraction) {
  int64_t d = drop >= 0 ? drop : static_cast<int64_t>(floor(static_cast<double>(n) * fraction));
  return d < 0 ? 0 : (d > n ? n : d);
}

// Whether channel j of a group whose keys are keys[0, n) is kept when d are dropped.
MC_HD bool channel_kept(const uint64_t* keys, int64_t n, int64_t j, int64_t d) {
  int64_t rank = 0;
  const uint64_t mine = keys[j];
  for (int64_t l = 0; l < n; ++l) rank += (keys[l] < mine) | ((keys[l] == mine) & (l < j));
  return rank >= d;
}

// loss, dis and div of a reduction over the batch ("mean" or "sum"), from sums taken in
// double: sum_b ce_b, sum_b w_{t_b} (B without weights) and sum_{b,i} h[b,i] / n_i. Means over
// an empty batch are NaN, as torch's are.
template <typename T>
struct TailScalars {
  T loss, dis, div;
  MC_HD TailScalars(double ce_sum, double target_weight_sum, double h_over_n_sum, int64_t B,
                    int64_t K, int64_t reduction, T alpha, T beta) {
    const double k = static_cast<double>(K);
    if (reduction == kReduceMean) {
      dis = static_cast<T>(ce_sum / target_weight_sum);
      div = static_cast<T>(1.0 - h_over_n_sum / (static_cast<double>(B) * k));
    } else {
      dis = static_cast<T>(ce_sum);
      div = static_cast<T>(static_cast<double>(B) - h_over_n_sum / k);
    }
    loss = alpha * dis + beta * div;
  }
};

// The same for one sample (reduction "none"): its ce and sum_i h[b,i] / n_i.
template <typename T>
struct RowScalars {
  T loss, dis, div;
  MC_HD RowScalars(T ce, double h_over_n_row, int64_t K, T alpha, T beta)
      : dis(ce), div(static_cast<T>(1.0 - h_over_n_row / static_cast<double>(K))) {
    loss = alpha * dis + beta * div;
  }
};

// The gradients the backward pass sends into row b's logits and h, from those of (loss, dis,
// div) (the row's, for "none"): per row of logits (g_dis + alpha g_loss) / sum_b w_{t_b} for
// "mean" (sum_b w_{t_b} = B without weights), per element of h -(g_div + beta g_loss) / (B K
// n_i) for "mean", without the 1/B otherwise.
template <typename T>
struct TailGradScale {
  T per_row, per_h;
  MC_HD TailGradScale(T g_loss, T g_dis, T g_div, T alpha, T beta, int64_t reduction,
                      T target_weight_sum, int64_t B, int64_t K)
      : per_row((g_dis + g_loss * alpha) / (reduction == kReduceMean ? target_weight_sum : T(1))),
        per_h(-(g_div + g_loss * beta) / (reduction == kReduceMean
                                              ? static_cast<T>(B) * static_cast<T>(K)
                                              : static_cast<T>(K))) {}
};

}  // namespace MCLOSS_NS

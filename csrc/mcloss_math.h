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

template <typename T>
MC_HD bool is_nan(T v) {
  return v != v;
}

// The first-max rule. Scanning a group's channels in increasing order, a candidate replaces the
// best so far only if it is strictly greater, so among equal maxima the lowest-index channel
// wins; a NaN beats any number and the first NaN stays, so a NaN in a group yields NaN (as
// torch.max does) and its gradient goes to the first NaN channel.
// (Bitwise operators, not short-circuit ones: no branch, so loops over it vectorise.)
template <typename T>
MC_HD bool beats(T candidate, T best) {
  return (candidate > best) | (is_nan(candidate) & !is_nan(best));
}

// The mask rule: channel-wise attention multiplies, exactly as the published `x * mask`, so a
// masked channel takes part in the max with value 0 (and NaN * 0 stays NaN).
template <typename T>
MC_HD T apply_mask(T v, T m) {
  return v * m;
}

MC_HD float pow2i(int e) {  // 2^e for -126 <= e <= 127, exact
  const int bits = (e + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

MC_HD float mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;  // no FMA on baseline x86-64; exp_f32's split of ln 2 keeps it accurate
#endif
}

// exp for fp32, within ~2 ulp, with no table and no branch, so that GCC vectorises loops over
// it on the CPU and the GPU runs the very same formula. exp(x) = 2^n * exp(r), n = round(x /
// ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two so n * ln2_hi is exact), exp(r)
// by its degree-7 Taylor polynomial (truncation error < 6e-9). 2^n is applied in two halves so
// that results down to the subnormal range round correctly. Overflow gives +inf, -inf gives 0,
// NaN stays NaN.
MC_HD float exp_f32(float x) {
  float xc = x > -104.0f ? x : -104.0f;  // NaN goes to -104 here and is restored at the end
  xc = xc < 89.0f ? xc : 89.0f;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  float r = mul_add(n, -0.693359375f, xc);
  r = mul_add(n, 2.12194440e-4f, r);
  float p = 1.0f / 5040.0f;
  p = mul_add(p, r, 1.0f / 720.0f);
  p = mul_add(p, r, 1.0f / 120.0f);
  p = mul_add(p, r, 1.0f / 24.0f);
  p = mul_add(p, r, 1.0f / 6.0f);
  p = mul_add(p, r, 0.5f);
  p = mul_add(p, r, 1.0f);
  p = mul_add(p, r, 1.0f);
  const int ni = static_cast<int>(n);
  const int n1 = ni / 2;
  const float y = p * pow2i(n1) * pow2i(ni - n1);
  return is_nan(x) ? x : y;
}

MC_HD float exp_acc(float x) {
  return exp_f32(x);
}
MC_HD double exp_acc(double x) {
  return exp(x);
}

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
//   dx[j,k] = p[j,k] * (g[j,k] - S_j)  +  (gl / HW) * m_j * [wm(k) == j]
// with g[j,k] = gh where channel j wins the diversity max at k (w(k) == j) and 0 elsewhere, and
// S_j = sum_k g[j,k] * p[j,k]. A NaN softmax row makes S_j NaN (0 * NaN) and so its whole
// gradient, as torch's softmax backward does, whether or not the channel wins anywhere.
template <typename T>
MC_HD T div_grad_in(T gh, bool wins_prob) {
  return wins_prob ? gh : T(0);
}

template <typename T>
MC_HD T mc_grad(T g_div, T s_div, T p, T gl_per_pos, T m, bool wins_masked) {
  return p * (g_div - s_div) + (wins_masked ? gl_per_pos * m : T(0));
}

// Clamp a group's channel range into [0, C] so that a malformed offsets tensor that reached a
// kernel unchecked (CUDA cannot check values without a sync) can never index out of bounds.
MC_HD void clamp_group(int64_t& c0, int64_t& c1, int64_t C) {
  c0 = c0 < 0 ? 0 : (c0 > C ? C : c0);
  c1 = c1 < c0 ? c0 : (c1 > C ? C : c1);
}

}  // namespace MCLOSS_NS

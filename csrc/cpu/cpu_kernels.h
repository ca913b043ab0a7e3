// The CPU kernels, on raw pointers. Included by two translation units: mcloss_cpu.cpp
// (baseline x86-64, namespace mcloss) and kernels_avx2.cpp (AVX2+FMA, namespace mcloss_avx2).
// Within a channel row or a class group, loops run over the H*W positions with unit stride
// (for contiguous maps) so that GCC vectorises them, exp_f32 included. Every reduction has one
// fixed order, so results repeat bit for bit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/cpu_table.h"
#include "mcloss_math.h"

namespace MCLOSS_NS {
namespace cpu_impl {

using mcloss::cpu::KernelArgs;
using mcloss::cpu::KernelTable;

template <typename scalar_t, typename acc>
inline void load_row(const scalar_t* src, int64_t stride, int64_t n, acc* dst) {
  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc>(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc>(src[k * stride]);
  }
}

template <typename scalar_t, typename acc>
inline void store_row(const acc* src, int64_t n, scalar_t* dst, int64_t stride) {
  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k * stride] = static_cast<scalar_t>(src[k]);
  }
}

// Sum with eight independent partial sums: fast, and still one fixed order.
template <typename acc>
inline acc sum_fixed_order(const acc* v, int64_t n) {
  acc s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int l = 0; l < 8; ++l) s[l] += v[k + l];
  }
  acc tail = 0;
  for (; k < n; ++k) tail += v[k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// The row's max for the softmax shift, with eight independent partial maxima so that it
// vectorises (the inner loop must stay a loop for GCC to if-convert it). A NaN is skipped
// here, harmlessly: exp(NaN - M) makes the row's sum, hence every p, NaN anyway, as a +Inf max
// does through Inf - Inf.
template <typename acc>
inline acc max_fixed_order(const acc* v, int64_t n) {
  acc m[8];
  for (int l = 0; l < 8; ++l) m[l] = v[0];
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
#pragma GCC unroll 1
    for (int l = 0; l < 8; ++l) m[l] = v[k + l] > m[l] ? v[k + l] : m[l];
  }
  for (; k < n; ++k) m[0] = v[k] > m[0] ? v[k] : m[0];
  for (int l = 1; l < 8; ++l) m[0] = m[l] > m[0] ? m[l] : m[0];
  return m[0];
}

// Index of a channel within its group, as wide as acc so that the winner updates vectorise
// alongside the values.
template <typename acc>
using group_idx_t = typename std::conditional<sizeof(acc) == 8, int64_t, int32_t>::type;

// Softmax of one channel's row: the max, then exp(v - M) stored and summed, then scaled by
// 1 / S. The same statistics and the same p = exp(v - M) * (1 / S) as SoftmaxStats and
// ChannelSoftmax, in an order that vectorises.
template <typename acc>
inline void softmax_row(const acc* v, acc* p, int64_t n) {
  const acc m = max_fixed_order(v, n);
  for (int64_t k = 0; k < n; ++k) p[k] = exp_acc(v[k] - m);
  const ChannelSoftmax<acc> softmax(SoftmaxStats<acc>(m, sum_fixed_order(p, n)));
  for (int64_t k = 0; k < n; ++k) p[k] *= softmax.inv_sum;
}

template <typename scalar_t, typename acc>
MapLayout x_layout(const KernelArgs<scalar_t, acc>& a) {
  return MapLayout{a.x_str[0], a.x_str[1], a.x_str[2]};
}

template <typename scalar_t, typename acc>
MapLayout g_layout(const KernelArgs<scalar_t, acc>& a) {
  return MapLayout{a.g_str[0], a.g_str[1], a.g_str[2]};
}

// ---- spatial softmax, over channel rows r = b*C + c

template <typename scalar_t, typename acc>
void spatial_softmax(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  const MapLayout lay = x_layout(a);
  std::vector<acc> v(a.HW), p(a.HW);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t at = lay.at(r / a.C, r % a.C, 0);
    load_row(a.x + at, lay.sK, a.HW, v.data());
    softmax_row(v.data(), p.data(), a.HW);
    store_row(p.data(), a.HW, a.out + at, lay.sK);
  }
}

// dx = p * (g - sum_k g_k p_k); a.x holds the forward's output p, a.grad its gradient (same
// layout)
template <typename scalar_t, typename acc>
void spatial_softmax_backward(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  const MapLayout lay = x_layout(a);
  std::vector<acc> p(a.HW), g(a.HW), gp(a.HW);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t at = lay.at(r / a.C, r % a.C, 0);
    load_row(a.x + at, lay.sK, a.HW, p.data());
    load_row(a.grad + at, lay.sK, a.HW, g.data());
    for (int64_t k = 0; k < a.HW; ++k) gp[k] = g[k] * p[k];
    const acc dot = sum_fixed_order(gp.data(), a.HW);
    for (int64_t k = 0; k < a.HW; ++k) g[k] = p[k] * (g[k] - dot);
    store_row(g.data(), a.HW, a.out + at, lay.sK);
  }
}

// ---- channel mask, over channel rows

template <typename scalar_t, typename acc>
void channel_mask(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  const MapLayout lay = x_layout(a);
  std::vector<acc> v(a.HW);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / a.C, c = r % a.C, at = lay.at(b, c, 0);
    const acc m = static_cast<acc>(a.mask[b * a.mask_bstride + c]);
    load_row(a.x + at, lay.sK, a.HW, v.data());
    for (int64_t k = 0; k < a.HW; ++k) v[k] = apply_mask(v[k], m);
    store_row(v.data(), a.HW, a.out + at, lay.sK);
  }
}

// ---- cross-channel max pooling, over class groups g = b*K + i

// Per position, the first channel of the group holding the max (index within the group) and
// the max itself.
template <typename scalar_t, typename acc>
inline void group_argmax(const KernelArgs<scalar_t, acc>& a, int64_t b, int64_t c0, int64_t n,
                         acc* v, acc* best, group_idx_t<acc>* at_best) {
  const MapLayout lay = x_layout(a);
  load_row(a.x + lay.at(b, c0, 0), lay.sK, a.HW, best);
  for (int64_t k = 0; k < a.HW; ++k) at_best[k] = 0;
  for (int64_t j = 1; j < n; ++j) {
    load_row(a.x + lay.at(b, c0 + j, 0), lay.sK, a.HW, v);
    const group_idx_t<acc> jj = static_cast<group_idx_t<acc>>(j);
    for (int64_t k = 0; k < a.HW; ++k) {
      const bool take = beats(v[k], best[k]);
      best[k] = take ? v[k] : best[k];
      at_best[k] = take ? jj : at_best[k];
    }
  }
}

template <typename scalar_t, typename acc>
void ccmp(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  const MapLayout out_lay = g_layout(a);
  std::vector<acc> v(a.HW), best(a.HW);
  std::vector<group_idx_t<acc>> at_best(a.HW);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t b = g / a.K, i = g % a.K, c0 = a.offsets[i];
    group_argmax(a, b, c0, a.offsets[i + 1] - c0, v.data(), best.data(), at_best.data());
    store_row(best.data(), a.HW, a.out + out_lay.at(b, i, 0), out_lay.sK);
  }
}

// Each output gradient goes whole to the first channel attaining its group's max.
template <typename scalar_t, typename acc>
void ccmp_backward(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  const MapLayout lay = x_layout(a), g_lay = g_layout(a);
  std::vector<acc> v(a.HW), best(a.HW), g(a.HW), d(a.HW);
  std::vector<group_idx_t<acc>> at_best(a.HW);
  for (int64_t gi = begin; gi < end; ++gi) {
    const int64_t b = gi / a.K, i = gi % a.K, c0 = a.offsets[i], n = a.offsets[i + 1] - c0;
    group_argmax(a, b, c0, n, v.data(), best.data(), at_best.data());
    load_row(a.grad + g_lay.at(b, i, 0), g_lay.sK, a.HW, g.data());
    for (int64_t j = 0; j < n; ++j) {
      const group_idx_t<acc> jj = static_cast<group_idx_t<acc>>(j);
      for (int64_t k = 0; k < a.HW; ++k) d[k] = at_best[k] == jj ? g[k] : acc(0);
      store_row(d.data(), a.HW, a.out + lay.at(b, c0 + j, 0), lay.sK);
    }
  }
}

// ---- the fused loss, over class groups

// One scan of a class group: the softmax of every channel (kept in `probs` when given), and
// per position the diversity winner (largest probability) and the discriminality winner
// (largest masked value), both by the first-max rule.
template <typename scalar_t, typename acc>
struct GroupScan {
  using idx = group_idx_t<acc>;
  std::vector<acc> v, p, best_p, best_m;
  std::vector<idx> win_p, win_m;
  explicit GroupScan(int64_t HW) : v(HW), p(HW), best_p(HW), best_m(HW), win_p(HW), win_m(HW) {}

  // The channel's values as acc: read in place when they already are (fp32/fp64, unit
  // stride), else converted into v.
  const acc* row(const KernelArgs<scalar_t, acc>& a, const MapLayout& lay, int64_t b, int64_t c) {
    const scalar_t* src = a.x + lay.at(b, c, 0);
    if (std::is_same<scalar_t, acc>::value && lay.sK == 1) return reinterpret_cast<const acc*>(src);
    load_row(src, lay.sK, a.HW, v.data());
    return v.data();
  }

  void run(const KernelArgs<scalar_t, acc>& a, int64_t b, int64_t c0, int64_t n, acc* probs) {
    const MapLayout lay = x_layout(a);
    const scalar_t* mask_row = a.mask + b * a.mask_bstride;
    const int64_t HW = a.HW;
    for (int64_t j = 0; j < n; ++j) {
      const acc* vj = row(a, lay, b, c0 + j);
      acc* pj = probs ? probs + j * HW : p.data();
      softmax_row(vj, pj, HW);
      const acc m = static_cast<acc>(mask_row[c0 + j]);
      if (j == 0) {
        for (int64_t k = 0; k < HW; ++k) {
          best_p[k] = pj[k];
          best_m[k] = apply_mask(vj[k], m);
          win_p[k] = 0;
          win_m[k] = 0;
        }
        continue;
      }
      const idx jj = static_cast<idx>(j);
      for (int64_t k = 0; k < HW; ++k) {
        const bool take_p = beats(pj[k], best_p[k]);
        best_p[k] = take_p ? pj[k] : best_p[k];
        win_p[k] = take_p ? jj : win_p[k];
        const acc mv = apply_mask(vj[k], m);
        const bool take_m = beats(mv, best_m[k]);
        best_m[k] = take_m ? mv : best_m[k];
        win_m[k] = take_m ? jj : win_m[k];
      }
    }
  }
};

template <typename scalar_t, typename acc>
void mc_loss_forward(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  GroupScan<scalar_t, acc> scan(a.HW);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t b = g / a.K, i = g % a.K, c0 = a.offsets[i];
    scan.run(a, b, c0, a.offsets[i + 1] - c0, nullptr);
    a.h[g] = sum_fixed_order(scan.best_p.data(), a.HW);
    a.logits[g] = sum_fixed_order(scan.best_m.data(), a.HW) / static_cast<acc>(a.HW);
  }
}

// dx[j,k] = p[j,k] * (g[j,k] - S_j) + (gl / HW) * m_j * [wm(k) == j]; see mc_grad
template <typename scalar_t, typename acc>
void mc_loss_backward(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  const MapLayout lay = x_layout(a);
  const int64_t HW = a.HW;
  GroupScan<scalar_t, acc> scan(HW);
  std::vector<acc> probs(a.max_group * HW), d(HW);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t b = g / a.K, i = g % a.K, c0 = a.offsets[i], n = a.offsets[i + 1] - c0;
    const scalar_t* mask_row = a.mask + b * a.mask_bstride;
    scan.run(a, b, c0, n, probs.data());
    const acc gh = a.grad_h[g], gl_per_pos = a.grad_logits[g] / static_cast<acc>(HW);
    for (int64_t j = 0; j < n; ++j) {
      const acc* pj = probs.data() + j * HW;
      const auto jj = static_cast<group_idx_t<acc>>(j);
      // S_j = sum_k g[j,k] p[j,k], g[j,k] = gh where channel j wins the diversity max
      for (int64_t k = 0; k < HW; ++k) d[k] = div_grad_in(gh, scan.win_p[k] == jj) * pj[k];
      const acc s_div = sum_fixed_order(d.data(), HW);
      const acc m = static_cast<acc>(mask_row[c0 + j]);
      scalar_t* out_row = a.out + lay.at(b, c0 + j, 0);
      // straight into dx where it is a contiguous row of acc, else through d
      acc* dst = std::is_same<scalar_t, acc>::value && lay.sK == 1
                     ? reinterpret_cast<acc*>(out_row) : d.data();
      for (int64_t k = 0; k < HW; ++k) {
        dst[k] = mc_grad(div_grad_in(gh, scan.win_p[k] == jj), s_div, pj[k], gl_per_pos, m,
                         scan.win_m[k] == jj);
      }
      if (dst == d.data()) store_row(d.data(), HW, out_row, lay.sK);
    }
  }
}

template <typename scalar_t, typename acc>
void fill_table(KernelTable<scalar_t, acc>& t) {
  t.spatial_softmax = &spatial_softmax<scalar_t, acc>;
  t.spatial_softmax_backward = &spatial_softmax_backward<scalar_t, acc>;
  t.channel_mask = &channel_mask<scalar_t, acc>;
  t.ccmp = &ccmp<scalar_t, acc>;
  t.ccmp_backward = &ccmp_backward<scalar_t, acc>;
  t.mc_loss_forward = &mc_loss_forward<scalar_t, acc>;
  t.mc_loss_backward = &mc_loss_backward<scalar_t, acc>;
}

inline void fill_all(mcloss::cpu::KernelTables& t) {
  fill_table(t.f32);
  fill_table(t.f64);
  fill_table(t.f16);
  fill_table(t.bf16);
}

}  // namespace cpu_impl
}  // namespace MCLOSS_NS

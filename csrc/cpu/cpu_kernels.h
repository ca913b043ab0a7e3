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
#include "cpu/simd.h"
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

// One class group at a time, on Lanes<acc> (8 floats, or 1 double). The group's channels are
// staged into a buffer with each row padded to whole vectors (-inf in the pad, which the
// softmax turns into 0), so every pass after the first runs on full vectors from L1; the pad
// lanes are dropped where a sum over positions is taken.
template <typename scalar_t, typename acc>
struct GroupScan {
  using L = Lanes<acc>;
  using V = typename L::V;
  using Mask = typename L::Mask;
  using Index = typename L::Index;

  int64_t HW, HWp, chunks;
  std::vector<acc> v, e, inv;                       // values, exp(v - M_j), 1 / S_j
  std::vector<acc> m;                               // the group's mask values
  std::vector<typename L::IndexLane> win_p, win_m;  // per position (backward)
  std::vector<acc> g_p;                             // per position, gh * the winning p (backward)
  bool maybe_nan = false;  // the group may hold a NaN p or masked value (see softmax)

  // for_backward: also the per-position buffers win_p, win_m and g_p
  GroupScan(int64_t HW_, int64_t max_group, bool for_backward)
      : HW(HW_),
        HWp((HW_ + L::N - 1) / L::N * L::N),
        chunks(HWp / L::N),
        v(max_group * HWp),
        e(max_group * HWp),
        inv(max_group),
        m(max_group),
        win_p(for_backward ? HWp : 0),
        win_m(for_backward ? HWp : 0),
        g_p(for_backward ? HWp : 0) {}

  // v, e and inv for channels [c0, c0 + n) of sample b: the softmax of every channel, with
  // the same p = exp(v - M) * (1 / S) as ChannelSoftmax. A NaN is skipped by the max,
  // harmlessly: exp(NaN - M) makes S, hence every p, NaN, as a +inf max does through inf - inf.
  // Also notes whether the group can hold a NaN p or masked value (maybe_nan).
  void softmax(const KernelArgs<scalar_t, acc>& a, const MapLayout& lay, int64_t b, int64_t c0,
               int64_t n) {
    using O = FloatOps<V>;
    const int64_t last = (chunks - 1) * L::N;  // where the last, maybe partial, chunk starts
    const Mask valid = L::lanes_below(HW - last);
    V lo = L::splat(INFINITY);  // the group's least value, for -inf
    for (int64_t j = 0; j < n; ++j) {
      acc* vj = v.data() + j * HWp;
      acc* ej = e.data() + j * HWp;
      const scalar_t* src = a.x + lay.at(b, c0 + j, 0);
      V m = L::splat(-INFINITY);
      if (std::is_same<scalar_t, acc>::value && lay.sK == 1) {
        // a row of acc: vectors straight from x, copied and maxed in one go
        const acc* row = reinterpret_cast<const acc*>(src);
        for (int64_t off = 0; off < last; off += L::N) {
          const V x = L::load(row + off);
          L::store(vj + off, x);
          m = x > m ? x : m;
          lo = O::min(x, lo);
        }
        L::store(vj + last, L::load_first(row + last, HW - last, -INFINITY));
      } else {
        load_row(src, lay.sK, HW, vj);
        for (int64_t k = HW; k < HWp; ++k) vj[k] = -INFINITY;
        for (int64_t off = 0; off < last; off += L::N) {
          const V x = L::load(vj + off);
          m = x > m ? x : m;
          lo = O::min(x, lo);
        }
      }
      const V x = L::load(vj + last);  // -inf in the pad lanes
      m = x > m ? x : m;
      lo = O::min(valid ? x : L::splat(INFINITY), lo);
      const V M = L::max_all(m);
      V s{};
      for (int64_t off = 0; off < last; off += L::N) {
        const V ex = L::exp(L::load(vj + off) - M);
        L::store(ej + off, ex);
        s += ex;
      }
      // The pad lanes take exp(0) and are then zeroed: exp(-inf) would go through the
      // subnormal range, which costs the CPU a slow microcode assist per instruction.
      V ex = L::exp(valid ? L::load(vj + last) - M : V{});
      ex = valid ? ex : V{};
      L::store(ej + last, ex);
      s += ex;
      inv[j] = acc(1) / L::sum(s);
    }
    // A p is NaN only where its whole row is (a NaN or +inf in x makes S_j NaN); a masked
    // value only where x is NaN, or +-inf times a mask of 0.
    maybe_nan = L::any_equal(lo, -INFINITY);
    for (int64_t j = 0; j < n; ++j) maybe_nan |= is_nan(inv[j]);
  }

  // Per chunk of positions, the diversity winner (largest p) and the discriminality winner
  // (largest masked value) by the first-max rule, and their values with the pad lanes zeroed.
  // visit(c, best_p, win_p, best_m, win_m) sees each chunk. Without kIndices (the forward)
  // only the values are kept, for which the rule reduces to "greater, or NaN" (a later NaN
  // replacing an earlier one changes no value) and no index is tracked; win_* are then 0.
  template <bool kIndices, typename Visit>
  void winners(const scalar_t* mask_row, int64_t c0, int64_t n, Visit&& visit) {
    bool nan_possible = maybe_nan;
    for (int64_t j = 0; j < n; ++j) {
      m[j] = static_cast<acc>(mask_row[c0 + j]);
      nan_possible |= !(m[j] - m[j] == acc(0));  // a NaN or infinite mask value (not 0/1)
    }
    // Without a NaN, the first-max rule is plain "greater" (and the values a plain max).
    if (nan_possible) {
      scan_winners<kIndices, true>(n, visit);
    } else {
      scan_winners<kIndices, false>(n, visit);
    }
  }

  // (1 / n) sum_j sum_k m_j v[j, k], after winners() (which sets m): the average pooling's
  // logit times HW. The mask multiplies each value, as x * mask does (for a mask value beyond
  // 0/1 the product of the channel's sum would lose or make NaNs: inf - inf, 0 * overflow).
  acc masked_mean(int64_t n) const {
    const int64_t last = (chunks - 1) * L::N;
    const Mask valid = L::lanes_below(HW - last);
    acc total = 0;
    for (int64_t j = 0; j < n; ++j) {
      const acc* vj = v.data() + j * HWp;
      const V mj = L::splat(m[j]);
      V s{};
      for (int64_t off = 0; off < last; off += L::N) s += apply_mask(L::load(vj + off), mj);
      const V x = apply_mask(L::load(vj + last), mj);  // the pad lanes (-inf) dropped after
      s += valid ? x : V{};
      total += L::sum(s);
    }
    return total / static_cast<acc>(n);
  }

 private:
  template <bool kIndices, bool kMaybeNaN, typename Visit>
  void scan_winners(int64_t n, Visit&& visit) const {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t off = c * L::N;
      V best_p = L::load(e.data() + off) * inv[0];
      V best_m = apply_mask(L::load(v.data() + off), m[0]);
      Index at_p{}, at_m{};
      for (int64_t j = 1; j < n; ++j) {
        const V p = L::load(e.data() + j * HWp + off) * inv[j];
        const V mv = apply_mask(L::load(v.data() + j * HWp + off), m[j]);
        if constexpr (kIndices) {
          const Index jj = L::index(j);
          Mask take_p, take_m;
          if constexpr (kMaybeNaN) {
            take_p = beats(p, best_p);
            take_m = beats(mv, best_m);
          } else {
            take_p = p > best_p;
            take_m = mv > best_m;
          }
          best_p = take_p ? p : best_p;
          at_p = take_p ? jj : at_p;
          best_m = take_m ? mv : best_m;
          at_m = take_m ? jj : at_m;
        } else if constexpr (kMaybeNaN) {
          best_p = (p > best_p) | is_nan(p) ? p : best_p;
          best_m = (mv > best_m) | is_nan(mv) ? mv : best_m;
        } else {
          best_p = FloatOps<V>::max(p, best_p);
          best_m = FloatOps<V>::max(mv, best_m);
        }
      }
      if (c == chunks - 1) {
        const Mask valid = L::lanes_below(HW - off);
        best_p = valid ? best_p : V{};
        best_m = valid ? best_m : V{};
      }
      visit(c, best_p, at_p, best_m, at_m);
    }
  }
};

template <typename scalar_t, typename acc>
void mc_loss_forward(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  using V = typename GroupScan<scalar_t, acc>::V;
  const MapLayout lay = x_layout(a);
  GroupScan<scalar_t, acc> scan(a.HW, a.max_group, /*for_backward=*/false);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t b = g / a.K, i = g % a.K, c0 = a.offsets[i], n = a.offsets[i + 1] - c0;
    scan.softmax(a, lay, b, c0, n);
    V sum_p{}, sum_m{};
    scan.template winners<false>(a.mask + b * a.mask_bstride, c0, n,
                                 [&](int64_t, V best_p, auto, V best_m, auto) {
                                   sum_p += best_p;
                                   sum_m += best_m;
                                 });
    a.h[g] = Lanes<acc>::sum(sum_p);
    a.logits[g] =
        (a.avg_pool ? scan.masked_mean(n) : Lanes<acc>::sum(sum_m)) / static_cast<acc>(a.HW);
  }
}

// dx[j,k] = p[j,k] * (g[j,k] - S_j) + (gl / HW) * [wm(k) == j] * m_j; see mc_grad
template <typename scalar_t, typename acc>
void mc_loss_backward(const KernelArgs<scalar_t, acc>& a, int64_t begin, int64_t end) {
  using Scan = GroupScan<scalar_t, acc>;
  using L = Lanes<acc>;
  using V = typename Scan::V;
  using Index = typename Scan::Index;
  const MapLayout lay = x_layout(a);
  const int64_t HW = a.HW;
  Scan scan(HW, a.max_group, /*for_backward=*/true);
  std::vector<acc> d(scan.HWp);
  // straight into dx where its rows are contiguous rows of acc, else through d
  const bool direct = std::is_same<scalar_t, acc>::value && lay.sK == 1;
  for (int64_t g = begin; g < end; ++g) {
    const int64_t b = g / a.K, i = g % a.K, c0 = a.offsets[i], n = a.offsets[i + 1] - c0;
    const scalar_t* mask_row = a.mask + b * a.mask_bstride;
    scan.softmax(a, lay, b, c0, n);
    const V gh = L::splat(a.grad_h[g]);
    scan.template winners<true>(mask_row, c0, n,
                                [&](int64_t c, V best_p, Index at_p, V, Index at_m) {
                                  L::store(scan.win_p.data() + c * L::N, at_p);
                                  L::store(scan.win_m.data() + c * L::N, at_m);
                                  L::store(scan.g_p.data() + c * L::N, gh * best_p);
                                });
    // with average pooling (CCAP) every channel takes 1 / n_i of the group's logit gradient
    const acc gl_per_pos =
        a.grad_logits[g] / static_cast<acc>(HW) / (a.avg_pool ? static_cast<acc>(n) : acc(1));
    for (int64_t j = 0; j < n; ++j) {
      const Index jj = L::index(j);
      // S_j = sum_k g[j,k] p[j,k]: the gh * p of the positions channel j wins (the pad lanes
      // of g_p are 0)
      V s{};
      for (int64_t c = 0; c < scan.chunks; ++c) {
        const int64_t off = c * L::N;
        s += L::load(scan.win_p.data() + off) == jj ? L::load(scan.g_p.data() + off) : V{};
      }
      const V s_j = L::splat(L::sum(s));
      const LogitGrad<acc> gl(gl_per_pos, static_cast<acc>(mask_row[c0 + j]), a.avg_pool);
      const V gl_win = L::splat(gl.win), gl_lose = L::splat(gl.lose);
      const acc* ej = scan.e.data() + j * scan.HWp;
      scalar_t* out_row = a.out + lay.at(b, c0 + j, 0);
      acc* dst = direct ? reinterpret_cast<acc*>(out_row) : d.data();
      for (int64_t c = 0; c < scan.chunks; ++c) {
        const int64_t off = c * L::N;
        const V p = L::load(ej + off) * scan.inv[j];
        const Index at_p = L::load(scan.win_p.data() + off),
                    at_m = L::load(scan.win_m.data() + off);
        const V dx = mc_grad(div_grad_in(gh, at_p == jj), s_j, p, gl_win, gl_lose, at_m == jj);
        if (off + L::N <= HW) {
          L::store(dst + off, dx);
        } else {
          L::store_first(dst + off, dx, HW - off);
        }
      }
      if (!direct) store_row(d.data(), HW, out_row, lay.sK);
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

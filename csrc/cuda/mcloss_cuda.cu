// CUDA kernels. One warp per channel row (spatial softmax) or per class group (the fused
// loss), one thread per output position (CCMP) or element (channel mask). Reductions are warp
// butterflies in a fixed pattern and there are no atomics, so results repeat bit for bit.
// Everything runs on the current stream with no host synchronisation, and every launch is
// checked. The per-element math is mcloss_math.h, the same as the CPU kernels'.
//
// Only the ATen headers needed are included: this file is compiled for several GPU
// architectures and torch/extension.h would multiply the build time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "op_common.h"

namespace mcloss {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(kMaxBlocks, (items + per_block - 1) / per_block)));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Every lane ends with the statistics of the whole row; merge(a, b) and merge(b, a) agree.
template <typename T>
__device__ __forceinline__ SoftmaxStats<T> warp_merge(SoftmaxStats<T> s) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const SoftmaxStats<T> other(__shfl_xor_sync(0xffffffffu, s.max, o),
                                __shfl_xor_sync(0xffffffffu, s.sum, o));
    s.merge(other);
  }
  return s;
}

template <typename scalar_t, typename acc>
__device__ __forceinline__ SoftmaxStats<acc> row_stats(const scalar_t* x, int64_t base, int64_t sK,
                                                       int64_t HW, int lane) {
  SoftmaxStats<acc> s;
  for (int64_t k = lane; k < HW; k += kWarp) s.add(static_cast<acc>(x[base + k * sK]));
  return warp_merge(s);
}

// Whether offsets[0..K] partition [0, C) into K non-empty groups of at most max_group channels
// (what sized the fused loss's tiles; C for ccmp), as the CPU ops check on the host: a CUDA
// host wrapper cannot read the values without a device sync, so every block of the kernels
// that walk the groups (ccmp and the fused loss) checks them (all its threads take part;
// blocks are 1-D) before reading a group, and writes NaN over its share of every output when
// they are not.
__device__ __forceinline__ bool groups_ok(const int64_t* offsets, int64_t K, int64_t C,
                                          int64_t max_group) {
  int ok = threadIdx.x == 0 ? (offsets[0] == 0 && offsets[K] == C) : 1;
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    const int64_t lo = offsets[i], hi = offsets[i + 1];
    // (the size taken unsigned: hi - lo of two int64 can overflow, the unsigned one cannot)
    ok &= lo < hi &&
          static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) <= static_cast<uint64_t>(max_group);
  }
  return __syncthreads_and(ok) != 0;
}

// NaN over out[0, n), this block's share of a grid-stride split.
template <typename T>
__device__ void fill_nan(T* out, int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    out[e] = static_cast<T>(NAN);
  }
}

// ---- spatial softmax: one warp per (b, c) row

template <typename scalar_t>
__global__ void spatial_softmax_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                       MapLayout lay, int64_t rows, int64_t C, int64_t HW) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t base = lay.at(r / C, r % C, 0);
    const ChannelSoftmax<acc> softmax(row_stats<scalar_t, acc>(x, base, lay.sK, HW, lane));
    for (int64_t k = lane; k < HW; k += kWarp) {
      out[base + k * lay.sK] =
          static_cast<scalar_t>(softmax(static_cast<acc>(x[base + k * lay.sK])));
    }
  }
}

template <typename scalar_t>
__global__ void spatial_softmax_backward_kernel(const scalar_t* __restrict__ grad,
                                                const scalar_t* __restrict__ p,
                                                scalar_t* __restrict__ dx, MapLayout lay,
                                                int64_t rows, int64_t C, int64_t HW) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t base = lay.at(r / C, r % C, 0);
    acc dot = 0;
    for (int64_t k = lane; k < HW; k += kWarp) {
      const int64_t at = base + k * lay.sK;
      dot += static_cast<acc>(grad[at]) * static_cast<acc>(p[at]);
    }
    dot = warp_sum(dot);
    for (int64_t k = lane; k < HW; k += kWarp) {
      const int64_t at = base + k * lay.sK;
      const acc pk = static_cast<acc>(p[at]);
      dx[at] = static_cast<scalar_t>(pk * (static_cast<acc>(grad[at]) - dot));
    }
  }
}

// ---- channel mask: one thread per element, in memory order

template <typename scalar_t>
__global__ void channel_mask_kernel(const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ mask, int64_t mask_bstride,
                                    scalar_t* __restrict__ out, MapLayout lay, int64_t numel,
                                    int64_t C, int64_t HW) {
  using acc = acc_t<scalar_t>;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / lay.sB, rest = e % lay.sB;
    const int64_t c = lay.sC == 1 ? rest % C : rest / HW;
    const acc m = static_cast<acc>(mask[b * mask_bstride + c]);
    out[e] = static_cast<scalar_t>(apply_mask(static_cast<acc>(x[e]), m));
  }
}

// ---- CCMP: one thread per output position (b, i, k)

// (after groups_ok)
__device__ __forceinline__ void group_of(const int64_t* offsets, int64_t i, int64_t& c0,
                                         int64_t& c1) {
  c0 = offsets[i];
  c1 = offsets[i + 1];
}

template <typename scalar_t>
__global__ void ccmp_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ offsets,
                            scalar_t* __restrict__ out, MapLayout lay, MapLayout out_lay,
                            int64_t total, int64_t C, int64_t K, int64_t HW) {
  using acc = acc_t<scalar_t>;
  if (!groups_ok(offsets, K, C, C)) return fill_nan(out, total);
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = t % HW, g = t / HW, b = g / K, i = g % K;
    int64_t c0, c1;
    group_of(offsets, i, c0, c1);
    acc best = static_cast<acc>(x[lay.at(b, c0, k)]);
    for (int64_t c = c0 + 1; c < c1; ++c) {
      const acc v = static_cast<acc>(x[lay.at(b, c, k)]);
      best = beats(v, best) ? v : best;
    }
    out[out_lay.at(b, i, k)] = static_cast<scalar_t>(best);
  }
}

template <typename scalar_t>
__global__ void ccmp_backward_kernel(const scalar_t* __restrict__ grad,
                                     const scalar_t* __restrict__ x,
                                     const int64_t* __restrict__ offsets, scalar_t* __restrict__ dx,
                                     MapLayout lay, MapLayout g_lay, int64_t total, int64_t C,
                                     int64_t K, int64_t HW) {
  using acc = acc_t<scalar_t>;
  if (!groups_ok(offsets, K, C, C)) return fill_nan(dx, total / K * C);
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = t % HW, g = t / HW, b = g / K, i = g % K;
    int64_t c0, c1;
    group_of(offsets, i, c0, c1);
    acc best = static_cast<acc>(x[lay.at(b, c0, k)]);
    int64_t at_best = c0;
    for (int64_t c = c0 + 1; c < c1; ++c) {
      const acc v = static_cast<acc>(x[lay.at(b, c, k)]);
      if (beats(v, best)) {
        best = v;
        at_best = c;
      }
    }
    const scalar_t gk = grad[g_lay.at(b, i, k)];
    for (int64_t c = c0; c < c1; ++c) dx[lay.at(b, c, k)] = c == at_best ? gk : scalar_t(0);
  }
}

// ---- the fused loss
//
// Forward: one kernel computes every group's diversity sum h and logit, a second (one block)
// the (B, K) tail; backward: one kernel computes the tail's gradients for its groups and then
// dx. With the mask drawn inside (Philox, seed and offset from torch's generator) a training
// step launches three kernels.
//
// Tiles (the usual path): a block takes a tile, consecutive whole groups of one batch row,
// reads it once from global memory into shared memory (16-byte loads for contiguous maps,
// coalesced rows for channels_last) and does everything else there: per-channel softmax
// statistics (a warp per channel), the per-position winners, the group sums (a warp per group,
// fixed order) and, backward, each channel's S_j (a warp per channel over the winners kept per
// position) and dx, written once (16-byte stores). A group that does not fit in shared memory
// goes to the stream kernels: a warp per group, the features read from global memory once per
// pass, the statistics in a (B, C) scratch.

// Threads per tile block: up to 256, fewer for small tiles (TilePlan::threads), so that a
// tile of a few hundred elements does not leave most of a block idle.
constexpr int kTileThreads = 256;

// A class index outside [0, K): NaN has been written where it was used; stop the kernel, as
// cross_entropy's device-side assert does (a launch failure at the next synchronisation; the
// Python API says which value with MCLOSS_SYNC_CHECKS=1). No printf: its argument buffer would
// put local memory into every fused kernel.
__device__ __forceinline__ void trap_if_bad_target(int64_t t, int64_t K) {
  if (t < 0 || t >= K) __trap();
}

// Where each channel's mask value comes from: a given mask (bool or x's dtype, row stride 0 or
// C), or the draw of mcloss_math.h, whose mask the forward also writes out.
struct MaskSource {
  const void* values;  // null: draw
  bool is_bool;
  int64_t bstride;
  at::PhiloxCudaState philox;
  int64_t drop;
  double drop_fraction;
  bool per_sample;  // drawn: a row per sample, else one for the batch
  bool* drawn;      // drawn: (rows, C), the mask used
  int64_t rows;

  __device__ __forceinline__ bool draws() const { return values == nullptr; }
  template <typename scalar_t, typename acc>
  __device__ __forceinline__ acc given(int64_t b, int64_t c) const {
    const int64_t at = b * bstride + c;
    return is_bool ? static_cast<acc>(static_cast<const bool*>(values)[at])
                   : static_cast<acc>(static_cast<const scalar_t*>(values)[at]);
  }
  __device__ __forceinline__ int64_t row_of(int64_t b) const { return per_sample ? b : 0; }
  // whether this block writes the drawn values of batch row b (one writer per mask row)
  __device__ __forceinline__ bool writes(int64_t b) const {
    return drawn != nullptr && (per_sample || b == 0);
  }
};

// What both fused passes read.
template <typename scalar_t>
struct LossParams {
  const scalar_t* x;
  MapLayout lay;
  const int64_t* offsets;
  const int64_t* targets;
  MaskSource mask;
  int64_t B, C, K, HW, max_group;
  bool avg_pool;  // the logits average the group's masked channels (CCAP), not their max
};

// What the backward takes from upstream: the gradients of loss, dis and div (null for zero;
// 0-dim, or (B,) with reduction none: g_stride 0 or 1), of the logits (B, K, or null), the
// forward's logits, lse and weight_sums, and the cross-entropy's options.
template <typename acc>
struct UpstreamGrads {
  const acc *g_loss, *g_dis, *g_div, *g_logits, *logits, *lse, *weight_sums;
  int64_t g_stride;
  acc alpha, beta;
  CrossEntropyOptions<acc> ce;

  __device__ __forceinline__ acc term(const acc* g, int64_t b) const {
    return g ? g[b * g_stride] : acc(0);
  }
};

// The gradients the tail sends to group (b, i): of its h (gh) and its logit (gl).
template <typename acc>
__device__ __forceinline__ void group_grads(const UpstreamGrads<acc>& u, const int64_t* offsets,
                                            const int64_t* targets, int64_t b, int64_t i, int64_t B,
                                            int64_t K, acc& gh, acc& gl) {
  const int64_t e = b * K + i, t = targets[b];
  // sum_b weight[t_b] and sum_i weight[i], the forward's (B and K without weights)
  const acc target_weight_sum = u.weight_sums ? u.weight_sums[0] : static_cast<acc>(B);
  const acc weight_total = u.weight_sums ? u.weight_sums[1] : static_cast<acc>(K);
  const TailGradScale<acc> scale(u.term(u.g_loss, b), u.term(u.g_dis, b), u.term(u.g_div, b),
                                 u.alpha, u.beta, u.ce.reduction, target_weight_sum, B, K);
  const RowLogSoftmax<acc> ls(u.lse[2 * b], u.lse[2 * b + 1]);
  gh = scale.per_h / group_size<acc>(offsets, i);
  gl = (u.g_logits ? u.g_logits[e] : acc(0)) +
       ce_logit_grad(scale.per_row, u.logits[e], ls, i, t, K, u.ce, weight_total);
  trap_if_bad_target(t, K);
}

// NaN over h and the logits (and so over everything the tail computes from them), and a
// drawn mask of all False: the groups cannot be used.
template <typename scalar_t>
__device__ void fill_unusable(const LossParams<scalar_t>& p, acc_t<scalar_t>* h,
                              acc_t<scalar_t>* logits) {
  fill_nan(h, p.B * p.K);
  fill_nan(logits, p.B * p.K);
  if (p.mask.drawn == nullptr) return;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.mask.rows * p.C;
       e += int64_t(gridDim.x) * blockDim.x) {
    p.mask.drawn[e] = false;
  }
}

// ---- tiles

// How the host cut the groups into tiles.
struct TilePlan {
  int64_t groups_per_tile, tiles_per_row;
  int threads;  // per block: a multiple of 32, at most kTileThreads
  int64_t ld;   // a channel's row stride in the tile: H*W, odd for channels_last (the
                // transposing writes then hit distinct banks)
};

// One tile's shared memory, carved from the dynamic allocation in this order (8-byte items
// first); the host sizes the allocation with the same function.
template <typename acc>
struct TileMem {
  uint64_t* key;     // [nch] the draw's channel keys
  acc* x;            // [nch * ld] the features
  acc *cmax, *cinv;  // [nch] softmax statistics
  acc* cmask;        // [nch] mask values
  acc* s;            // [nch] backward: S_j
  acc* win;          // [items] forward: the best probability; backward: gh times it
  acc* win_m;        // [items] forward: the best masked value
  acc *gh, *glpp;    // [gpt] backward: gradient of h, of the logit per position
  int *at_p, *at_m;  // [items] backward: the winners (channel within the group)
  int* grp;          // [nch] the group of each channel in the tile
  int* gstart;       // [gpt + 1] where each group starts in the tile

  // Bytes for gpt groups of up to max_group channels; the pointers too when base is given.
  __host__ __device__ static size_t carve(unsigned char* base, int64_t gpt, int64_t max_group,
                                          int64_t HW, int64_t ld, bool backward, TileMem* m) {
    const size_t nch = static_cast<size_t>(gpt * max_group), items = static_cast<size_t>(gpt * HW);
    size_t at = 0;
    auto take = [&](size_t bytes) {
      unsigned char* p = base ? base + at : nullptr;
      at += (bytes + 15) & ~size_t(15);
      return p;
    };
    TileMem t{};
    t.key = reinterpret_cast<uint64_t*>(take(nch * sizeof(uint64_t)));
    t.x = reinterpret_cast<acc*>(take(nch * static_cast<size_t>(ld) * sizeof(acc)));
    t.cmax = reinterpret_cast<acc*>(take(nch * sizeof(acc)));
    t.cinv = reinterpret_cast<acc*>(take(nch * sizeof(acc)));
    t.cmask = reinterpret_cast<acc*>(take(nch * sizeof(acc)));
    t.win = reinterpret_cast<acc*>(take(items * sizeof(acc)));
    if (backward) {
      t.s = reinterpret_cast<acc*>(take(nch * sizeof(acc)));
      t.gh = reinterpret_cast<acc*>(take(gpt * sizeof(acc)));
      t.glpp = reinterpret_cast<acc*>(take(gpt * sizeof(acc)));
      t.at_p = reinterpret_cast<int*>(take(items * sizeof(int)));
      t.at_m = reinterpret_cast<int*>(take(items * sizeof(int)));
    } else {
      t.win_m = reinterpret_cast<acc*>(take(items * sizeof(acc)));
    }
    t.grp = reinterpret_cast<int*>(take(nch * sizeof(int)));
    t.gstart = reinterpret_cast<int*>(take((gpt + 1) * sizeof(int)));
    if (m) *m = t;
    return at;
  }
};

// 16 bytes of scalar_t, loaded and stored as one vector.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int n = 16 / sizeof(scalar_t);
  scalar_t v[n];
};

// Elements of [0, n) before p + n_head is 16-byte aligned.
template <typename scalar_t>
__device__ __forceinline__ int64_t unaligned_head(const scalar_t* p, int64_t n) {
  const int64_t head = ((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15) / sizeof(scalar_t);
  return head < n ? head : n;
}

// The block reads src[0, n) once, 16 bytes per load where aligned, calling put(e, value).
template <typename scalar_t, typename Put>
__device__ __forceinline__ void load_span(const scalar_t* __restrict__ src, int64_t n, Put put) {
  using V = Vec16<scalar_t>;
  const int64_t head = unaligned_head(src, n), nv = (n - head) / V::n;
  for (int64_t e = threadIdx.x; e < head; e += blockDim.x) put(e, src[e]);
  const V* body = reinterpret_cast<const V*>(src + head);
#pragma unroll 4
  for (int64_t q = threadIdx.x; q < nv; q += blockDim.x) {
    const V r = body[q];
#pragma unroll
    for (int j = 0; j < V::n; ++j) put(head + q * V::n + j, r.v[j]);
  }
  for (int64_t e = head + nv * V::n + threadIdx.x; e < n; e += blockDim.x) put(e, src[e]);
}

// The block writes dst[0, n) once, 16 bytes per store where aligned; get(e, e_count, out)
// fills out[0, e_count) with the values of elements e, e + 1, ...
template <typename scalar_t, typename Get>
__device__ __forceinline__ void store_span(scalar_t* __restrict__ dst, int64_t n, Get get) {
  using V = Vec16<scalar_t>;
  const int64_t head = unaligned_head(dst, n), nv = (n - head) / V::n;
  for (int64_t e = threadIdx.x; e < head; e += blockDim.x) get(e, 1, dst + e);
  V* body = reinterpret_cast<V*>(dst + head);
  for (int64_t q = threadIdx.x; q < nv; q += blockDim.x) {
    V r;
    get(head + q * V::n, V::n, r.v);
    body[q] = r;
  }
  for (int64_t e = head + nv * V::n + threadIdx.x; e < n; e += blockDim.x) get(e, 1, dst + e);
}

// One tile in shared memory: batch row b, groups [i0, i0 + ng), channels [ca, ca + nch).
struct TileSpan {
  int64_t b, i0, ng, ca, nch;
};

// Reads tile t into shared memory and fills in its groups, mask values and softmax
// statistics (the draw's mask written out where this block owns the row). Ends synchronised.
template <typename scalar_t, typename acc>
__device__ TileSpan load_tile(const LossParams<scalar_t>& p, const TilePlan& plan,
                              const TileMem<acc>& m, int64_t t) {
  TileSpan s;
  s.b = t / plan.tiles_per_row;
  s.i0 = (t % plan.tiles_per_row) * plan.groups_per_tile;
  s.ng = p.K - s.i0 < plan.groups_per_tile ? p.K - s.i0 : plan.groups_per_tile;
  s.ca = p.offsets[s.i0];
  s.nch = p.offsets[s.i0 + s.ng] - s.ca;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp, nwarps = blockDim.x / kWarp;
  const int64_t HW = p.HW, ld = plan.ld;
  for (int64_t g = tid; g <= s.ng; g += blockDim.x)
    m.gstart[g] = static_cast<int>(p.offsets[s.i0 + g] - s.ca);
  acc* xs = m.x;
  if (p.lay.sK == 1) {  // contiguous: the tile is one span of nch * HW elements (ld == HW)
    load_span(p.x + p.lay.at(s.b, s.ca, 0), s.nch * HW,
              [&](int64_t e, scalar_t v) { xs[e] = static_cast<acc>(v); });
  } else {  // channels_last: nch contiguous channels at each position, transposed into rows
    // (tile-local indices fit 32 bits: a tile is at most a few hundred KiB)
    const scalar_t* src = p.x + p.lay.at(s.b, s.ca, 0);
    const int nch = static_cast<int>(s.nch), n = static_cast<int>(s.nch * HW);
    for (int e = tid; e < n; e += blockDim.x) {
      const int k = e / nch, c = e - k * nch;
      xs[c * ld + k] = static_cast<acc>(src[int64_t(k) * p.lay.sK + c]);
    }
  }
  const bool draws = p.mask.draws();
  uint64_t seed = 0, offset = 0;
  if (draws) {
    const auto so = at::cuda::philox::unpack(p.mask.philox);
    seed = std::get<0>(so);
    offset = std::get<1>(so);
    const int64_t row = p.mask.row_of(s.b);
    for (int64_t c = tid; c < s.nch; c += blockDim.x) {
      m.key[c] = channel_key(seed, offset, static_cast<uint64_t>(row * p.C + s.ca + c));
    }
  }
  __syncthreads();
  for (int64_t c = tid; c < s.nch; c += blockDim.x) {
    int g = 0;
    while (m.gstart[g + 1] <= c) ++g;
    m.grp[c] = g;
    if (draws) {
      const int64_t n = m.gstart[g + 1] - m.gstart[g];
      const bool kept = channel_kept(m.key + m.gstart[g], n, c - m.gstart[g],
                                     dropped_in_group(n, p.mask.drop, p.mask.drop_fraction));
      m.cmask[c] = kept ? acc(1) : acc(0);
      if (p.mask.writes(s.b)) p.mask.drawn[p.mask.row_of(s.b) * p.C + s.ca + c] = kept;
    } else {
      m.cmask[c] = p.mask.template given<scalar_t, acc>(s.b, s.ca + c);
    }
  }
  for (int64_t c = warp; c < s.nch; c += nwarps) {
    SoftmaxStats<acc> st;
    for (int64_t k = lane; k < HW; k += kWarp) st.add(xs[c * ld + k]);
    st = warp_merge(st);
    if (lane == 0) {
      const ChannelSoftmax<acc> softmax(st);
      m.cmax[c] = softmax.max;
      m.cinv[c] = softmax.inv_sum;
    }
  }
  __syncthreads();
  return s;
}

// Position k of tile group g: both winners.
template <typename acc>
__device__ __forceinline__ GroupWinners<acc> tile_winners(const TileMem<acc>& m, int64_t ld, int g,
                                                          int64_t k) {
  GroupWinners<acc> w;
  const int c0 = m.gstart[g], c1 = m.gstart[g + 1];
  for (int c = c0; c < c1; ++c) {
    const acc v = m.x[c * ld + k];
    w.offer(c - c0, ChannelSoftmax<acc>::from(m.cmax[c], m.cinv[c])(v), apply_mask(v, m.cmask[c]));
  }
  return w;
}

// sum_{j in G_g} m_j x[j, k] of a tile's group at position k: average pooling's (CCAP) term
// of the logit (divided by n_i with the rest). Summed where the logit is, not beside the
// winners: the fp64 winners loop has no register to spare.
template <typename acc>
__device__ __forceinline__ acc tile_masked_sum(const TileMem<acc>& m, int64_t ld, int g,
                                               int64_t k) {
  acc sum = 0;
  for (int c = m.gstart[g]; c < m.gstart[g + 1]; ++c)
    sum += apply_mask(m.x[c * ld + k], m.cmask[c]);
  return sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads)
    mc_loss_tile_forward_kernel(LossParams<scalar_t> p, TilePlan plan,
                                acc_t<scalar_t>* __restrict__ h_over_n,
                                acc_t<scalar_t>* __restrict__ logits) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char tile_smem[];
  if (!groups_ok(p.offsets, p.K, p.C, p.max_group)) return fill_unusable(p, h_over_n, logits);
  TileMem<acc> m;
  TileMem<acc>::carve(tile_smem, plan.groups_per_tile, p.max_group, p.HW, plan.ld, false, &m);
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp, nwarps = blockDim.x / kWarp;
  for (int64_t t = blockIdx.x; t < p.B * plan.tiles_per_row; t += gridDim.x) {
    const TileSpan s = load_tile(p, plan, m, t);
    for (int64_t q = tid; q < s.ng * p.HW; q += blockDim.x) {
      const int g = static_cast<int>(q / p.HW);
      const GroupWinners<acc> w = tile_winners(m, plan.ld, g, q - g * p.HW);
      m.win[q] = w.prob;
      m.win_m[q] = w.masked;
    }
    __syncthreads();
    for (int64_t g = warp; g < s.ng; g += nwarps) {
      acc hs = 0, ls = 0;
      for (int64_t k = lane; k < p.HW; k += kWarp) {
        hs += m.win[g * p.HW + k];
        ls += p.avg_pool ? tile_masked_sum(m, plan.ld, static_cast<int>(g), k)
                         : m.win_m[g * p.HW + k];
      }
      hs = warp_sum(hs);
      ls = warp_sum(ls);
      if (lane == 0) {
        const int64_t n = m.gstart[g + 1] - m.gstart[g];
        h_over_n[s.b * p.K + s.i0 + g] = hs / static_cast<acc>(n);
        // one division (fp64's is a call with a slow path): by HW, times n_i for CCAP
        logits[s.b * p.K + s.i0 + g] = ls / static_cast<acc>(p.avg_pool ? p.HW * n : p.HW);
      }
    }
    __syncthreads();  // before the next tile reuses the shared memory
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads)
    mc_loss_tile_backward_kernel(LossParams<scalar_t> p, TilePlan plan,
                                 UpstreamGrads<acc_t<scalar_t>> u, scalar_t* __restrict__ dx) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char tile_smem[];
  if (!groups_ok(p.offsets, p.K, p.C, p.max_group)) return fill_nan(dx, p.B * p.C * p.HW);
  TileMem<acc> m;
  TileMem<acc>::carve(tile_smem, plan.groups_per_tile, p.max_group, p.HW, plan.ld, true, &m);
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp, nwarps = blockDim.x / kWarp;
  const int64_t HW = p.HW, ld = plan.ld;
  for (int64_t t = blockIdx.x; t < p.B * plan.tiles_per_row; t += gridDim.x) {
    const TileSpan s = load_tile(p, plan, m, t);
    for (int64_t g = tid; g < s.ng; g += blockDim.x) {
      acc gh, gl;
      group_grads(u, p.offsets, p.targets, s.b, s.i0 + g, p.B, p.K, gh, gl);
      m.gh[g] = gh;
      // with average pooling (CCAP) every channel takes 1 / n_i of the logit's gradient
      const int64_t n = m.gstart[g + 1] - m.gstart[g];
      m.glpp[g] = gl / static_cast<acc>(p.avg_pool ? HW * n : HW);
    }
    __syncthreads();
    for (int64_t q = tid; q < s.ng * HW; q += blockDim.x) {
      const int g = static_cast<int>(q / HW);
      const GroupWinners<acc> w = tile_winners(m, ld, g, q - g * HW);
      m.at_p[q] = static_cast<int>(w.prob_at);
      m.at_m[q] = static_cast<int>(w.masked_at);
      m.win[q] = m.gh[g] * w.prob;  // its share of S_j for the winner j
    }
    __syncthreads();
    // S_j = sum_k g[j,k] p[j,k] (see mc_grad): the shares of the positions channel j wins
    for (int64_t c = warp; c < s.nch; c += nwarps) {
      const int g = m.grp[c], j = static_cast<int>(c) - m.gstart[g];
      acc sum = 0;
      for (int64_t k = lane; k < HW; k += kWarp) {
        const int64_t q = g * HW + k;
        sum += m.at_p[q] == j ? m.win[q] : acc(0);
      }
      sum = warp_sum(sum);
      if (lane == 0) m.s[c] = sum;
    }
    __syncthreads();
    // dx[c, k] of the tile, from shared memory only
    auto grad_at = [&](int64_t c, int64_t k) {
      const int g = m.grp[c], j = static_cast<int>(c) - m.gstart[g];
      const int64_t q = g * HW + k;
      const acc pk = ChannelSoftmax<acc>::from(m.cmax[c], m.cinv[c])(m.x[c * ld + k]);
      const LogitGrad<acc> gl(m.glpp[g], m.cmask[c], p.avg_pool);
      return static_cast<scalar_t>(mc_grad(div_grad_in(m.gh[g], m.at_p[q] == j), m.s[c], pk, gl.win,
                                           gl.lose, m.at_m[q] == j));
    };
    if (p.lay.sK == 1) {
      store_span(dx + p.lay.at(s.b, s.ca, 0), s.nch * HW, [&](int64_t e, int count, scalar_t* out) {
        int64_t c = e / HW, k = e - c * HW;
        for (int j = 0; j < count; ++j) {
          out[j] = grad_at(c, k);
          if (++k == HW) {
            k = 0;
            ++c;
          }
        }
      });
    } else {
      scalar_t* dst = dx + p.lay.at(s.b, s.ca, 0);
      for (int64_t e = tid; e < s.nch * HW; e += blockDim.x) {
        const int64_t k = e / s.nch, c = e - k * s.nch;
        dst[k * p.lay.sK + c] = grad_at(c, k);
      }
    }
    __syncthreads();
  }
}

// ---- stream kernels: a warp per class group (b, i), for groups too large for a tile
//
// The per-channel softmax statistics and mask values, and in the backward each channel's S_j,
// go through (B, C) scratch arrays in global memory (L1-resident while the warp works;
// __syncwarp orders the writes before the reads). The features are read once per pass: the
// statistics, the winners (and, backward, one scan per 32 channels for S_j, and dx).

template <typename acc>
struct StreamScratch {
  acc *max, *inv, *mask, *s;  // (B, C) each; s backward only
  uint64_t* key;              // (B, C), the draw's keys
};

template <typename scalar_t>
struct StreamGroup {
  using acc = acc_t<scalar_t>;
  const LossParams<scalar_t>& p;
  const StreamScratch<acc>& sc;
  int64_t g, b, c0, c1;
  int lane;

  __device__ __forceinline__ int64_t at(int64_t c) const { return b * p.C + c; }
  __device__ __forceinline__ ChannelSoftmax<acc> softmax_of(int64_t c) const {
    return ChannelSoftmax<acc>::from(sc.max[at(c)], sc.inv[at(c)]);
  }
  // sum_j m_j x[j, k]: average pooling's (CCAP) term of the logit at k
  __device__ __forceinline__ acc masked_sum_at(int64_t k) const {
    acc sum = 0;
    for (int64_t c = c0; c < c1; ++c) {
      sum += apply_mask(static_cast<acc>(p.x[p.lay.at(b, c, k)]), sc.mask[at(c)]);
    }
    return sum;
  }
  __device__ __forceinline__ GroupWinners<acc> winners_at(int64_t k) const {
    GroupWinners<acc> w;
    for (int64_t c = c0; c < c1; ++c) {
      const acc v = static_cast<acc>(p.x[p.lay.at(b, c, k)]);
      w.offer(c - c0, softmax_of(c)(v), apply_mask(v, sc.mask[at(c)]));
    }
    return w;
  }
};

// Runs body(group) for each class group of this warp (a grid-stride loop over warps), once
// the group's softmax statistics and mask values are in the scratch.
template <typename scalar_t, typename Body>
__device__ __forceinline__ void for_each_stream_group(const LossParams<scalar_t>& p,
                                                      const StreamScratch<acc_t<scalar_t>>& sc,
                                                      Body&& body) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t g = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; g < p.B * p.K;
       g += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t b = g / p.K, i = g % p.K, c0 = p.offsets[i], c1 = p.offsets[i + 1];
    const StreamGroup<scalar_t> grp{p, sc, g, b, c0, c1, lane};
    for (int64_t c = c0; c < c1; ++c) {
      const SoftmaxStats<acc> st =
          row_stats<scalar_t, acc>(p.x, p.lay.at(b, c, 0), p.lay.sK, p.HW, lane);
      if (lane == 0) {
        const ChannelSoftmax<acc> softmax(st);
        sc.max[grp.at(c)] = softmax.max;
        sc.inv[grp.at(c)] = softmax.inv_sum;
      }
    }
    if (p.mask.draws()) {
      const auto so = at::cuda::philox::unpack(p.mask.philox);
      const int64_t row = p.mask.row_of(b);
      for (int64_t c = c0 + lane; c < c1; c += kWarp) {
        sc.key[grp.at(c)] = channel_key(std::get<0>(so), std::get<1>(so), row * p.C + c);
      }
      __syncwarp();
      const int64_t n = c1 - c0, d = dropped_in_group(n, p.mask.drop, p.mask.drop_fraction);
      for (int64_t c = c0 + lane; c < c1; c += kWarp) {
        const bool kept = channel_kept(sc.key + grp.at(c0), n, c - c0, d);
        sc.mask[grp.at(c)] = kept ? acc(1) : acc(0);
        if (p.mask.writes(b)) p.mask.drawn[row * p.C + c] = kept;
      }
    } else {
      for (int64_t c = c0 + lane; c < c1; c += kWarp) {
        sc.mask[grp.at(c)] = p.mask.template given<scalar_t, acc>(b, c);
      }
    }
    __syncwarp();
    body(grp);
  }
}

template <typename scalar_t>
__global__ void mc_loss_stream_forward_kernel(LossParams<scalar_t> p,
                                              StreamScratch<acc_t<scalar_t>> sc,
                                              acc_t<scalar_t>* __restrict__ h_over_n,
                                              acc_t<scalar_t>* __restrict__ logits) {
  using acc = acc_t<scalar_t>;
  if (!groups_ok(p.offsets, p.K, p.C, p.max_group)) return fill_unusable(p, h_over_n, logits);
  for_each_stream_group(p, sc, [&](const StreamGroup<scalar_t>& grp) {
    acc hs = 0, ls = 0;
    for (int64_t k = grp.lane; k < p.HW; k += kWarp) {
      const GroupWinners<acc> w = grp.winners_at(k);
      hs += w.prob;
      ls += p.avg_pool ? grp.masked_sum_at(k) : w.masked;
    }
    hs = warp_sum(hs);
    ls = warp_sum(ls);
    if (grp.lane == 0) {
      const int64_t n = grp.c1 - grp.c0;
      h_over_n[grp.g] = hs / static_cast<acc>(n);
      logits[grp.g] = ls / static_cast<acc>(p.avg_pool ? p.HW * n : p.HW);  // one division
    }
  });
}

template <typename scalar_t>
__global__ void mc_loss_stream_backward_kernel(LossParams<scalar_t> p,
                                               StreamScratch<acc_t<scalar_t>> sc,
                                               UpstreamGrads<acc_t<scalar_t>> u,
                                               scalar_t* __restrict__ dx) {
  using acc = acc_t<scalar_t>;
  if (!groups_ok(p.offsets, p.K, p.C, p.max_group)) return fill_nan(dx, p.B * p.C * p.HW);
  for_each_stream_group(p, sc, [&](const StreamGroup<scalar_t>& grp) {
    const int64_t b = grp.b, c0 = grp.c0, c1 = grp.c1, HW = p.HW;
    const int lane = grp.lane;
    acc gh, gl;
    group_grads(u, p.offsets, p.targets, b, grp.g % p.K, p.B, p.K, gh, gl);
    // S_j = sum_k g[j,k] p[j,k] (see mc_grad): the gh * p of the positions channel j wins.
    // One scan of the group per 32 channels: at each step of 32 positions (one per lane),
    // every channel's share is summed across the warp, and lane l keeps channel cb + l's
    // running total. (The loops over k0 and c are warp-uniform: every lane joins each sum.)
    for (int64_t cb = c0; cb < c1; cb += kWarp) {
      const int64_t cend = cb + kWarp < c1 ? cb + kWarp : c1;
      acc s_mine = 0;
      for (int64_t k0 = 0; k0 < HW; k0 += kWarp) {
        const int64_t k = k0 + lane;
        int64_t won_by = -1;  // the position's diversity winner (a channel index)
        acc share = 0;
        if (k < HW) {
          const GroupWinners<acc> w = grp.winners_at(k);
          won_by = c0 + w.prob_at;
          share = gh * w.prob;
        }
        for (int64_t c = cb; c < cend; ++c) {
          const acc part = warp_sum(c == won_by ? share : acc(0));
          if (c - cb == lane) s_mine += part;
        }
      }
      if (cb + lane < cend) sc.s[grp.at(cb + lane)] = s_mine;
    }
    __syncwarp();
    const acc gl_per_pos = gl / static_cast<acc>(p.avg_pool ? HW * (c1 - c0) : HW);
    for (int64_t k = lane; k < HW; k += kWarp) {
      const GroupWinners<acc> w = grp.winners_at(k);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t at = p.lay.at(b, c, k);
        const acc pk = grp.softmax_of(c)(static_cast<acc>(p.x[at]));
        const int64_t j = c - c0;
        const LogitGrad<acc> lg(gl_per_pos, sc.mask[grp.at(c)], p.avg_pool);
        dx[at] = static_cast<scalar_t>(mc_grad(div_grad_in(gh, w.prob_at == j), sc.s[grp.at(c)], pk,
                                               lg.win, lg.lose, w.masked_at == j));
      }
    }
  });
}

// ---- the forward's (B, K) tail: one block sums over the batch (a fixed tree, in double)

constexpr int kTailThreads = 256;

// What the tail writes: loss, dis and div (0-dim, or (B,) with reduction none), lse (B, 2)
// and weight_sums (2,).
template <typename T>
struct TailOutputs {
  T *loss, *dis, *div, *lse, *weight_sums;
};

// h_over_n: h[b, i] / n_i, as the fused kernels write it (which know n_i without a division
// here: a double division's slow-path call made ptxas spill around it).
template <typename T>
__global__ void __launch_bounds__(kTailThreads)
    mc_loss_tail_kernel(const T* h_over_n, const T* logits, const int64_t* targets, int64_t B,
                        int64_t K, T alpha, T beta, CrossEntropyOptions<T> ce, TailOutputs<T> out) {
  __shared__ double ce_part[kTailThreads], w_part[kTailThreads], h_part[kTailThreads];
  const int tid = threadIdx.x;
  const bool per_sample = ce.reduction == kReduceNone;
  double ce_sum = 0, w_sum = 0, h_sum = 0;
  for (int64_t b = tid; b < B; b += kTailThreads) {
    const T* row = logits + b * K;
    const auto ls = RowLogSoftmax<T>::of(row, K);
    out.lse[2 * b] = ls.max;
    out.lse[2 * b + 1] = ls.log_sum;
    T wt;
    const T ce_b = row_cross_entropy(row, ls, targets[b], K, ce, wt);
    trap_if_bad_target(targets[b], K);
    ce_sum += ce_b;
    w_sum += wt;
    if (per_sample) {
      double h_row = 0;
      for (int64_t i = 0; i < K; ++i) h_row += static_cast<double>(h_over_n[b * K + i]);
      const RowScalars<T> r(ce_b, h_row, K, alpha, beta);
      out.loss[b] = r.loss;
      out.dis[b] = r.dis;
      out.div[b] = r.div;
    }
  }
  if (!per_sample) {
    for (int64_t e = tid; e < B * K; e += kTailThreads) h_sum += static_cast<double>(h_over_n[e]);
  }
  ce_part[tid] = ce_sum;
  w_part[tid] = w_sum;
  h_part[tid] = h_sum;
  __syncthreads();
  for (int s = kTailThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      ce_part[tid] += ce_part[tid + s];
      w_part[tid] += w_part[tid + s];
      h_part[tid] += h_part[tid + s];
    }
    __syncthreads();
  }
  if (tid == 0) {
    if (!per_sample) {
      const TailScalars<T> r(ce_part[0], w_part[0], h_part[0], B, K, ce.reduction, alpha, beta);
      *out.loss = r.loss;
      *out.dis = r.dis;
      *out.div = r.div;
    }
    double weight_total = 0;
    for (int64_t i = 0; i < K; ++i) weight_total += ce.weight_of(i);
    out.weight_sums[0] = static_cast<T>(w_part[0]);
    out.weight_sums[1] = static_cast<T>(weight_total);
  }
}

// ------------------------------------------------------------------------------------------
// host wrappers

at::Tensor spatial_softmax_cuda(const at::Tensor& x) {
  check_map(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1), HW = x.size(2) * x.size(3);
  if (rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_softmax_cuda", [&] {
        spatial_softmax_kernel<scalar_t><<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), layout_of(x), rows,
            x.size(1), HW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor spatial_softmax_backward_cuda(const at::Tensor& grad_in, const at::Tensor& out) {
  check_map(out, "out");
  check_map_grad(grad_in, out, "out", out.sizes());
  const c10::cuda::CUDAGuard guard(out.device());
  const auto grad = grad_in.contiguous(format_of(out));
  auto dx = at::empty_like(out);
  const int64_t rows = out.size(0) * out.size(1), HW = out.size(2) * out.size(3);
  if (rows == 0) return dx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "spatial_softmax_backward_cuda", [&] {
        spatial_softmax_backward_kernel<scalar_t>
            <<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
                grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                dx.mutable_data_ptr<scalar_t>(), layout_of(out), rows, out.size(1), HW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return dx;
}

at::Tensor channel_mask_cuda(const at::Tensor& x, const at::Tensor& mask) {
  check_map(x, "x");
  const int64_t mask_bstride = check_mask(mask, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_mask_cuda", [&] {
        channel_mask_kernel<scalar_t><<<blocks_for(numel, 256), 256, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), mask_bstride,
            out.mutable_data_ptr<scalar_t>(), layout_of(x), numel, x.size(1),
            x.size(2) * x.size(3));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor ccmp_cuda(const at::Tensor& x, const at::Tensor& offsets) {
  check_map(x, "x");
  const int64_t K = check_offsets(offsets, x, ValueChecks::Kernel);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out =
      at::empty({x.size(0), K, x.size(2), x.size(3)}, x.options().memory_format(format_of(x)));
  const int64_t HW = x.size(2) * x.size(3), total = x.size(0) * K * HW;
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ccmp_cuda", [&] {
    ccmp_kernel<scalar_t><<<blocks_for(total, 256), 256, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), offsets.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), layout_of(x), layout_of(out), total, x.size(1), K, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor ccmp_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x,
                              const at::Tensor& offsets) {
  check_map(x, "x");
  const int64_t K = check_offsets(offsets, x, ValueChecks::Kernel);
  check_map_grad(grad_in, x, "x", {x.size(0), K, x.size(2), x.size(3)});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto grad = grad_in.contiguous(format_of(x));
  // dx starts empty: every element is written, the groups partitioning the channels (or NaN
  // everywhere when the offsets do not)
  auto dx = at::empty_like(x);
  const int64_t HW = x.size(2) * x.size(3), total = x.size(0) * K * HW;
  if (total == 0) return dx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ccmp_backward_cuda", [&] {
        ccmp_backward_kernel<scalar_t><<<blocks_for(total, 256), 256, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            offsets.const_data_ptr<int64_t>(), dx.mutable_data_ptr<scalar_t>(), layout_of(x),
            layout_of(grad), total, x.size(1), K, HW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return dx;
}

// ---- the fused loss

// Above this a tile takes several groups only if they share it; a single group may use up to
// kMaxTileBytes (opting in to more than the default 48 KiB of dynamic shared memory), beyond
// which it goes to the stream kernels. kMinTiles keeps the GPU's SMs busy when the batch is
// small: groups are not packed into fewer tiles than that.
constexpr size_t kTileBudget = 48u << 10;
constexpr size_t kMaxTileBytes = 200u << 10;
constexpr int64_t kMinTiles = 1024;

// The tiling of the groups, or none (groups_per_tile 0) when one group does not fit.
// The most dynamic shared memory a block of this device may opt in to (227 KiB on Hopper,
// 163 KiB on A100, 99 KiB on sm_86/89).
size_t shared_memory_optin() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

template <typename acc>
std::pair<TilePlan, size_t> plan_tiles(const LossShape& s, bool contiguous, bool backward) {
  TilePlan plan{0, 0, kTileThreads, contiguous ? s.HW : (s.HW | 1)};
  const size_t one = TileMem<acc>::carve(nullptr, 1, s.max_group, s.HW, plan.ld, backward, nullptr);
  if (one > std::min(kMaxTileBytes, shared_memory_optin())) return {plan, 0};
  int64_t gpt = std::max<int64_t>(1, static_cast<int64_t>(kTileBudget / one));
  gpt = std::min({gpt, s.K, std::max<int64_t>(1, s.B * s.K / kMinTiles)});
  while (gpt > 1 && TileMem<acc>::carve(nullptr, gpt, s.max_group, s.HW, plan.ld, backward,
                                        nullptr) > kTileBudget)
    --gpt;
  plan.groups_per_tile = gpt;
  plan.tiles_per_row = (s.K + gpt - 1) / gpt;
  // about 16 elements per thread or more (enough loads in flight), 64 threads at least
  const int64_t elements = gpt * s.max_group * s.HW;
  plan.threads = elements <= 1024 ? 64 : elements <= 4096 ? 128 : kTileThreads;
  return {plan, TileMem<acc>::carve(nullptr, gpt, s.max_group, s.HW, plan.ld, backward, nullptr)};
}

// Dynamic shared memory beyond 48 KiB must be asked for: the device's whole opt-in, the same
// value on every call, so that calls from several host threads cannot undo each other.
template <typename Kernel>
void allow_shared_memory(Kernel* kernel, size_t bytes) {
  if (bytes > (48u << 10)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_memory_optin())));
  }
}

// The generator's Philox state for one draw, advanced so that the next draw differs; read on
// the device through unpack(), so that a draw captured in a CUDA graph replays fresh.
at::PhiloxCudaState philox_state(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(4);
}

template <typename scalar_t>
LossParams<scalar_t> loss_params(const at::Tensor& x, const at::Tensor& targets,
                                 const at::Tensor& offsets, const LossShape& s,
                                 const MaskSource& mask, bool avg_pool) {
  return LossParams<scalar_t>{x.const_data_ptr<scalar_t>(),
                              layout_of(x),
                              offsets.const_data_ptr<int64_t>(),
                              targets.const_data_ptr<int64_t>(),
                              mask,
                              s.B,
                              s.C,
                              s.K,
                              s.HW,
                              s.max_group,
                              avg_pool};
}

MaskSource given_mask(const at::Tensor& mask, const LossShape& s) {
  MaskSource m{};
  m.values = mask.const_data_ptr();
  m.is_bool = s.mask_is_bool;
  m.bstride = s.mask_bstride;
  return m;
}

template <typename acc>
StreamScratch<acc> stream_scratch(const at::Tensor& scratch, const LossShape& s) {
  acc* base = static_cast<acc*>(scratch.mutable_data_ptr());
  const int64_t n = s.B * s.C;
  return StreamScratch<acc>{base, base + n, base + 2 * n, base + 3 * n,
                            reinterpret_cast<uint64_t*>(base + 4 * n)};
}

// (B, C) arrays for the stream kernels: four of acc and the keys.
at::Tensor stream_scratch_tensor(const at::Tensor& x, const LossShape& s) {
  const int64_t acc_bytes = x.scalar_type() == at::kDouble ? 8 : 4;
  return at::empty({(4 * acc_bytes + 8) * s.B * s.C / acc_bytes},
                   x.options().dtype(acc_type_of(x)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mc_loss_cuda(const at::Tensor& x, const at::Tensor& targets, const at::Tensor& offsets,
             int64_t max_group, const std::optional<at::Tensor>& mask, int64_t drop,
             double drop_fraction, bool per_sample_mask, std::optional<at::Generator> generator,
             double alpha, double beta, bool avg_pool, const std::optional<at::Tensor>& weight,
             double label_smoothing, int64_t reduction) {
  const LossShape s = check_loss(x, targets, offsets, max_group, mask, per_sample_mask, generator,
                                 weight, label_smoothing, reduction, ValueChecks::Kernel);
  const c10::cuda::CUDAGuard guard(x.device());
  LossOutputs out(x, s, per_sample_mask);
  auto h_over_n = at::empty({s.B, s.K}, out.logits.options());
  MaskSource ms{};
  if (s.draw) {
    ms.philox = philox_state(generator);
    ms.drop = drop;
    ms.drop_fraction = drop_fraction;
    ms.per_sample = per_sample_mask;
    ms.drawn = out.drawn_mask.mutable_data_ptr<bool>();
    ms.rows = s.mask_rows;
  } else {
    ms = given_mask(*mask, s);
  }
  if (s.B == 0 && s.draw) out.drawn_mask.zero_();  // no row to draw for (nor a kernel to)
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mc_loss_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const auto p = loss_params<scalar_t>(x, targets, offsets, s, ms, avg_pool);
    if (s.B > 0) {
      const auto [plan, smem] = plan_tiles<acc>(s, layout_of(x).sK == 1, false);
      if (plan.groups_per_tile > 0) {
        allow_shared_memory(&mc_loss_tile_forward_kernel<scalar_t>, smem);
        mc_loss_tile_forward_kernel<scalar_t>
            <<<blocks_for(s.B * plan.tiles_per_row, 1), plan.threads, smem, stream>>>(
                p, plan, h_over_n.mutable_data_ptr<acc>(), out.logits.mutable_data_ptr<acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const at::Tensor scratch = stream_scratch_tensor(x, s);
        mc_loss_stream_forward_kernel<scalar_t>
            <<<blocks_for(s.B * s.K, kWarpsPerBlock), kThreads, 0, stream>>>(
                p, stream_scratch<acc>(scratch, s), h_over_n.mutable_data_ptr<acc>(),
                out.logits.mutable_data_ptr<acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    mc_loss_tail_kernel<acc><<<1, kTailThreads, 0, stream>>>(
        h_over_n.const_data_ptr<acc>(), out.logits.const_data_ptr<acc>(),
        targets.const_data_ptr<int64_t>(), s.B, s.K, static_cast<acc>(alpha),
        static_cast<acc>(beta), cross_entropy_options<acc>(weight, label_smoothing, reduction),
        TailOutputs<acc>{out.loss.mutable_data_ptr<acc>(), out.dis.mutable_data_ptr<acc>(),
                         out.div.mutable_data_ptr<acc>(), out.lse.mutable_data_ptr<acc>(),
                         out.weight_sums.mutable_data_ptr<acc>()});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.as_tuple();
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

// a defined gradient, contiguous (a (B,) one may come expanded from a sum); else none
std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& g) {
  if (g.has_value() && g->defined()) return g->contiguous();
  return std::nullopt;
}

at::Tensor mc_loss_backward_cuda(
    const std::optional<at::Tensor>& g_loss_in, const std::optional<at::Tensor>& g_dis_in,
    const std::optional<at::Tensor>& g_div_in, const std::optional<at::Tensor>& g_logits_in,
    const at::Tensor& x, const at::Tensor& targets, const at::Tensor& offsets, int64_t max_group,
    const at::Tensor& mask, const at::Tensor& logits_in, const at::Tensor& lse_in, double alpha,
    double beta, bool avg_pool, const std::optional<at::Tensor>& weight, double label_smoothing,
    int64_t reduction, const std::optional<at::Tensor>& weight_sums_in) {
  const LossShape s = check_loss_backward(
      g_loss_in, g_dis_in, g_div_in, g_logits_in, x, targets, offsets, max_group, mask, logits_in,
      lse_in, weight, label_smoothing, reduction, weight_sums_in, ValueChecks::Kernel);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto logits = logits_in.contiguous(), lse = lse_in.contiguous();
  const auto weight_sums = contiguous_or_none(weight_sums_in);
  const auto g_loss = contiguous_or_none(g_loss_in), g_dis = contiguous_or_none(g_dis_in);
  const auto g_div = contiguous_or_none(g_div_in), g_logits = contiguous_or_none(g_logits_in);
  auto dx = at::empty_like(x);
  if (s.B == 0) return dx;
  const MaskSource ms = given_mask(mask, s);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "mc_loss_backward_cuda", [&] {
        using acc = acc_t<scalar_t>;
        const auto p = loss_params<scalar_t>(x, targets, offsets, s, ms, avg_pool);
        const UpstreamGrads<acc> u{data_or_null<acc>(g_loss),
                                   data_or_null<acc>(g_dis),
                                   data_or_null<acc>(g_div),
                                   data_or_null<acc>(g_logits),
                                   logits.const_data_ptr<acc>(),
                                   lse.const_data_ptr<acc>(),
                                   data_or_null<acc>(weight_sums),
                                   reduction == kReduceNone ? 1 : 0,
                                   static_cast<acc>(alpha),
                                   static_cast<acc>(beta),
                                   cross_entropy_options<acc>(weight, label_smoothing, reduction)};
        const auto [plan, smem] = plan_tiles<acc>(s, layout_of(x).sK == 1, true);
        // fp64 (gradcheck's dtype, never a training one) takes the stream kernel: the tile
        // kernel's fp64 instantiation spills around the calls of fp64 division and exp
        constexpr bool tiles = !std::is_same_v<scalar_t, double>;
        if constexpr (tiles) {
          if (plan.groups_per_tile > 0) {
            allow_shared_memory(&mc_loss_tile_backward_kernel<scalar_t>, smem);
            mc_loss_tile_backward_kernel<scalar_t>
                <<<blocks_for(s.B * plan.tiles_per_row, 1), plan.threads, smem, stream>>>(
                    p, plan, u, dx.mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
        }
        {
          const at::Tensor scratch = stream_scratch_tensor(x, s);
          mc_loss_stream_backward_kernel<scalar_t>
              <<<blocks_for(s.B * s.K, kWarpsPerBlock), kThreads, 0, stream>>>(
                  p, stream_scratch<acc>(scratch, s), u, dx.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return dx;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mcloss_cuda, CUDA, m) {
  m.impl("spatial_softmax", &cuda::spatial_softmax_cuda);
  m.impl("spatial_softmax_backward", &cuda::spatial_softmax_backward_cuda);
  m.impl("channel_mask", &cuda::channel_mask_cuda);
  m.impl("ccmp", &cuda::ccmp_cuda);
  m.impl("ccmp_backward", &cuda::ccmp_backward_cuda);
  m.impl("mc_loss", &cuda::mc_loss_cuda);
  m.impl("mc_loss_backward", &cuda::mc_loss_backward_cuda);
}

}  // namespace mcloss

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
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "op_common.h"

namespace mcloss {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxBlocks, (items + per_block - 1) / per_block)));
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

// Whether offsets[0..K] partition [0, C) into K non-empty groups, as the CPU ops check on the
// host: a CUDA host wrapper cannot read the values without a device sync, so every block of the
// kernels that walk the groups (ccmp and the fused loss) checks them (all its threads take part;
// blocks are 1-D) before reading a group, and writes NaN over its share of every output when
// they are not. The tail kernels only divide by the group sizes: group_size gives NaN for an
// empty or reversed group.
__device__ __forceinline__ bool offsets_partition(const int64_t* offsets, int64_t K, int64_t C) {
  int ok = threadIdx.x == 0 ? (offsets[0] == 0 && offsets[K] == C) : 1;
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) ok &= offsets[i] < offsets[i + 1];
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
      out[base + k * lay.sK] = static_cast<scalar_t>(softmax(static_cast<acc>(x[base + k * lay.sK])));
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
__global__ void channel_mask_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mask,
                                    int64_t mask_bstride, scalar_t* __restrict__ out, MapLayout lay,
                                    int64_t numel, int64_t C, int64_t HW) {
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

// (after offsets_partition)
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
  if (!offsets_partition(offsets, K, C)) return fill_nan(out, total);
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
                                     const int64_t* __restrict__ offsets,
                                     scalar_t* __restrict__ dx, MapLayout lay, MapLayout g_lay,
                                     int64_t total, int64_t C, int64_t K, int64_t HW) {
  using acc = acc_t<scalar_t>;
  if (!offsets_partition(offsets, K, C)) return fill_nan(dx, total / K * C);
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

// ---- the fused loss: one warp per class group (b, i)
//
// The per-channel softmax statistics (max, 1/sum), and in the backward each channel's S_j
// (see mc_grad), go through a small (B, C) scratch in global memory (L1-resident while
// the warp works; __syncwarp orders the writes before the reads). Nothing of size B*C*HW is
// stored: per-position winners are recomputed where they are needed (the backward reads a
// group three times: the statistics, one scan per 32 channels for S_j, and the dx writes).

struct GroupScratch {
  void* max;  // acc (B*C)
  void* inv;  // acc (B*C)
  void* div;  // acc (B*C), backward only: S_j of mc_grad
};

// What both fused kernels read: the features, their class groups and the mask.
template <typename scalar_t>
struct FusedArgs {
  const scalar_t* x;
  const int64_t* offsets;
  const scalar_t* mask;  // (C,) or (B, C): mask_bstride 0 or C
  int64_t mask_bstride;
  GroupScratch scratch;
  MapLayout lay;
  int64_t groups, C, K, HW;  // groups = B * K
};

// One class group (b, i), channels [c0, c1), as its warp walks it.
template <typename scalar_t>
struct WarpGroup {
  using acc = acc_t<scalar_t>;
  const FusedArgs<scalar_t>& a;
  int64_t g, b, c0, c1;
  const scalar_t* mask_row;
  const acc* smax;  // the softmax statistics of every channel, filled before use
  const acc* sinv;
  int lane;

  __device__ __forceinline__ ChannelSoftmax<acc> softmax_of(int64_t c) const {
    return ChannelSoftmax<acc>::from(smax[b * a.C + c], sinv[b * a.C + c]);
  }

  // Scan the group's channels at position k: both per-position winners (relative indices).
  __device__ __forceinline__ GroupWinners<acc> winners_at(int64_t k) const {
    GroupWinners<acc> w;
    for (int64_t c = c0; c < c1; ++c) {
      const acc v = static_cast<acc>(a.x[a.lay.at(b, c, k)]);
      w.offer(c - c0, softmax_of(c)(v), apply_mask(v, static_cast<acc>(mask_row[c])));
    }
    return w;
  }
};

// Runs body(group) for each class group of this warp (a grid-stride loop over warps), once
// the group's per-channel softmax statistics are in the scratch.
template <typename scalar_t, typename Body>
__device__ __forceinline__ void for_each_group(const FusedArgs<scalar_t>& a, Body&& body) {
  using acc = acc_t<scalar_t>;
  acc* smax = static_cast<acc*>(a.scratch.max);
  acc* sinv = static_cast<acc*>(a.scratch.inv);
  const int lane = threadIdx.x % kWarp;
  for (int64_t g = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; g < a.groups;
       g += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t b = g / a.K;
    int64_t c0, c1;
    group_of(a.offsets, g % a.K, c0, c1);
    for (int64_t c = c0; c < c1; ++c) {
      const SoftmaxStats<acc> s = row_stats<scalar_t, acc>(a.x, a.lay.at(b, c, 0), a.lay.sK, a.HW, lane);
      if (lane == 0) {
        const ChannelSoftmax<acc> softmax(s);
        smax[b * a.C + c] = softmax.max;
        sinv[b * a.C + c] = softmax.inv_sum;
      }
    }
    __syncwarp();
    body(WarpGroup<scalar_t>{a, g, b, c0, c1, a.mask + b * a.mask_bstride, smax, sinv, lane});
  }
}

template <typename scalar_t>
__global__ void mc_loss_forward_kernel(FusedArgs<scalar_t> a, acc_t<scalar_t>* __restrict__ h,
                                       acc_t<scalar_t>* __restrict__ logits) {
  using acc = acc_t<scalar_t>;
  if (!offsets_partition(a.offsets, a.K, a.C)) {
    fill_nan(h, a.groups);
    return fill_nan(logits, a.groups);
  }
  for_each_group(a, [&](const WarpGroup<scalar_t>& grp) {
    acc hs = 0, ls = 0;
    for (int64_t k = grp.lane; k < a.HW; k += kWarp) {
      const GroupWinners<acc> w = grp.winners_at(k);
      hs += w.prob;
      ls += w.masked;
    }
    hs = warp_sum(hs);
    ls = warp_sum(ls);
    if (grp.lane == 0) {
      h[grp.g] = hs;
      logits[grp.g] = ls / static_cast<acc>(a.HW);
    }
  });
}

template <typename scalar_t>
__global__ void mc_loss_backward_kernel(FusedArgs<scalar_t> a,
                                        const acc_t<scalar_t>* __restrict__ grad_h,
                                        const acc_t<scalar_t>* __restrict__ grad_logits,
                                        scalar_t* __restrict__ dx) {
  using acc = acc_t<scalar_t>;
  if (!offsets_partition(a.offsets, a.K, a.C)) return fill_nan(dx, a.groups / a.K * a.C * a.HW);
  acc* sdiv = static_cast<acc*>(a.scratch.div);
  for_each_group(a, [&](const WarpGroup<scalar_t>& grp) {
    const int64_t b = grp.b, c0 = grp.c0, c1 = grp.c1, C = a.C, HW = a.HW;
    const int lane = grp.lane;
    const acc gh = grad_h[grp.g];
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
      if (cb + lane < cend) sdiv[b * C + cb + lane] = s_mine;
    }
    __syncwarp();
    const acc gl_per_pos = grad_logits[grp.g] / static_cast<acc>(HW);
    for (int64_t k = lane; k < HW; k += kWarp) {
      const GroupWinners<acc> w = grp.winners_at(k);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t at = a.lay.at(b, c, k);
        const acc p = grp.softmax_of(c)(static_cast<acc>(a.x[at]));
        const int64_t j = c - c0;
        const LogitGrad<acc> gl(gl_per_pos, static_cast<acc>(grp.mask_row[c]));
        dx[at] = static_cast<scalar_t>(mc_grad(div_grad_in(gh, w.prob_at == j), sdiv[b * C + c], p,
                                               gl.win, gl.lose, w.masked_at == j));
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// host wrappers

at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor spatial_softmax_cuda(const at::Tensor& x) {
  check_map(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1), HW = x.size(2) * x.size(3);
  if (rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_softmax_cuda", [&] {
    spatial_softmax_kernel<scalar_t><<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), layout_of(x), rows, x.size(1), HW);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "spatial_softmax_backward_cuda", [&] {
    spatial_softmax_backward_kernel<scalar_t><<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
        layout_of(out), rows, out.size(1), HW);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_mask_cuda", [&] {
    channel_mask_kernel<scalar_t><<<blocks_for(numel, 256), 256, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(), mask_bstride,
        out.mutable_data_ptr<scalar_t>(), layout_of(x), numel, x.size(1), x.size(2) * x.size(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor ccmp_cuda(const at::Tensor& x, const at::Tensor& offsets) {
  check_map(x, "x");
  const int64_t K = check_offsets(offsets, x, ValueChecks::Kernel);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), K, x.size(2), x.size(3)}, x.options().memory_format(format_of(x)));
  const int64_t HW = x.size(2) * x.size(3), total = x.size(0) * K * HW;
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ccmp_cuda", [&] {
    ccmp_kernel<scalar_t><<<blocks_for(total, 256), 256, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), offsets.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
        layout_of(x), layout_of(out), total, x.size(1), K, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor ccmp_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& offsets) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ccmp_backward_cuda", [&] {
    ccmp_backward_kernel<scalar_t><<<blocks_for(total, 256), 256, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), offsets.const_data_ptr<int64_t>(),
        dx.mutable_data_ptr<scalar_t>(), layout_of(x), layout_of(grad), total, x.size(1), K, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

// The kernels' view of x, its groups and the mask, with a scratch of `slots` (B, C) arrays of
// acc (2 forward: softmax max and 1/sum; 3 backward: and S_j).
template <typename scalar_t>
FusedArgs<scalar_t> fused_args(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& mask,
                               int64_t mask_bstride, int64_t K, const at::Tensor& scratch) {
  const int64_t B = x.size(0), C = x.size(1);
  char* base = static_cast<char*>(scratch.mutable_data_ptr());
  const int64_t bytes = B * C * static_cast<int64_t>(scratch.element_size());
  return FusedArgs<scalar_t>{x.const_data_ptr<scalar_t>(), offsets.const_data_ptr<int64_t>(),
                             mask.const_data_ptr<scalar_t>(), mask_bstride,
                             GroupScratch{base, base + bytes, base + 2 * bytes}, layout_of(x),
                             B * K, C, K, x.size(2) * x.size(3)};
}

std::tuple<at::Tensor, at::Tensor> mc_loss_forward_cuda(const at::Tensor& x, const at::Tensor& offsets,
                                                        const at::Tensor& mask) {
  check_map(x, "x");
  const int64_t K = check_offsets(offsets, x, ValueChecks::Kernel);
  const int64_t mask_bstride = check_mask(mask, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1);
  auto h = at::empty({B, K}, x.options().dtype(acc_type_of(x)));
  auto logits = at::empty({B, K}, x.options().dtype(acc_type_of(x)));
  if (B == 0) return {h, logits};
  auto scratch = at::empty({2 * B * C}, x.options().dtype(acc_type_of(x)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mc_loss_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    mc_loss_forward_kernel<scalar_t><<<blocks_for(B * K, kWarpsPerBlock), kThreads, 0, stream>>>(
        fused_args<scalar_t>(x, offsets, mask, mask_bstride, K, scratch), h.mutable_data_ptr<acc>(),
        logits.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {h, logits};
}

at::Tensor mc_loss_backward_cuda(const at::Tensor& grad_h_in, const at::Tensor& grad_logits_in,
                                 const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& mask) {
  check_map(x, "x");
  const int64_t K = check_offsets(offsets, x, ValueChecks::Kernel);
  const int64_t mask_bstride = check_mask(mask, x);
  check_group_grad(grad_h_in, x, K, "grad_h");
  check_group_grad(grad_logits_in, x, K, "grad_logits");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1);
  const auto grad_h = grad_h_in.to(acc_type_of(x)).contiguous();
  const auto grad_logits = grad_logits_in.to(acc_type_of(x)).contiguous();
  auto dx = at::empty_like(x);
  if (B == 0) return dx;
  auto scratch = at::empty({3 * B * C}, x.options().dtype(acc_type_of(x)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mc_loss_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    mc_loss_backward_kernel<scalar_t><<<blocks_for(B * K, kWarpsPerBlock), kThreads, 0, stream>>>(
        fused_args<scalar_t>(x, offsets, mask, mask_bstride, K, scratch), grad_h.const_data_ptr<acc>(),
        grad_logits.const_data_ptr<acc>(), dx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

// ---- the (B, K) tail: one block sums over the batch (fixed tree, in double); the backward is
// elementwise and reads the upstream scalar gradients on the device (no host sync)

constexpr int kTailThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kTailThreads)
    mc_loss_tail_kernel(const T* h, const T* logits, const int64_t* targets, const int64_t* offsets,
                        int64_t B, int64_t K, T alpha, T beta, T* loss, T* dis, T* div, T* lse) {
  __shared__ double nll_part[kTailThreads], h_part[kTailThreads];
  const int tid = threadIdx.x;
  double nll = 0, h_over_n = 0;
  for (int64_t b = tid; b < B; b += kTailThreads) {
    const T* row = logits + b * K;
    const auto ls = RowLogSoftmax<T>::of(row, K);
    lse[2 * b] = ls.max;
    lse[2 * b + 1] = ls.log_sum;
    nll += target_nll(row, ls, targets[b], K);
  }
  for (int64_t e = tid; e < B * K; e += kTailThreads) {
    const int64_t i = e % K;
    h_over_n += static_cast<double>(h[e]) / group_size<double>(offsets, i);
  }
  nll_part[tid] = nll;
  h_part[tid] = h_over_n;
  __syncthreads();
  for (int s = kTailThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      nll_part[tid] += nll_part[tid + s];
      h_part[tid] += h_part[tid + s];
    }
    __syncthreads();
  }
  if (tid == 0) {
    const TailScalars<T> r(nll_part[0], h_part[0], B, K, alpha, beta);
    *loss = r.loss;
    *dis = r.dis;
    *div = r.div;
  }
}

template <typename T>
__global__ void mc_loss_tail_backward_kernel(const T* g_loss, const T* g_dis, const T* g_div,
                                             const T* g_logits, const T* logits, const T* lse,
                                             const int64_t* targets, const int64_t* offsets,
                                             int64_t B, int64_t K, T alpha, T beta, T* grad_h,
                                             T* grad_logits) {
  const TailGradScale<T> scale(*g_loss, *g_dis, *g_div, alpha, beta, B, K);
  const int64_t n = B * K;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / K, i = e % K;
    const RowLogSoftmax<T> ls(lse[2 * b], lse[2 * b + 1]);
    grad_logits[e] = g_logits[e] + nll_logit_grad(scale.per_row, logits[e], ls, i, targets[b], K);
    grad_h[e] = scale.per_h / group_size<T>(offsets, i);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mc_loss_tail_cuda(
    const at::Tensor& h_in, const at::Tensor& logits_in, const at::Tensor& targets_in,
    const at::Tensor& offsets_in, double alpha, double beta) {
  const auto [B, K] = check_tail(h_in, logits_in, targets_in, offsets_in, ValueChecks::Kernel);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto h = h_in.contiguous(), logits = logits_in.contiguous();
  const auto targets = targets_in.contiguous(), offsets = offsets_in.contiguous();
  auto loss = at::empty({}, logits.options()), dis = at::empty({}, logits.options());
  auto div = at::empty({}, logits.options()), lse = at::empty({B, 2}, logits.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mc_loss_tail_cuda", [&] {
    mc_loss_tail_kernel<scalar_t><<<1, kTailThreads, 0, stream>>>(
        h.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(),
        targets.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), B, K,
        static_cast<scalar_t>(alpha), static_cast<scalar_t>(beta), loss.mutable_data_ptr<scalar_t>(),
        dis.mutable_data_ptr<scalar_t>(), div.mutable_data_ptr<scalar_t>(),
        lse.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, dis, div, lse};
}

std::tuple<at::Tensor, at::Tensor> mc_loss_tail_backward_cuda(
    const at::Tensor& g_loss, const at::Tensor& g_dis, const at::Tensor& g_div,
    const at::Tensor& g_logits_in, const at::Tensor& logits_in, const at::Tensor& lse_in,
    const at::Tensor& targets_in, const at::Tensor& offsets_in, double alpha, double beta) {
  const auto [B, K] = check_tail_backward(g_loss, g_dis, g_div, g_logits_in, logits_in, lse_in,
                                          targets_in, offsets_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous(), g_logits = g_logits_in.contiguous();
  const auto lse = lse_in.contiguous(), targets = targets_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  auto grad_h = at::empty({B, K}, logits.options());
  auto grad_logits = at::empty({B, K}, logits.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mc_loss_tail_backward_cuda", [&] {
    mc_loss_tail_backward_kernel<scalar_t><<<blocks_for(B * K, 256), 256, 0, stream>>>(
        g_loss.const_data_ptr<scalar_t>(), g_dis.const_data_ptr<scalar_t>(),
        g_div.const_data_ptr<scalar_t>(), g_logits.const_data_ptr<scalar_t>(),
        logits.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(),
        targets.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), B, K,
        static_cast<scalar_t>(alpha), static_cast<scalar_t>(beta),
        grad_h.mutable_data_ptr<scalar_t>(), grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_h, grad_logits};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mcloss_cuda, CUDA, m) {
  m.impl("spatial_softmax", &cuda::spatial_softmax_cuda);
  m.impl("spatial_softmax_backward", &cuda::spatial_softmax_backward_cuda);
  m.impl("channel_mask", &cuda::channel_mask_cuda);
  m.impl("ccmp", &cuda::ccmp_cuda);
  m.impl("ccmp_backward", &cuda::ccmp_backward_cuda);
  m.impl("mc_loss_forward", &cuda::mc_loss_forward_cuda);
  m.impl("mc_loss_backward", &cuda::mc_loss_backward_cuda);
  m.impl("mc_loss_tail", &cuda::mc_loss_tail_cuda);
  m.impl("mc_loss_tail_backward", &cuda::mc_loss_tail_backward_cuda);
}

}  // namespace mcloss

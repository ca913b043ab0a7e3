// The CPU kernels' entry points as a table of function pointers, one table per instruction
// set: cpu_kernels.h is compiled once for baseline x86-64 (mcloss_cpu.cpp) and once for
// AVX2+FMA (kernels_avx2.cpp), and the ops pick a table at run time from what the CPU has.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace mcloss {
namespace cpu {

// Everything a kernel needs, as plain pointers, sizes and strides; fields a kernel does not
// use stay null. Strides are (batch, channel, position) in elements: element (b, c, k) of x
// is at b*x_str[0] + c*x_str[1] + k*x_str[2]; outputs shaped like x share x's strides.
template <typename scalar_t, typename acc>
struct KernelArgs {
  using scalar_type = scalar_t;
  using acc_type = acc;
  const scalar_t* x = nullptr;
  const scalar_t* grad = nullptr;  // grad of a map output, laid out by g_str
  const scalar_t* mask = nullptr;  // (C,) or (B, C); mask_bstride = 0 or C
  int64_t mask_bstride = 0;
  const int64_t* offsets = nullptr;  // (K + 1,) group boundaries
  scalar_t* out = nullptr;           // the map output, laid out by x_str (or g_str for ccmp)
  const acc* grad_h = nullptr;       // (B, K)
  const acc* grad_logits = nullptr;  // (B, K)
  acc* h = nullptr;                  // (B, K)
  acc* logits = nullptr;             // (B, K)
  int64_t B = 0, C = 0, K = 0, HW = 0, max_group = 0;
  bool avg_pool = false;  // the fused loss's logits: the group's mean (CCAP), not its max
  int64_t x_str[3] = {0, 0, 0};
  int64_t g_str[3] = {0, 0, 0};
};

// Each kernel processes items [begin, end): channel rows (b, c) or class groups (b, i).
template <typename scalar_t, typename acc>
using RangeKernel = void (*)(const KernelArgs<scalar_t, acc>&, int64_t begin, int64_t end);

template <typename scalar_t, typename acc>
struct KernelTable {
  RangeKernel<scalar_t, acc> spatial_softmax, spatial_softmax_backward, channel_mask, ccmp,
      ccmp_backward, mc_loss_forward, mc_loss_backward;
};

struct KernelTables {
  KernelTable<float, float> f32;
  KernelTable<double, double> f64;
  KernelTable<c10::Half, float> f16;
  KernelTable<c10::BFloat16, float> bf16;
};

void fill_tables_default(KernelTables& t);
void fill_tables_avx2(KernelTables& t);

}  // namespace cpu
}  // namespace mcloss

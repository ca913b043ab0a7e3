// CPU implementations of the ops: check the arguments, lay out the outputs, and run the
// kernels of cpu_kernels.h over channel rows or class groups with at::parallel_for, using the
// AVX2+FMA build of the kernels where the CPU has it (MCLOSS_CPU_ISA=default forces baseline).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "op_common.h"

namespace mcloss {
namespace cpu {

void fill_tables_default(KernelTables& t) { mcloss::cpu_impl::fill_all(t); }

namespace {

bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* isa = std::getenv("MCLOSS_CPU_ISA");
  if (isa && std::strcmp(isa, "default") == 0) return false;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const KernelTables& tables() {
  static const KernelTables t = [] {
    KernelTables k;
    if (use_avx2()) {
      fill_tables_avx2(k);
    } else {
      fill_tables_default(k);
    }
    return k;
  }();
  return t;
}

template <typename scalar_t>
const auto& table_for();
template <>
const auto& table_for<float>() {
  return tables().f32;
}
template <>
const auto& table_for<double>() {
  return tables().f64;
}
template <>
const auto& table_for<c10::Half>() {
  return tables().f16;
}
template <>
const auto& table_for<c10::BFloat16>() {
  return tables().bf16;
}

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, at least
// What one item (row or group) costs beyond its elements, in elements: its reductions across
// lanes, setup and loop overhead. Without it, tiny maps (1x1, a few positions) put thousands
// of groups that each cost far more than their handful of elements into one task.
constexpr int64_t kItemOverheadElements = 64;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(
      1, kGrainElements / (std::max<int64_t>(1, elements_per_item) + kItemOverheadElements));
}

void set_strides(int64_t* dst, const at::Tensor& t) {
  const MapLayout lay = layout_of(t);
  dst[0] = lay.sB;
  dst[1] = lay.sC;
  dst[2] = lay.sK;
}

template <typename Args>
using scalar_of = typename std::decay_t<Args>::scalar_type;

// Runs `pick(table)` over [0, items) in parallel with the arguments `fill` sets up.
template <typename Pick, typename Fill>
void launch(const at::Tensor& x, int64_t items, int64_t elements_per_item, Pick pick, Fill fill) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mcloss_cpu", [&] {
    using acc = acc_t<scalar_t>;
    KernelArgs<scalar_t, acc> a;
    a.B = x.size(0);
    a.C = x.size(1);
    a.HW = x.size(2) * x.size(3);
    set_strides(a.x_str, x);
    a.x = x.const_data_ptr<scalar_t>();
    fill(a);
    const auto kernel = pick(table_for<scalar_t>());
    at::parallel_for(0, items, grain_for(elements_per_item),
                     [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  });
}

// ---- spatial softmax

at::Tensor spatial_softmax_cpu(const at::Tensor& x) {
  check_map(x, "x");
  auto out = at::empty_like(x);
  launch(
      x, x.size(0) * x.size(1), x.size(2) * x.size(3),
      [](const auto& t) { return t.spatial_softmax; },
      [&](auto& a) { a.out = out.mutable_data_ptr<scalar_of<decltype(a)>>(); });
  return out;
}

at::Tensor spatial_softmax_backward_cpu(const at::Tensor& grad_in, const at::Tensor& out) {
  check_map(out, "out");
  check_map_grad(grad_in, out, "out", out.sizes());
  const auto grad = grad_in.contiguous(format_of(out));
  auto dx = at::empty_like(out);
  launch(
      out, out.size(0) * out.size(1), out.size(2) * out.size(3),
      [](const auto& t) { return t.spatial_softmax_backward; },
      [&](auto& a) {
        using scalar_t = scalar_of<decltype(a)>;
        a.grad = grad.const_data_ptr<scalar_t>();
        a.out = dx.mutable_data_ptr<scalar_t>();
      });
  return dx;
}

// ---- channel mask

at::Tensor channel_mask_cpu(const at::Tensor& x, const at::Tensor& mask) {
  check_map(x, "x");
  const int64_t mask_bstride = check_mask(mask, x);
  auto out = at::empty_like(x);
  launch(
      x, x.size(0) * x.size(1), x.size(2) * x.size(3), [](const auto& t) { return t.channel_mask; },
      [&](auto& a) {
        using scalar_t = scalar_of<decltype(a)>;
        a.mask = mask.const_data_ptr<scalar_t>();
        a.mask_bstride = mask_bstride;
        a.out = out.mutable_data_ptr<scalar_t>();
      });
  return out;
}

// ---- cross-channel max pooling

at::Tensor ccmp_cpu(const at::Tensor& x, const at::Tensor& offsets) {
  check_map(x, "x");
  const int64_t K = check_offsets(offsets, x, ValueChecks::Host);
  auto out =
      at::empty({x.size(0), K, x.size(2), x.size(3)}, x.options().memory_format(format_of(x)));
  launch(
      x, x.size(0) * K, x.size(1) / K * x.size(2) * x.size(3), [](const auto& t) { return t.ccmp; },
      [&](auto& a) {
        using scalar_t = scalar_of<decltype(a)>;
        a.K = K;
        a.offsets = offsets.const_data_ptr<int64_t>();
        a.out = out.mutable_data_ptr<scalar_t>();
        set_strides(a.g_str, out);
      });
  return out;
}

at::Tensor ccmp_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x,
                             const at::Tensor& offsets) {
  check_map(x, "x");
  const int64_t K = check_offsets(offsets, x, ValueChecks::Host);
  check_map_grad(grad_in, x, "x", {x.size(0), K, x.size(2), x.size(3)});
  const auto grad = grad_in.contiguous(format_of(x));
  auto dx = at::empty_like(x);
  launch(
      x, x.size(0) * K, x.size(1) / K * x.size(2) * x.size(3),
      [](const auto& t) { return t.ccmp_backward; },
      [&](auto& a) {
        using scalar_t = scalar_of<decltype(a)>;
        a.K = K;
        a.offsets = offsets.const_data_ptr<int64_t>();
        a.grad = grad.const_data_ptr<scalar_t>();
        set_strides(a.g_str, grad);
        a.out = dx.mutable_data_ptr<scalar_t>();
      });
  return dx;
}

// ---- the fused loss

// What both fused kernels take about the class groups and the mask (its values in x's dtype).
template <typename Args>
void set_groups(Args& a, const LossShape& s, const at::Tensor& offsets, const at::Tensor& mask) {
  a.K = s.K;
  a.offsets = offsets.const_data_ptr<int64_t>();
  a.max_group = s.max_group;
  a.mask = mask.const_data_ptr<scalar_of<Args>>();
  a.mask_bstride = s.mask_bstride;
}

// The kernels multiply by the mask in x's dtype.
at::Tensor mask_values(const at::Tensor& mask, const at::Tensor& x) {
  return mask.to(x.scalar_type()).contiguous();
}

// seed and offset of a mask draw, from the CPU generator (the emulated CUDA build's stand-in
// for the CUDA generator takes them the same way, so both draw the same mask).
std::pair<uint64_t, uint64_t> philox_seed_offset(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  const uint64_t seed = gen->random64();
  return {seed, gen->random64()};
}

// The channel mask (mask_rows, C), True = kept, into `keep`: the draw of mcloss_math.h, group
// by group.
void draw_mask(at::Tensor& keep, const LossShape& s, const at::Tensor& offsets, int64_t drop,
               double drop_fraction, const std::optional<at::Generator>& generator) {
  const auto [seed, offset] = philox_seed_offset(generator);
  if (s.B == 0) {  // no sample to draw for, as on CUDA
    keep.zero_();
    return;
  }
  bool* out = keep.mutable_data_ptr<bool>();
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  std::vector<uint64_t> keys(static_cast<size_t>(s.max_group));
  for (int64_t r = 0; r < s.mask_rows; ++r) {
    for (int64_t i = 0; i < s.K; ++i) {
      const int64_t c0 = o[i], n = o[i + 1] - o[i];
      const int64_t d = dropped_in_group(n, drop, drop_fraction);
      for (int64_t j = 0; j < n; ++j) keys[j] = channel_key(seed, offset, r * s.C + c0 + j);
      for (int64_t j = 0; j < n; ++j) out[r * s.C + c0 + j] = channel_kept(keys.data(), n, j, d);
    }
  }
}

// The (B, K) tail: a few thousand values, one thread, in the fixed order of the loops. Writes
// loss, dis, div, lse and weight_sums of `out` from h and out.logits.
void loss_tail(LossOutputs& out, const at::Tensor& h, const at::Tensor& targets,
               const at::Tensor& offsets, const LossShape& s, double alpha, double beta,
               const std::optional<at::Tensor>& weight, double label_smoothing) {
  const int64_t B = s.B, K = s.K, reduction = s.reduction;
  const bool per_sample = reduction == kReduceNone;
  at::Tensor &loss = out.loss, &dis = out.dis, &div = out.div;
  at::Tensor &lse = out.lse, &weight_sums = out.weight_sums;
  const at::Tensor& logits = out.logits;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mc_loss_tail_cpu", [&] {
    const auto ce = cross_entropy_options<scalar_t>(weight, label_smoothing, reduction);
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const int64_t* tp = targets.const_data_ptr<int64_t>();
    const int64_t* op = offsets.const_data_ptr<int64_t>();
    scalar_t* lse_p = lse.mutable_data_ptr<scalar_t>();
    const auto a = static_cast<scalar_t>(alpha), b_ = static_cast<scalar_t>(beta);
    double ce_sum = 0, target_weight_sum = 0, h_over_n = 0;
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* row = lp + b * K;
      const auto ls = RowLogSoftmax<scalar_t>::of(row, K);
      lse_p[2 * b] = ls.max;
      lse_p[2 * b + 1] = ls.log_sum;
      scalar_t wt;
      const scalar_t ce_b = row_cross_entropy(row, ls, tp[b], K, ce, wt);
      ce_sum += ce_b;
      target_weight_sum += wt;
      double h_row = 0;
      for (int64_t i = 0; i < K; ++i) {
        h_row += static_cast<double>(hp[b * K + i]) / group_size<double>(op, i);
      }
      h_over_n += h_row;
      if (per_sample) {
        const RowScalars<scalar_t> r(ce_b, h_row, K, a, b_);
        loss.mutable_data_ptr<scalar_t>()[b] = r.loss;
        dis.mutable_data_ptr<scalar_t>()[b] = r.dis;
        div.mutable_data_ptr<scalar_t>()[b] = r.div;
      }
    }
    if (!per_sample) {
      const TailScalars<scalar_t> r(ce_sum, target_weight_sum, h_over_n, B, K, reduction, a, b_);
      *loss.mutable_data_ptr<scalar_t>() = r.loss;
      *dis.mutable_data_ptr<scalar_t>() = r.dis;
      *div.mutable_data_ptr<scalar_t>() = r.div;
    }
    double weight_total = 0;
    for (int64_t i = 0; i < K; ++i) weight_total += ce.weight_of(i);
    weight_sums.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(target_weight_sum);
    weight_sums.mutable_data_ptr<scalar_t>()[1] = static_cast<scalar_t>(weight_total);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mc_loss_cpu(const at::Tensor& x, const at::Tensor& targets, const at::Tensor& offsets,
            int64_t max_group, const std::optional<at::Tensor>& mask, int64_t drop,
            double drop_fraction, bool per_sample_mask, std::optional<at::Generator> generator,
            double alpha, double beta, bool avg_pool, const std::optional<at::Tensor>& weight,
            double label_smoothing, int64_t reduction) {
  const LossShape s = check_loss(x, targets, offsets, max_group, mask, per_sample_mask, generator,
                                 weight, label_smoothing, reduction, ValueChecks::Host);
  LossOutputs out(x, s, per_sample_mask);
  if (s.draw) draw_mask(out.drawn_mask, s, offsets, drop, drop_fraction, generator);
  auto h = at::empty({s.B, s.K}, out.logits.options());
  const at::Tensor m = mask_values(s.draw ? out.drawn_mask : *mask, x);
  // per group (b, i): the diversity sum h and the logit, one pass over x
  launch(
      x, s.B * s.K, s.C / s.K * s.HW, [](const auto& t) { return t.mc_loss_forward; },
      [&](auto& a) {
        using acc = typename std::decay_t<decltype(a)>::acc_type;
        set_groups(a, s, offsets, m);
        a.avg_pool = avg_pool;
        a.h = h.mutable_data_ptr<acc>();
        a.logits = out.logits.mutable_data_ptr<acc>();
      });
  loss_tail(out, h, targets, offsets, s, alpha, beta, weight, label_smoothing);
  return out.as_tuple();
}

// The gradient g (0-dim, or (B,) with reduction none; undefined: 0) of row b.
template <typename T>
struct TermGrad {
  at::Tensor t;
  const T* p = nullptr;
  int64_t stride = 0;
  explicit TermGrad(const std::optional<at::Tensor>& g) {
    if (!g.has_value() || !g->defined()) return;
    t = g->contiguous();
    p = t.const_data_ptr<T>();
    stride = t.dim() == 0 ? 0 : 1;
  }
  T operator[](int64_t b) const { return p ? p[b * stride] : T(0); }
};

at::Tensor mc_loss_backward_cpu(
    const std::optional<at::Tensor>& g_loss_in, const std::optional<at::Tensor>& g_dis_in,
    const std::optional<at::Tensor>& g_div_in, const std::optional<at::Tensor>& g_logits_in,
    const at::Tensor& x, const at::Tensor& targets, const at::Tensor& offsets, int64_t max_group,
    const at::Tensor& mask, const at::Tensor& logits_in, const at::Tensor& lse_in, double alpha,
    double beta, bool avg_pool, const std::optional<at::Tensor>& weight, double label_smoothing,
    int64_t reduction, const std::optional<at::Tensor>& weight_sums) {
  const LossShape s = check_loss_backward(
      g_loss_in, g_dis_in, g_div_in, g_logits_in, x, targets, offsets, max_group, mask, logits_in,
      lse_in, weight, label_smoothing, reduction, weight_sums, ValueChecks::Host);
  const int64_t B = s.B, K = s.K;
  const auto logits = logits_in.contiguous(), lse = lse_in.contiguous();
  const bool has_g_logits = g_logits_in.has_value() && g_logits_in->defined();
  const at::Tensor g_logits = has_g_logits ? g_logits_in->contiguous() : at::Tensor();
  // the gradients of h and the logits: the tail's backward
  auto grad_h = at::empty({B, K}, logits.options());
  auto grad_logits = at::empty({B, K}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mc_loss_tail_backward_cpu", [&] {
    const TermGrad<scalar_t> g_loss(g_loss_in), g_dis(g_dis_in), g_div(g_div_in);
    const auto ce = cross_entropy_options<scalar_t>(weight, label_smoothing, reduction);
    // sum_b weight[t_b] and sum_i weight[i], the forward's (B and K without weights)
    const scalar_t ws[2] = {
        weight_sums ? weight_sums->select(0, 0).item<scalar_t>() : static_cast<scalar_t>(B),
        weight_sums ? weight_sums->select(0, 1).item<scalar_t>() : static_cast<scalar_t>(K)};
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const scalar_t* gp = has_g_logits ? g_logits.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* lse_p = lse.const_data_ptr<scalar_t>();
    const int64_t* tp = targets.const_data_ptr<int64_t>();
    const int64_t* op = offsets.const_data_ptr<int64_t>();
    scalar_t* gh = grad_h.mutable_data_ptr<scalar_t>();
    scalar_t* gl = grad_logits.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const TailGradScale<scalar_t> scale(g_loss[b], g_dis[b], g_div[b],
                                          static_cast<scalar_t>(alpha), static_cast<scalar_t>(beta),
                                          reduction, ws[0], B, K);
      const RowLogSoftmax<scalar_t> ls(lse_p[2 * b], lse_p[2 * b + 1]);
      for (int64_t i = 0; i < K; ++i) {
        const int64_t e = b * K + i;
        gl[e] = (gp ? gp[e] : scalar_t(0)) +
                ce_logit_grad(scale.per_row, lp[e], ls, i, tp[b], K, ce, ws[1]);
        gh[e] = scale.per_h / group_size<scalar_t>(op, i);
      }
    }
  });
  const at::Tensor m = mask_values(mask, x);
  auto dx = at::empty_like(x);
  launch(
      x, B * K, s.C / K * s.HW, [](const auto& t) { return t.mc_loss_backward; },
      [&](auto& a) {
        using scalar_t = scalar_of<decltype(a)>;
        using acc = typename std::decay_t<decltype(a)>::acc_type;
        set_groups(a, s, offsets, m);
        a.avg_pool = avg_pool;
        a.grad_h = grad_h.const_data_ptr<acc>();
        a.grad_logits = grad_logits.const_data_ptr<acc>();
        a.out = dx.mutable_data_ptr<scalar_t>();
      });
  return dx;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(mcloss_cuda, CPU, m) {
  m.impl("spatial_softmax", &cpu::spatial_softmax_cpu);
  m.impl("spatial_softmax_backward", &cpu::spatial_softmax_backward_cpu);
  m.impl("channel_mask", &cpu::channel_mask_cpu);
  m.impl("ccmp", &cpu::ccmp_cpu);
  m.impl("ccmp_backward", &cpu::ccmp_backward_cpu);
  m.impl("mc_loss", &cpu::mc_loss_cpu);
  m.impl("mc_loss_backward", &cpu::mc_loss_backward_cpu);
}

}  // namespace mcloss

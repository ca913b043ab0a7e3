// Host-side pieces shared by the CPU and CUDA op implementations: argument checks (the last
// line of defence for direct torch.ops calls; the Python API checks first and says more), the
// memory layout the kernels index with, and the mc_loss ops' prologue (check_loss,
// check_loss_backward) and outputs (LossOutputs), so that each backend's op only launches.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>
#include <c10/util/Exception.h>

#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>
#include <vector>

#include "mcloss_math.h"

namespace mcloss {

// Outputs shaped like the features follow their memory format: channels_last stays
// channels_last (a tensor that is both, e.g. H = W = 1, counts as contiguous).
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat format_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline MapLayout layout_of(const at::Tensor& t) {
  const int64_t C = t.size(1), HW = t.size(2) * t.size(3);
  if (is_channels_last(t)) return MapLayout{HW * C, 1, C};
  return MapLayout{C * HW, HW, 1};
}

// Who answers for the values of offsets and targets: Host, read and checked here (the CPU
// ops); Kernel, left to the kernels, which give NaN for values they cannot use (the CUDA ops,
// which cannot read them without a device sync, and the tail's backward, whose targets the
// forward checked).
enum class ValueChecks { Host, Kernel };

inline void check_map(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, ": expected a 4-D tensor (B, C, H, W), got ", x.dim(),
                    "-D of shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name,
                   ": expected a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) > 0, name, ": the spatial map is empty, shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
                    ": expected a contiguous or channels_last tensor, got strides ", x.strides());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(),
                    " (that of ", ref_name, "), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ",
                   ref.scalar_type(), " (that of ", ref_name, "), got ", t.scalar_type());
}

// offsets: int64 (K + 1,), group i is channels [offsets[i], offsets[i+1]); the groups must
// partition [0, C), each non-empty (values checked as `values` says).
inline int64_t check_offsets(const at::Tensor& offsets, const at::Tensor& x, ValueChecks values) {
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 2,
                    "offsets: expected a 1-D tensor of K + 1 >= 2 group boundaries, got shape ",
                    offsets.sizes());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets: expected int64, got ",
                   offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.device() == x.device(), "offsets: expected device ", x.device(),
                    ", got ", offsets.device());
  TORCH_CHECK_VALUE(offsets.is_contiguous(), "offsets: expected a contiguous tensor");
  const int64_t K = offsets.size(0) - 1;
  if (values == ValueChecks::Host) {
    const int64_t* o = offsets.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(o[0] == 0 && o[K] == x.size(1),
                      "offsets: expected to start at 0 and end at C=", x.size(1), ", got ", o[0],
                      " and ", o[K]);
    for (int64_t i = 0; i < K; ++i) {
      TORCH_CHECK_VALUE(o[i + 1] > o[i], "offsets: group ", i, " is empty (offsets[", i, "]=", o[i],
                        ", offsets[", i + 1, "]=", o[i + 1], ")");
    }
  }
  return K;
}

// mask: (C,) shared by the batch or (B, C) per sample, the features' dtype, contiguous.
// Returns the mask's batch stride (0 when shared).
inline int64_t check_mask(const at::Tensor& mask, const at::Tensor& x) {
  check_like(mask, x, "mask", "x");
  const int64_t B = x.size(0), C = x.size(1);
  const bool shared = mask.dim() == 1 && mask.size(0) == C;
  const bool per_sample = mask.dim() == 2 && mask.size(0) == B && mask.size(1) == C;
  TORCH_CHECK_VALUE(shared || per_sample, "mask: expected shape (", C, ",) or (", B, ", ", C,
                    "), got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.is_contiguous(), "mask: expected a contiguous tensor");
  return shared ? 0 : C;
}

// The gradient of a map output: same device and dtype as `ref` and the given shape.
inline void check_map_grad(const at::Tensor& grad, const at::Tensor& ref, const char* ref_name,
                           at::IntArrayRef shape) {
  check_like(grad, ref, "grad", ref_name);
  TORCH_CHECK_VALUE(grad.sizes() == shape, "grad: expected shape ", shape, ", got ", grad.sizes());
}

// targets: int64 (B,) class indices in [0, K), on x's device. Left to the kernels (CUDA), a
// bad one gives NaN in the loss and then a device-side trap, as cross_entropy's assert does.
inline void check_targets(const at::Tensor& targets, const at::Tensor& x, int64_t K,
                          ValueChecks values) {
  const int64_t B = x.size(0);
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong,
                   "targets: expected dtype int64 (class indices), got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == B, "targets: expected shape (", B,
                    ",), one class index per sample, got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.device() == x.device(), "targets: expected device ", x.device(),
                    ", got ", targets.device());
  TORCH_CHECK_VALUE(targets.is_contiguous(), "targets: expected a contiguous tensor");
  if (values == ValueChecks::Host) {
    const int64_t* v = targets.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(v[b] >= 0 && v[b] < K, "targets: class indices must lie in [0, ", K,
                        "), got ", v[b], " at ", b);
    }
  }
}

// generator: none (the device's default) or one for x's device type.
inline void check_generator(const std::optional<at::Generator>& generator, const at::Tensor& x) {
  if (generator.has_value() && generator->defined()) {
    TORCH_CHECK_VALUE(generator->device().type() == x.device().type(),
                      "generator: expected a generator for device ", x.device(), ", got one for ",
                      generator->device());
  }
}

inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The discriminality cross-entropy's options: weight (K,) in the accumulation dtype or none,
// label_smoothing in [0, 1], reduction an at::Reduction (0 none, 1 mean, 2 sum).
inline void check_cross_entropy(const std::optional<at::Tensor>& weight, double label_smoothing,
                                int64_t reduction, const at::Tensor& x, int64_t K) {
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK_VALUE(w.device() == x.device(), "weight: expected device ", x.device(),
                      " (that of x), got ", w.device());
    TORCH_CHECK_TYPE(w.scalar_type() == acc_type_of(x), "weight: expected dtype ", acc_type_of(x),
                     " (the accumulation dtype of x), got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == K, "weight: expected shape (", K,
                      ",), one weight per class, got ", w.sizes());
    TORCH_CHECK_VALUE(w.is_contiguous(), "weight: expected a contiguous tensor");
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing: expected a value in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "reduction: expected 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// The arguments of the mc_loss ops, checked once for both backends: the one prologue of their
// CPU and CUDA implementations.
struct LossShape {
  int64_t B, C, K, HW, max_group;
  bool draw;             // no mask given: the op draws one
  bool mask_is_bool;     // a given mask's dtype: bool, else x's
  int64_t mask_rows;     // rows of the mask given or drawn: 1, or B per sample
  int64_t mask_bstride;  // 0 (one row for the batch) or C
  int64_t reduction;     // at::Reduction of the loss terms
};

// (generator: the forward's, for a drawn mask; none for the backward)
inline LossShape check_loss(const at::Tensor& x, const at::Tensor& targets,
                            const at::Tensor& offsets, int64_t max_group,
                            const std::optional<at::Tensor>& mask, bool per_sample_mask,
                            const std::optional<at::Generator>& generator,
                            const std::optional<at::Tensor>& weight, double label_smoothing,
                            int64_t reduction, ValueChecks values) {
  check_map(x, "x");
  const int64_t K = check_offsets(offsets, x, values);
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(max_group >= 1 && max_group <= C,
                    "max_group: expected the largest group's size, in [1, C=", C, "], got ",
                    max_group);
  if (values == ValueChecks::Host) {
    const int64_t* o = offsets.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < K; ++i) {
      TORCH_CHECK_VALUE(o[i + 1] - o[i] <= max_group, "max_group: ", max_group,
                        " is smaller than group ", i, " (", o[i + 1] - o[i], " channels)");
    }
  }
  check_targets(targets, x, K, values);
  check_cross_entropy(weight, label_smoothing, reduction, x, K);
  LossShape s{.B = B,
              .C = C,
              .K = K,
              .HW = x.size(2) * x.size(3),
              .max_group = max_group,
              .draw = !mask.has_value(),
              .mask_is_bool = false,
              .mask_rows = per_sample_mask ? B : 1,
              .mask_bstride = 0,
              .reduction = reduction};
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.device() == x.device(), "mask: expected device ", x.device(),
                      " (that of x), got ", m.device());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == x.scalar_type(),
                     "mask: expected bool or ", x.scalar_type(), " (that of x), got ",
                     m.scalar_type());
    const bool shared = m.dim() == 1 && m.size(0) == C;
    const bool per_sample = m.dim() == 2 && m.size(0) == B && m.size(1) == C;
    TORCH_CHECK_VALUE(shared || per_sample, "mask: expected shape (", C, ",) or (", B, ", ", C,
                      "), got ", m.sizes());
    TORCH_CHECK_VALUE(m.is_contiguous(), "mask: expected a contiguous tensor");
    s.mask_is_bool = m.scalar_type() == at::kBool;
    s.mask_rows = shared ? 1 : B;
  }
  check_generator(generator, x);
  s.mask_bstride = s.mask_rows == 1 ? 0 : C;
  return s;
}

// The shape of loss, dis and div (and of their gradients): (B,) per sample with reduction
// none, else 0-dim.
inline std::vector<int64_t> loss_term_shape(int64_t B, int64_t reduction) {
  return reduction == kReduceNone ? std::vector<int64_t>{B} : std::vector<int64_t>{};
}

// The outputs of the mc_loss op, allocated once for both backends (see the schema in ops.cpp).
// drawn_mask is (C,) shared by the batch, as a given mask would be, or (B, C) per sample; (0,)
// when a mask was given.
struct LossOutputs {
  at::Tensor loss, dis, div, logits, lse, drawn_mask, weight_sums;

  LossOutputs(const at::Tensor& x, const LossShape& s, bool per_sample_mask) {
    const auto acc = x.options().dtype(acc_type_of(x));
    const std::vector<int64_t> term = loss_term_shape(s.B, s.reduction);
    loss = at::empty(term, acc);
    dis = at::empty(term, acc);
    div = at::empty(term, acc);
    logits = at::empty({s.B, s.K}, acc);
    lse = at::empty({s.B, 2}, acc);
    weight_sums = at::empty({2}, acc);
    const auto bool_opts = x.options().dtype(at::kBool);
    drawn_mask = !s.draw           ? at::empty({0}, bool_opts)
                 : per_sample_mask ? at::empty({s.B, s.C}, bool_opts)
                                   : at::empty({s.C}, bool_opts);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  as_tuple() const {
    return {loss, dis, div, logits, lse, drawn_mask, weight_sums};
  }
};

// The kernels' view of the checked options (the weight in T, the accumulation dtype).
template <typename T>
CrossEntropyOptions<T> cross_entropy_options(const std::optional<at::Tensor>& weight,
                                             double label_smoothing, int64_t reduction) {
  return {weight.has_value() ? weight->const_data_ptr<T>() : nullptr,
          static_cast<T>(label_smoothing), reduction};
}

// mc_loss_backward's arguments: those of the forward (the mask it used), its logits and lse,
// and the gradients of its outputs, each undefined (zero) or in the accumulation dtype.
inline LossShape check_loss_backward(
    const std::optional<at::Tensor>& g_loss, const std::optional<at::Tensor>& g_dis,
    const std::optional<at::Tensor>& g_div, const std::optional<at::Tensor>& g_logits,
    const at::Tensor& x, const at::Tensor& targets, const at::Tensor& offsets, int64_t max_group,
    const at::Tensor& mask, const at::Tensor& logits, const at::Tensor& lse,
    const std::optional<at::Tensor>& weight, double label_smoothing, int64_t reduction,
    const std::optional<at::Tensor>& weight_sums, ValueChecks values) {
  const LossShape s = check_loss(x, targets, offsets, max_group, mask, false, std::nullopt, weight,
                                 label_smoothing, reduction, values);
  const auto acc = acc_type_of(x);
  auto check_acc = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(),
                      " (that of x), got ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == acc, name, ": expected dtype ", acc, ", got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  };
  const std::pair<const std::optional<at::Tensor>*, const char*> scalars[] = {
      {&g_loss, "grad_loss"}, {&g_dis, "grad_dis"}, {&g_div, "grad_div"}};
  const std::vector<int64_t> term_shape = loss_term_shape(s.B, reduction);
  for (const auto& [g, name] : scalars) {
    if (g->has_value() && (*g)->defined()) check_acc(**g, name, term_shape);
  }
  if (g_logits.has_value() && g_logits->defined()) {
    check_acc(*g_logits, "grad_logits", {s.B, s.K});
  }
  check_acc(logits, "logits", {s.B, s.K});
  check_acc(lse, "lse", {s.B, 2});
  if (weight_sums.has_value()) {
    check_acc(*weight_sums, "weight_sums", {2});
  } else {
    TORCH_CHECK_VALUE(!weight.has_value(),
                      "weight_sums: expected the forward's weight_sums with a weight (None "
                      "stands for B and K, the sums without weights)");
  }
  return s;
}

}  // namespace mcloss

// Host-side pieces shared by the CPU and CUDA op implementations: argument checks (the last
// line of defence for direct torch.ops calls; the Python API checks first and says more) and
// the memory layout the kernels index with.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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
    TORCH_CHECK_VALUE(o[0] == 0 && o[K] == x.size(1), "offsets: expected to start at 0 and end at C=",
                      x.size(1), ", got ", o[0], " and ", o[K]);
    for (int64_t i = 0; i < K; ++i) {
      TORCH_CHECK_VALUE(o[i + 1] > o[i], "offsets: group ", i, " is empty (offsets[", i, "]=",
                        o[i], ", offsets[", i + 1, "]=", o[i + 1], ")");
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

inline void check_group_grad(const at::Tensor& g, const at::Tensor& x, int64_t K,
                             const char* name) {
  TORCH_CHECK_VALUE(g.device() == x.device(), name, ": expected device ", x.device(), ", got ",
                    g.device());
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == K, name,
                    ": expected shape (", x.size(0), ", ", K, "), got ", g.sizes());
}

// The gradient of a map output: same device and dtype as `ref` and the given shape.
inline void check_map_grad(const at::Tensor& grad, const at::Tensor& ref, const char* ref_name,
                           at::IntArrayRef shape) {
  check_like(grad, ref, "grad", ref_name);
  TORCH_CHECK_VALUE(grad.sizes() == shape, "grad: expected shape ", shape, ", got ",
                    grad.sizes());
}

// targets: int64 (B,) class indices in [0, K), on the logits' device. Left to the kernels, a
// bad one gives NaN in the loss and that sample's gradient (on CUDA the Python API's
// device-side assert reports it too).
inline void check_targets(const at::Tensor& targets, const at::Tensor& logits,
                          ValueChecks values) {
  const int64_t B = logits.size(0), K = logits.size(1);
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong,
                   "targets: expected dtype int64 (class indices), got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == B, "targets: expected shape (", B,
                    ",), one class index per sample, got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), "targets: expected device ",
                    logits.device(), ", got ", targets.device());
  if (values == ValueChecks::Host) {
    const at::Tensor t = targets.contiguous();
    const int64_t* v = t.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(v[b] >= 0 && v[b] < K, "targets: class indices must lie in [0, ", K,
                        "), got ", v[b], " at ", b);
    }
  }
}

// What both tail ops take: logits (B, K) in the accumulation dtype (float or double), targets
// (see check_targets) and offsets int64 (K + 1,) on the logits' device. Returns (B, K).
inline std::pair<int64_t, int64_t> check_logits(const at::Tensor& logits,
                                                const at::Tensor& targets,
                                                const at::Tensor& offsets, ValueChecks values) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected a 2-D tensor (B, K), got shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   "logits: expected float32 or float64, got ", logits.scalar_type());
  const int64_t B = logits.size(0), K = logits.size(1);
  check_targets(targets, logits, values);
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets: expected int64, got ",
                   offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == K + 1, "offsets: expected shape (",
                    K + 1, ",), got ", offsets.sizes());
  TORCH_CHECK_VALUE(offsets.device() == logits.device(), "offsets: expected device ",
                    logits.device(), ", got ", offsets.device());
  return {B, K};
}

// mc_loss_tail's arguments: h like the logits, and the targets (their values as `values` says;
// the backward gets the same targets). Returns (B, K).
inline std::pair<int64_t, int64_t> check_tail(const at::Tensor& h, const at::Tensor& logits,
                                              const at::Tensor& targets,
                                              const at::Tensor& offsets, ValueChecks values) {
  const auto shape = check_logits(logits, targets, offsets, values);
  check_like(h, logits, "h", "logits");
  TORCH_CHECK_VALUE(h.sizes() == logits.sizes(), "h: expected shape ", logits.sizes(),
                    " (that of logits), got ", h.sizes());
  return shape;
}

// mc_loss_tail_backward's arguments: the gradients of the scalar outputs 0-dim, that of the
// logits (B, K), lse (B, 2), all in the logits' dtype and on their device. Returns (B, K).
inline std::pair<int64_t, int64_t> check_tail_backward(
    const at::Tensor& g_loss, const at::Tensor& g_dis, const at::Tensor& g_div,
    const at::Tensor& g_logits, const at::Tensor& logits, const at::Tensor& lse,
    const at::Tensor& targets, const at::Tensor& offsets) {
  const auto [B, K] = check_logits(logits, targets, offsets, ValueChecks::Kernel);
  const std::pair<const at::Tensor*, const char*> scalars[] = {
      {&g_loss, "grad_loss"}, {&g_dis, "grad_dis"}, {&g_div, "grad_div"}};
  for (const auto& [g, name] : scalars) {
    check_like(*g, logits, name, "logits");
    TORCH_CHECK_VALUE(g->dim() == 0, name, ": expected a 0-dim tensor, got shape ", g->sizes());
  }
  check_like(g_logits, logits, "grad_logits", "logits");
  TORCH_CHECK_VALUE(g_logits.sizes() == logits.sizes(), "grad_logits: expected shape ",
                    logits.sizes(), ", got ", g_logits.sizes());
  check_like(lse, logits, "lse", "logits");
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == 2,
                    "lse: expected shape (", B, ", 2), got ", lse.sizes());
  return {B, K};
}

}  // namespace mcloss

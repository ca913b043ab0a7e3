// Autograd for the four forward ops, in C++ (registered for the Autograd dispatch key) so that
// a training step pays no Python for it: each forward redispatches below autograd to the
// CPU/CUDA kernel and saves only what its hand-written backward op needs. The backward ops
// themselves have no autograd formula (no double backward).
//
// Saved for backward: spatial_softmax its output; channel_mask the (C,) or (B, C) mask; ccmp
// its inputs (x itself and offsets); mc_loss x, offsets, the mask it used, the targets, the
// (B, K) logits and their (B, 2) log-softmax statistics; never anything else of the size of x.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace mcloss {
namespace autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using MapOp = at::Tensor(const at::Tensor&);
using MapMapOp = at::Tensor(const at::Tensor&, const at::Tensor&);
using GradMapMapOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

// The kernels read (B, C, H, W) maps contiguous or channels_last; an incoming gradient can
// have any strides (an expanded one from .sum(), say).
at::Tensor kernel_layout(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

class SpatialSoftmax : public torch::autograd::Function<SpatialSoftmax> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    static const auto fwd = op<MapOp>("mcloss_cuda::spatial_softmax");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = fwd.call(x);
    ctx->save_for_backward({out});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<MapMapOp>("mcloss_cuda::spatial_softmax_backward");
    const at::Tensor out = ctx->get_saved_variables()[0];
    return {bwd.call(grads[0], out)};
  }
};

class ChannelMask : public torch::autograd::Function<ChannelMask> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({mask});
    return channel_mask().call(x, mask);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    // d(x * m)/dx = m: the same op on the gradient; the mask gets none
    return {channel_mask().call(kernel_layout(grads[0]), mask), at::Tensor()};
  }

 private:
  static const c10::TypedOperatorHandle<MapMapOp>& channel_mask() {
    static const auto handle = op<MapMapOp>("mcloss_cuda::channel_mask");
    return handle;
  }
};

class Ccmp : public torch::autograd::Function<Ccmp> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& offsets) {
    static const auto fwd = op<MapMapOp>("mcloss_cuda::ccmp");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, offsets});
    return fwd.call(x, offsets);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<GradMapMapOp>("mcloss_cuda::ccmp_backward");
    const auto saved = ctx->get_saved_variables();
    return {bwd.call(grads[0], saved[0], saved[1]), at::Tensor()};
  }
};

// The whole loss: one node. Saved: x, the targets, offsets and the mask it used (given, or the
// drawn one it returns), its logits, their (B, 2) log-softmax statistics, the weight sums and
// the weight. Gradients are not materialised: an output that took no part reaches the backward
// op as None, with no fill.
class McLoss : public torch::autograd::Function<McLoss> {
 public:
  using ForwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
      const std::optional<at::Tensor>&, int64_t, double, bool, std::optional<at::Generator>, double,
      double, bool, const std::optional<at::Tensor>&, double, int64_t);
  using BackwardOp = at::Tensor(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                double, bool, const std::optional<at::Tensor>&, double, int64_t,
                                const std::optional<at::Tensor>&);

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& targets,
                               const at::Tensor& offsets, int64_t max_group,
                               const std::optional<at::Tensor>& mask, int64_t drop,
                               double drop_fraction, bool per_sample_mask,
                               std::optional<at::Generator> generator, double alpha, double beta,
                               bool avg_pool, const std::optional<at::Tensor>& weight,
                               double label_smoothing, int64_t reduction) {
    static const auto fwd = op<ForwardOp>("mcloss_cuda::mc_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, dis, div, logits, lse, drawn, weight_sums] =
        fwd.call(x, targets, offsets, max_group, mask, drop, drop_fraction, per_sample_mask,
                 std::move(generator), alpha, beta, avg_pool, weight, label_smoothing, reduction);
    ctx->save_for_backward({x, targets, offsets, mask.has_value() ? *mask : drawn, logits, lse,
                            weight_sums, weight.has_value() ? *weight : at::Tensor()});
    ctx->saved_data["max_group"] = max_group;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["avg_pool"] = avg_pool;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = reduction;
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({lse, drawn, weight_sums});
    return {loss, dis, div, logits, lse, drawn, weight_sums};
  }
  // grads: of loss, dis, div and logits (undefined for an output that took no part), then of
  // lse, drawn_mask and weight_sums (never defined)
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<BackwardOp>("mcloss_cuda::mc_loss_backward");
    const auto saved = ctx->get_saved_variables();
    auto grad = [&](int i) -> std::optional<at::Tensor> {
      if (!grads[i].defined()) return std::nullopt;
      return grads[i];
    };
    const std::optional<at::Tensor> weight =
        saved[7].defined() ? std::optional<at::Tensor>(saved[7]) : std::nullopt;
    const at::Tensor dx = bwd.call(
        grad(0), grad(1), grad(2), grad(3), saved[0], saved[1], saved[2],
        ctx->saved_data["max_group"].toInt(), saved[3], saved[4], saved[5],
        ctx->saved_data["alpha"].toDouble(), ctx->saved_data["beta"].toDouble(),
        ctx->saved_data["avg_pool"].toBool(), weight, ctx->saved_data["label_smoothing"].toDouble(),
        ctx->saved_data["reduction"].toInt(), saved[6]);
    variable_list out(15);  // one per forward argument; only x has a gradient
    out[0] = dx;
    return out;
  }
};

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(mcloss_cuda, Autograd, m) {
  m.impl("spatial_softmax", [](const at::Tensor& x) { return autograd::SpatialSoftmax::apply(x); });
  m.impl("channel_mask", [](const at::Tensor& x, const at::Tensor& mask) {
    return autograd::ChannelMask::apply(x, mask);
  });
  m.impl("ccmp", [](const at::Tensor& x, const at::Tensor& offsets) {
    return autograd::Ccmp::apply(x, offsets);
  });
  m.impl("mc_loss", [](const at::Tensor& x, const at::Tensor& targets, const at::Tensor& offsets,
                       int64_t max_group, const std::optional<at::Tensor>& mask, int64_t drop,
                       double drop_fraction, bool per_sample_mask,
                       std::optional<at::Generator> generator, double alpha, double beta,
                       bool avg_pool, const std::optional<at::Tensor>& weight,
                       double label_smoothing, int64_t reduction) {
    auto out = autograd::McLoss::apply(x, targets, offsets, max_group, mask, drop, drop_fraction,
                                       per_sample_mask, std::move(generator), alpha, beta, avg_pool,
                                       weight, label_smoothing, reduction);
    return std::make_tuple(out[0], out[1], out[2], out[3], out[4], out[5], out[6]);
  });
}

}  // namespace mcloss

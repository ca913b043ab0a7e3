// Autograd for the five forward ops, in C++ (registered for the Autograd dispatch key) so that
// a training step pays no Python for it: each forward redispatches below autograd to the
// CPU/CUDA kernel and saves only what its hand-written backward op needs. The backward ops
// themselves have no autograd formula (no double backward).
//
// Saved for backward: spatial_softmax its output; channel_mask the (C,) or (B, C) mask; ccmp
// and mc_loss_forward their inputs (x itself, plus offsets and mask); mc_loss those inputs,
// the targets, the (B, K) logits and their (B, 2) log-softmax statistics; never anything else of the size
// of x. (The mc_loss forward runs its pieces itself rather than redispatching to the op's
// composite kernel, to keep what its backward needs.)
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "mc_loss.h"

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

class McLossForward : public torch::autograd::Function<McLossForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& offsets,
                               const at::Tensor& mask) {
    static const auto fwd =
        op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&)>("mcloss_cuda::mc_loss_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    // Only x (plus the tiny offsets and mask) is kept: the backward kernel recomputes the
    // softmax statistics and the per-position winners instead of storing them.
    ctx->save_for_backward({x, offsets, mask});
    auto [h, logits] = fwd.call(x, offsets, mask);
    return {h, logits};
  }
  // An output that took no part in the loss arrives as zeros (materialised grads).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&)>("mcloss_cuda::mc_loss_backward");
    const auto saved = ctx->get_saved_variables();
    return {bwd.call(grads[0], grads[1], saved[0], saved[1], saved[2]), at::Tensor(),
            at::Tensor()};
  }
};

// The whole loss (csrc/mc_loss.h). Saved: the kernel's inputs as for mc_loss_forward, the
// targets, the logits and their per-row max and log-sum-exp.
class McLoss : public torch::autograd::Function<McLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& targets, const at::Tensor& offsets,
                               const at::Tensor& mask, double alpha, double beta) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [h, logits] = mc_loss_sums(x, offsets, mask);
    LossTail t = loss_tail(h, logits, targets, offsets, alpha, beta);
    ctx->save_for_backward({x, targets, offsets, mask, logits, t.lse});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    return {t.loss, t.dis, t.div, logits};
  }
  // grads: of loss, dis, div and logits (zeros for an output that took no part)
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&)>("mcloss_cuda::mc_loss_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &targets = saved[1], &offsets = saved[2], &mask = saved[3];
    auto [grad_h, grad_logits] = loss_tail_backward(
        grads[0], grads[1], grads[2], grads[3], saved[4], saved[5], targets, offsets,
        ctx->saved_data["alpha"].toDouble(), ctx->saved_data["beta"].toDouble());
    return {bwd.call(grad_h, grad_logits, x, offsets, mask), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(mcloss_cuda, Autograd, m) {
  m.impl("spatial_softmax",
         [](const at::Tensor& x) { return autograd::SpatialSoftmax::apply(x); });
  m.impl("channel_mask", [](const at::Tensor& x, const at::Tensor& mask) {
    return autograd::ChannelMask::apply(x, mask);
  });
  m.impl("ccmp", [](const at::Tensor& x, const at::Tensor& offsets) {
    return autograd::Ccmp::apply(x, offsets);
  });
  m.impl("mc_loss_forward",
         [](const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& mask) {
           auto out = autograd::McLossForward::apply(x, offsets, mask);
           return std::make_tuple(out[0], out[1]);
         });
  m.impl("mc_loss", [](const at::Tensor& x, const at::Tensor& targets, const at::Tensor& offsets,
                       const at::Tensor& mask, double alpha, double beta) {
    auto out = autograd::McLoss::apply(x, targets, offsets, mask, alpha, beta);
    return std::make_tuple(out[0], out[1], out[2], out[3]);
  });
}

}  // namespace mcloss

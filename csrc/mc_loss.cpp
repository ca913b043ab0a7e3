// mcloss_cuda::mc_loss, the op behind mcloss_cuda.mc_loss: the fused forward kernel
// (mc_loss_forward, CPU or CUDA by the dispatcher) and then the (B, K)-sized rest of the loss
// in ATen (mc_loss.h). Registered for CompositeExplicitAutograd, so one implementation
// serves every backend; its autograd formula is in csrc/autograd/mcloss_autograd.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "mc_loss.h"

namespace mcloss {

std::tuple<at::Tensor, at::Tensor> mc_loss_sums(const at::Tensor& x, const at::Tensor& offsets,
                                                const at::Tensor& mask) {
  static const auto fwd =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mcloss_cuda::mc_loss_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&)>();
  return fwd.call(x, offsets, mask);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mc_loss(
    const at::Tensor& x, const at::Tensor& targets, const at::Tensor& offsets,
    const at::Tensor& mask, double alpha, double beta) {
  auto [h, logits] = mc_loss_sums(x, offsets, mask);
  LossTail t = loss_tail(h, logits, targets, offsets, alpha, beta);
  return {t.loss, t.dis, t.div, logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(mcloss_cuda, CompositeExplicitAutograd, m) {
  m.impl("mc_loss", &mc_loss);
}

}  // namespace mcloss

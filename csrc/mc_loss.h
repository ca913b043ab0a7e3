// The mc_loss op: the whole loss in one op, so that a training step records one autograd node
// for it instead of a dozen small ops and nodes, each with its Python and dispatch cost, and a
// CUDA step launches four kernels for the loss (two fused passes over x, two small ones for
// the (B, K) tail) instead of one per ATen op of the tail besides the two fused ones.
//
// Its (B, K)-sized end, from the fused kernel's per-group diversity sums h and logits:
//   div = 1 - mean(h / n_i),  dis = cross_entropy(logits, targets),  loss = alpha*dis + beta*div
// as the reference's assemble() (mcloss_cuda/_common.py) computes them with torch ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace mcloss {

// mc_loss_forward's (h, logits) for x (which checks x, offsets and mask; the tail op checks the
// targets): the start of the loss op, shared by its CompositeExplicitAutograd kernel
// (mc_loss.cpp) and its autograd formula.
std::tuple<at::Tensor, at::Tensor> mc_loss_sums(const at::Tensor& x, const at::Tensor& offsets,
                                                const at::Tensor& mask);

// The tail, through the ops mc_loss_tail and mc_loss_tail_backward (CPU and CUDA kernels on
// the formulas of mcloss_math.h): loss, dis and div, and lse, every row of logits' max and
// log-sum-exp (B, 2) (kept, with the logits, for the backward).
struct LossTail {
  at::Tensor loss, dis, div, lse;
};

inline LossTail loss_tail(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& targets,
                          const at::Tensor& offsets, double alpha, double beta) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mcloss_cuda::mc_loss_tail", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
              double)>();
  auto [loss, dis, div, lse] = op.call(h, logits, targets, offsets, alpha, beta);
  return {loss, dis, div, lse};
}

// Gradients of h and logits, both (B, K), given those of the four outputs (loss, dis, div,
// logits); an unused output's gradient arrives as zeros.
inline std::tuple<at::Tensor, at::Tensor> loss_tail_backward(
    const at::Tensor& g_loss, const at::Tensor& g_dis, const at::Tensor& g_div,
    const at::Tensor& g_logits, const at::Tensor& logits, const at::Tensor& lse,
    const at::Tensor& targets, const at::Tensor& offsets, double alpha, double beta) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mcloss_cuda::mc_loss_tail_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
              double)>();
  return op.call(g_loss, g_dis, g_div, g_logits, logits, lse, targets, offsets, alpha, beta);
}

}  // namespace mcloss

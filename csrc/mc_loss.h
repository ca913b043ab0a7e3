// The mc_loss op: the whole loss in one op, so that a training step records one autograd node
// for it instead of a dozen small ops and nodes, each with its Python and dispatch cost (on the
// 2-core CPU that tail took ~0.37 ms a step from Python, forward and backward; a step is
// 60-100 us faster with it here).
//
// Its (B, K)-sized end, from the fused kernel's per-group diversity sums h and logits to
// (loss, dis, div), runs the very ATen ops, in the same order, that
// mcloss_cuda._common.assemble runs for the reference:
//   div = 1 - mean(h / n_i),  dis = cross_entropy(logits, targets),  loss = alpha*dis + beta*div
// and its backward applies the formulas autograd would apply to them. Device-agnostic: every
// op here has CPU and CUDA kernels in ATen.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace mcloss {

// mc_loss_forward's (h, logits) for x, with x, offsets and mask checked by that op and the
// targets here: the start of the loss op, shared by its CompositeExplicitAutograd kernel
// (mc_loss.cpp) and its autograd formula.
std::tuple<at::Tensor, at::Tensor> mc_loss_sums(const at::Tensor& x, const at::Tensor& targets,
                                                const at::Tensor& offsets, const at::Tensor& mask);

// Whether t's values can be read on the host: a CPU tensor that is not a stand-in traced by
// torch.compile or opcheck (a fake or functional tensor, whose sizes may be symbolic too).
inline bool values_on_host(const at::Tensor& t) {
  return t.device().is_cpu() &&
         !t.key_set().has_any(c10::DispatchKeySet(
             {c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// targets: int64 (B,) class indices in [0, K), on x's device. The values are checked where
// reading them is free (CPU); on CUDA a bad one ends in nll_loss's device-side assert.
inline void check_targets(const at::Tensor& targets, const at::Tensor& x, const c10::SymInt& K) {
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong,
                   "targets: expected dtype int64 (class indices), got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.sym_size(0) == x.sym_size(0),
                    "targets: expected shape (", x.sym_size(0), ",) to match the batch of x, got ",
                    targets.sym_sizes());
  TORCH_CHECK_VALUE(targets.device() == x.device(), "targets: expected device ", x.device(),
                    ", got ", targets.device());
  if (values_on_host(targets)) {
    const at::Tensor t = targets.contiguous();
    const int64_t* v = t.const_data_ptr<int64_t>();
    const int64_t num_classes = K.expect_int();
    for (int64_t b = 0; b < t.numel(); ++b) {
      TORCH_CHECK_VALUE(v[b] >= 0 && v[b] < num_classes, "targets: class indices must lie in [0, ",
                        num_classes, "), got ", v[b], " at ", b);
    }
  }
}

// What the forward computes, and what its backward needs besides the kernel's inputs.
struct LossTail {
  at::Tensor loss, dis, div;
  at::Tensor log_probs, total_weight;  // of the cross-entropy (kept for its backward)
  at::Tensor sizes;                    // n_i, the channel count of every group, in h's dtype
};

inline LossTail loss_tail(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& targets,
                          const at::Tensor& offsets, double alpha, double beta) {
  LossTail t;
  t.sizes = at::diff(offsets).to(h.scalar_type());
  t.div = at::rsub(at::mean(at::div(h, t.sizes)), 1);
  // cross_entropy as torch composes it: log_softmax over classes, then nll_loss (mean over
  // the batch, ignore_index -100)
  t.log_probs = at::_log_softmax(logits, 1, /*half_to_float=*/false);
  std::tie(t.dis, t.total_weight) =
      at::nll_loss_forward(t.log_probs, targets, {}, at::Reduction::Mean, -100);
  t.loss = at::add(at::mul(t.dis, alpha), at::mul(t.div, beta));
  return t;
}

struct LossTailGrads {
  at::Tensor h, logits;  // (B, K) each
};

// Gradients of h and logits given those of the four outputs (loss, dis, div, logits); an
// unused output's gradient arrives as zeros.
inline LossTailGrads loss_tail_backward(const at::Tensor& g_loss, const at::Tensor& g_dis,
                                        const at::Tensor& g_div, const at::Tensor& g_logits,
                                        const LossTail& t, const at::Tensor& targets,
                                        double alpha, double beta) {
  const at::Tensor g_dis_all = at::add(g_dis, at::mul(g_loss, alpha));
  const at::Tensor g_div_all = at::add(g_div, at::mul(g_loss, beta));
  const at::Tensor g_log_probs = at::nll_loss_backward(
      g_dis_all, t.log_probs, targets, {}, at::Reduction::Mean, -100, t.total_weight);
  LossTailGrads g;
  g.logits = at::add(g_logits, at::_log_softmax_backward_data(g_log_probs, t.log_probs, 1,
                                                              t.log_probs.scalar_type()));
  // through 1 - mean(h / n): -g / (B K), spread over (B, K), then / n_i
  g.h = at::div(at::div(at::neg(g_div_all), c10::Scalar(t.log_probs.sym_numel()))
                    .expand_symint(t.log_probs.sym_sizes()),
                t.sizes);
  return g;
}

}  // namespace mcloss

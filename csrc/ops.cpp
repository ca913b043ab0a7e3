// The op schemas, defined once; csrc/cpu and csrc/cuda register their kernels against them,
// csrc/autograd their autograd formulas, and mcloss_cuda/_ops.py the fake (meta) implementations.
//
//   offsets: int64 (K + 1,) group boundaries; group i is channels [offsets[i], offsets[i+1]).
//   mask:    (C,) or (B, C), multiplied into the features (CWA): x's dtype for channel_mask,
//            bool or x's dtype for mc_loss.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mcloss_cuda, m) {
  // softmax over the H*W positions of every (b, c) channel, and its backward from the output
  m.def("spatial_softmax(Tensor x) -> Tensor");
  m.def("spatial_softmax_backward(Tensor grad, Tensor out) -> Tensor");
  // x * mask; its backward is channel_mask(grad, mask)
  m.def("channel_mask(Tensor x, Tensor mask) -> Tensor");
  // cross-channel max pooling (B, C, H, W) -> (B, K, H, W); backward routes each gradient to
  // the first channel attaining its group's max, recomputed from x
  m.def("ccmp(Tensor x, Tensor offsets) -> Tensor");
  m.def("ccmp_backward(Tensor grad, Tensor x, Tensor offsets) -> Tensor");
  // The whole loss of (B, C, H, W) features in one op, its backward in another (one autograd
  // node; each a CPU and a CUDA kernel). offsets as above; max_group >= every group's size
  // (sizes the GPU's tiles without reading offsets on the host). mask None: the op draws it,
  // per group d = drop (>= 0) or floor(n_i * drop_fraction) channels dropped, one row (C,) or,
  // per_sample_mask, (B, C), from generator (or the device's default), and returns it as
  // drawn_mask (bool, True = kept; (0,) when a mask is given). Given: bool or x's dtype, (C,) or
  // (B, C). avg_pool: the logits average the group's masked channels (CCAP) instead of taking
  // their max. weight ((K,) or None), label_smoothing and reduction (at::Reduction: 0 none,
  // 1 mean, 2 sum) as F.cross_entropy's for dis. loss, dis, div 0-dim ((B,) for reduction
  // none) and logits (B, K) as mcloss_cuda.mc_loss; kept for the backward: lse (B, 2), every
  // row of logits' max and log sum exp(logit - max), and weight_sums (2,): sum_b weight[t_b]
  // and sum_i weight[i] (B and K without weights). Accumulation dtype (fp64 for fp64 x, else
  // fp32) for all but drawn_mask.
  m.def(
      "mc_loss(Tensor x, Tensor targets, Tensor offsets, int max_group, Tensor? mask, int drop, "
      "float drop_fraction, bool per_sample_mask, Generator? generator, float alpha, float beta, "
      "bool avg_pool=False, Tensor? weight=None, float label_smoothing=0.0, int reduction=1) "
      "-> (Tensor loss, Tensor dis, Tensor div, Tensor logits, Tensor lse, Tensor drawn_mask, "
      "Tensor weight_sums)");
  // dx from the gradients of (loss, dis, div, logits) (None: zero); mask: the one the forward
  // used (given or drawn); weight_sums the forward's (None: B and K, right without weights)
  m.def(
      "mc_loss_backward(Tensor? grad_loss, Tensor? grad_dis, Tensor? grad_div, "
      "Tensor? grad_logits, Tensor x, Tensor targets, Tensor offsets, int max_group, Tensor mask, "
      "Tensor logits, Tensor lse, float alpha, float beta, bool avg_pool=False, "
      "Tensor? weight=None, float label_smoothing=0.0, int reduction=1, "
      "Tensor? weight_sums=None) -> Tensor");
}

// A plain C extension module: importing it runs the registrations above (and those of the
// kernels); it exposes only whether the CUDA sources were compiled in.
static PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef MCLOSS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }

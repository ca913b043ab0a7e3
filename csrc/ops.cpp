// The op schemas, defined once; csrc/cpu and csrc/cuda register their kernels against them,
// csrc/autograd their autograd formulas, and mcloss_cuda/_ops.py the fake (meta) implementations.
//
//   offsets: int64 (K + 1,) group boundaries; group i is channels [offsets[i], offsets[i+1]).
//   mask:    (C,) or (B, C) in the features' dtype, multiplied into the features (CWA).
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
  // one pass over x: per (b, i) the diversity sum h = sum_k max_j softmax(x[b,j])[k] and the
  // logit mean_k max_j mask[b,j] * x[b,j,k], both (B, K) in fp32 (fp64 for fp64 x)
  m.def("mc_loss_forward(Tensor x, Tensor offsets, Tensor mask) -> (Tensor, Tensor)");
  // one pass over x writing dx, given the gradients of h and of the logits
  m.def(
      "mc_loss_backward(Tensor grad_h, Tensor grad_logits, Tensor x, Tensor offsets, "
      "Tensor mask) -> Tensor");
  // the (B, K) end of the loss, from mc_loss_forward's h and logits: the scalars and, for the
  // backward, lse (B, 2): every row of logits' max and log sum exp(logit - max) (targets in
  // [0, K); n_i from offsets)
  m.def(
      "mc_loss_tail(Tensor h, Tensor logits, Tensor targets, Tensor offsets, float alpha, "
      "float beta) -> (Tensor loss, Tensor dis, Tensor div, Tensor lse)");
  // its backward: the gradients of h and logits from those of (loss, dis, div, logits)
  m.def(
      "mc_loss_tail_backward(Tensor grad_loss, Tensor grad_dis, Tensor grad_div, "
      "Tensor grad_logits, Tensor logits, Tensor lse, Tensor targets, Tensor offsets, "
      "float alpha, float beta) -> (Tensor grad_h, Tensor grad_logits_in)");
  // the whole loss: mc_loss_forward, then cross-entropy over the logits and the diversity term
  // (csrc/mc_loss.h); returns (loss, dis, div, logits), each differentiable
  m.def(
      "mc_loss(Tensor x, Tensor targets, Tensor offsets, Tensor mask, float alpha, float beta) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
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

// The fastinfluence operator library: every schema, in one place. Kernels are registered per
// device in ops/cpu/*_kernel.cpp and ops/cuda/*_glue.cpp; fake (meta) kernels and autograd in
// fastinfluence/ops/_native.py; pure-PyTorch twins in fastinfluence/ops/twins.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An importable, empty Python module: importing fastinfluence._C runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastinfluence native kernels; the ops live in torch.ops.fastinfluence",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastinfluence, m) {
  // Softmax-CE head Hessian times k directions Vw [k, C, d], Vb [k, C], plus damping·V, in one
  // pass over A. The second output is empty ([0]) when Vb is None (a head without bias).
  m.def("head_hvp(Tensor A, Tensor P, Tensor Vw, Tensor? Vb, float damping) -> (Tensor, Tensor)");
  // scores[i, j] = −(p_i − onehot(y_i))ᵀ (Sw[j] a_i + Sb[j]) for k directions Sw [k, C, d],
  // Sb [k, C]: [n, k], in one pass over A.
  m.def("head_scores(Tensor A, Tensor P, Tensor y, Tensor Sw, Tensor? Sb) -> Tensor");
  // In place v ← g + (1 − damping/scale)·v − hv/scale.
  m.def("lissa_update_(Tensor(a!) v, Tensor g, Tensor hv, float damping, float scale) -> ()");
  // The head LiSSA recursion for k right-hand sides Gw [k, C, d], Gb [k, C] (minibatches of
  // batch_size rows drawn from seed, shared by the k; None: all rows), returning h/scale. The
  // second output is empty ([0]) when Gb is None.
  m.def(
      "head_lissa(Tensor A, Tensor P, Tensor Gw, Tensor? Gb, float damping, float scale, "
      "int depth, int? batch_size, int seed) -> (Tensor, Tensor)");
  // x [n, S, in], grad_out [n, S, out] -> [n, out, in].
  m.def("linear_per_sample_grad(Tensor x, Tensor grad_out) -> Tensor");
  // x [n, S, in], grad_out [n, S, out], v [out, in] -> [n].
  m.def("linear_per_sample_grad_dot(Tensor x, Tensor grad_out, Tensor v) -> Tensor");
  // x_unfolded [n, K, L], grad_out [n, C_out, L] -> [n, C_out, K].
  m.def("conv2d_per_sample_grad(Tensor x_unfolded, Tensor grad_out) -> Tensor");
  // x_unfolded [n, K, L], grad_out [n, C_out, L], v [C_out, K] -> [n].
  m.def("conv2d_per_sample_grad_dot(Tensor x_unfolded, Tensor grad_out, Tensor v) -> Tensor");
}

// The op schemas of reptile_fused, and the Python module entry point.
//
// The extension has no Python API of its own: importing reptile_fused._C only
// loads this shared library, whose static initialisers register the schemas below
// and the CPU / CUDA kernels (cpu/kernels.cpp, cuda/kernels.cu) with the
// dispatcher.  Because nothing here touches the CPython API beyond creating an
// empty module, it is built against the limited API (Py_LIMITED_API, set in
// setup.py) and one binary serves every Python >= 3.10 for a given torch.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Fused flat-buffer ops of reptile_fused, registered as torch.ops.reptile_fused.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// Scalars a CUDA graph may need to change between replays come as a float plus an
// optional one-element tensor that, when given, replaces it (read on the device).  First-order MAML: the step ops may also write
// their own update (param after - param before) into `update`, and task_end_ /
// batched_meta_update_ may count a task as anchor + update instead of reading it.
// adam_step_'s `fused` selects torch.optim.Adam(fused=True)'s CPU arithmetic, for which
// `spans` ((offset, numel) pairs) names the tensors the flat buffer packs.
TORCH_LIBRARY(reptile_fused, m) {
  m.def(
      "sgd_step_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, float lr, Tensor? lr_tensor, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, "
      "Tensor(c!)? update) -> ()");
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, float step, Tensor? step_tensor, float lr, Tensor? lr_tensor, "
      "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
      "Tensor(e!)? update, bool fused, int[]? spans) -> ()");
  m.def("task_end_(Tensor(a!) param, Tensor anchor, Tensor(b!) acc, Tensor? update) -> ()");
  m.def(
      "meta_update_(Tensor(a!) param, Tensor anchor, Tensor(b!) acc, float meta_lr, Tensor? meta_lr_tensor, "
      "float n, Tensor? n_tensor) -> ()");
  m.def(
      "batched_meta_update_(Tensor(a!) theta, Tensor(b!) tasks, float meta_lr, Tensor? meta_lr_tensor, "
      "bool write_back, Tensor? updates) -> ()");
}

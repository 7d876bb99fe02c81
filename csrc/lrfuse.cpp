// Every schema of the lrfuse ops, in one place. Backends add kernels with TORCH_LIBRARY_IMPL
// (csrc/cpu, csrc/cuda); Python imports this module only to run the registrations.
//
// One call updates every tensor of every parameter group on one device. `group_of[i]` is the
// row of `hyper` (float64, one row per group, columns in update_rules.h) that tensor i reads,
// so groups with different learning rates share the call. Optional state lists are empty
// (the feature is off) or hold one tensor per parameter.
#include <Python.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "cpu_isa.h"

#ifndef LRFUSE_WITH_CUDA
#define LRFUSE_WITH_CUDA 0  // setup.py defines it to 1 when it compiles csrc/cuda
#endif

extern "C" {
// `import lrfuse._C` loads this shared object, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", LRFUSE_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

namespace lrfuse {

// C++ references to the tensors of a call plan that an optimizer keeps between steps. A tensor
// that only its Python object references pays a Python refcount round trip (with a GIL acquire)
// each time the dispatcher boxes and releases it; with one more C++ reference that is a plain
// atomic increment. For 2,000 parameters (12,000 tensors a call) boxing drops from ~1.1 to
// ~0.4 ms a step.
struct TensorRefs : torch::CustomClassHolder {
  explicit TensorRefs(std::vector<at::Tensor> tensors) : tensors(std::move(tensors)) {}
  std::vector<at::Tensor> tensors;
};

}  // namespace lrfuse

TORCH_LIBRARY(lrfuse, m) {
  m.def(
      "fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, "
      "int[] group_of, Tensor hyper, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "fused_rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] momentum_buffers, Tensor(d!)[] grad_avgs, Tensor(e!)[] steps, "
      "int[] group_of, Tensor hyper, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Which vectorized variant of the CPU kernels this processor runs (for benchmark reports).
  m.def("cpu_isa() -> str", &lrfuse::cpu_isa);
  m.class_<lrfuse::TensorRefs>("TensorRefs").def(torch::init<std::vector<at::Tensor>>());
}

// The lrfuse library: one op per update rule (csrc/rules/all.h), its schema generated from the
// rule (csrc/fused_op.h). Backends add kernels with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda);
// Python imports this module only to run the registrations.
#include <Python.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "fused_op.h"
#include "kept_plan.h"

#ifndef LRFUSE_WITH_CUDA
#define LRFUSE_WITH_CUDA 0  // setup.py defines it to 1 when it compiles csrc/cuda
#endif

extern "C" {
// `import lrfuse._C` loads this shared object, which runs the registrations below; its one Python
// function is the kept plan's identity scan.
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"kept_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&lrfuse::kept_grads)), METH_FASTCALL,
       "This step's gradients if a kept call plan still stands, else None (csrc/kept_plan.cpp)."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
#define LRFUSE_DEF(Rule) m.def(lrfuse::schema<lrfuse::Rule>().c_str());
  LRFUSE_RULES(LRFUSE_DEF)
#undef LRFUSE_DEF
  // Which vectorized variant of the CPU kernels this processor runs (for benchmark reports).
  m.def("cpu_isa() -> str", &lrfuse::cpu_isa);
  m.class_<lrfuse::TensorRefs>("TensorRefs").def(torch::init<std::vector<at::Tensor>>());
}

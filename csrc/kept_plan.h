// The identity scan behind lrfuse.optim._cache.StepCache.kept (see kept_plan.cpp).
#pragma once

#include <Python.h>

namespace lrfuse {

// kept_grads(param_lists, params, has_grad, state, state_keys, state_dicts, state_items):
// this step's gradients if the optimizer holds exactly the objects a plan was built from, else None.
PyObject* kept_grads(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace lrfuse

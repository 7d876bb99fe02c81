// Whether an optimizer's kept call plan still stands, in one C pass: the parameters of every group,
// which of them have a gradient, and `optimizer.state` (its keys, its dicts, each key and value in
// them) must be the very objects the plan was built from. Whatever users do to `opt.state` between
// steps replaces one of those objects. The same scans in Python cost ~0.35 us a parameter (0.7 ms
// a step for 2,000 parameters); here most of the cost is reading `.grad`, which the step needs anyway.
#include "kept_plan.h"

namespace lrfuse {
namespace {

// Whether `state` (a dict of dicts) holds exactly keys[i] -> dicts[i] in order, and dict i the
// keys and values of `items` (key, value, key, value, ...) in order. Runs no Python code.
bool same_state(PyObject* state, PyObject* keys, PyObject* dicts, PyObject* items) {
  const Py_ssize_t num_dicts = PyList_GET_SIZE(dicts), num_items = PyList_GET_SIZE(items);
  if (!PyDict_Check(state) || PyDict_GET_SIZE(state) != num_dicts || PyList_GET_SIZE(keys) != num_dicts)
    return false;
  Py_ssize_t pos = 0, i = 0, k = 0;
  PyObject *key, *dict;
  while (PyDict_Next(state, &pos, &key, &dict)) {
    if (key != PyList_GET_ITEM(keys, i) || dict != PyList_GET_ITEM(dicts, i) || !PyDict_Check(dict)) return false;
    ++i;
    Py_ssize_t inner = 0;
    PyObject *name, *value;
    while (PyDict_Next(dict, &inner, &name, &value)) {
      if (k + 2 > num_items || name != PyList_GET_ITEM(items, k) || value != PyList_GET_ITEM(items, k + 1))
        return false;
      k += 2;
    }
  }
  return k == num_items;
}

}  // namespace

PyObject* kept_grads(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "kept_grads takes 7 arguments");
    return nullptr;
  }
  PyObject *param_lists = args[0], *params = args[1], *has_grad = args[2], *state = args[3];
  PyObject *keys = args[4], *dicts = args[5], *items = args[6];
  if (!PyList_Check(param_lists) || !PyList_Check(params) || !PyBytes_Check(has_grad) || !PyList_Check(keys) ||
      !PyList_Check(dicts) || !PyList_Check(items)) {
    PyErr_SetString(PyExc_TypeError, "kept_grads(list, list, bytes, dict, list, list, list)");
    return nullptr;
  }
  static PyObject* const grad_name = PyUnicode_InternFromString("grad");
  if (grad_name == nullptr) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyBytes_GET_SIZE(has_grad) != n) Py_RETURN_NONE;
  const char* had_grad = PyBytes_AS_STRING(has_grad);
  PyObject* grads = PyList_New(n);
  if (grads == nullptr) return nullptr;
  Py_ssize_t j = 0;
  bool same = true;
  // Sizes are read at every turn: reading `.grad` of a tensor subclass may run Python code.
  for (Py_ssize_t g = 0; same && g < PyList_GET_SIZE(param_lists); ++g) {
    PyObject* group = PyList_GET_ITEM(param_lists, g);
    if (!PyList_Check(group)) {
      same = false;
      break;
    }
    Py_INCREF(group);
    for (Py_ssize_t i = 0; same && i < PyList_GET_SIZE(group); ++i, ++j) {
      PyObject* p = PyList_GET_ITEM(group, i);
      if (j >= n || p != PyList_GET_ITEM(params, j)) {
        same = false;
        break;
      }
      Py_INCREF(p);
      PyObject* grad = PyObject_GetAttr(p, grad_name);
      Py_DECREF(p);
      if (grad == nullptr) {
        Py_DECREF(group);
        Py_DECREF(grads);
        return nullptr;
      }
      if ((grad != Py_None) != (had_grad[j] != 0)) {
        Py_DECREF(grad);
        same = false;
        break;
      }
      PyList_SET_ITEM(grads, j, grad);
    }
    Py_DECREF(group);
  }
  // The state last: no Python code runs after it is read.
  if (!same || j != n || !same_state(state, keys, dicts, items)) {
    Py_DECREF(grads);  // entries not yet set are NULL, which list_dealloc skips
    Py_RETURN_NONE;
  }
  return grads;
}

}  // namespace lrfuse

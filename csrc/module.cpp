// The Python extension module cpsl_ops._C (CPU kernels). Importing it loads this shared library,
// whose static initializers register every cpsl_ops:: schema and CPU kernel with the dispatcher;
// it exposes only build facts. Python's limited API of 3.9 (the wheel's cp39-abi3 tag) and
// PyTorch's stable ABI: one binary for every Python >= 3.9 and torch >= TORCH_TARGET_VERSION.
#undef Py_LIMITED_API
#define Py_LIMITED_API 0x03090000
#include <Python.h>
#include <torch/csrc/stable/library.h>
#include <torch/headeronly/version.h>

#include <string>

STABLE_TORCH_LIBRARY(cpsl_ops, m) {
  // Schemas are defined next to each op in csrc/ops/<op>.cpp with STABLE_TORCH_LIBRARY_FRAGMENT.
  (void)m;
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cpsl-ops CPU kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const std::string target = std::to_string(TORCH_TARGET_VERSION >> 56) + "." +
                             std::to_string((TORCH_TARGET_VERSION >> 48) & 0xFF);
  if (PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "abi_target", target.c_str()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

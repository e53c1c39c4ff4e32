// The Python extension module cpsl_ops._C. Importing it loads this shared library, whose static
// initializers register every cpsl_ops:: op with the dispatcher; it exposes only build facts.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifdef CPSL_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(cpsl_ops, m) {
  // Schemas are defined next to each op in csrc/ops/<op>.cpp with TORCH_LIBRARY_FRAGMENT.
  (void)m;
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cpsl-ops native kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION);
#ifdef CPSL_WITH_CUDA
  const std::string cuda_version = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  PyModule_AddStringConstant(module, "cuda_version", cuda_version.c_str());
#else
  PyModule_AddStringConstant(module, "cuda_version", "");
#endif
  return module;
}

// The Python extension module cpsl_ops._C_cuda (CUDA kernels), loaded after cpsl_ops._C and only
// under a CUDA build of torch: it links torch's CUDA libraries, which a CPU-only torch lacks.
// Like _C it uses only Python's limited API of 3.9 and PyTorch's stable ABI.
#undef Py_LIMITED_API
#define Py_LIMITED_API 0x03090000
#include <Python.h>
#include <cuda_runtime_api.h>

#include <string>

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "cpsl-ops CUDA kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const std::string cuda_version = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  if (PyModule_AddStringConstant(module, "cuda_version", cuda_version.c_str()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

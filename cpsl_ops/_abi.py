"""The oldest torch release whose stable ABI the native libraries target (read by setup.py too).

2.11: its stable ABI added tensors over memory of one's own with a deleter (``torch_from_blob``),
which the CPU kernels' recycled outputs need (csrc/include/cpsl_ops/cpu_memory.h); the rest of
the kernels would do with 2.10.
"""

TORCH_ABI_TARGET = (2, 11)

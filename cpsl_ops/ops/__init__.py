"""Python side of the native ops: fake (meta) kernels for torch.compile and autograd formulas.

Each module registers its op only when the extension loaded (registering fake kernels for ops
that do not exist would break ``import cpsl_ops``).
"""

from cpsl_ops._loader import native_available

if native_available():
    from cpsl_ops.ops import prototype_update, rectify, similarity, sinkhorn  # noqa: F401

"""Python side of the native ops: fake (meta) kernels for torch.compile and autograd formulas.

Each module of a native op registers its fake kernel only when the extension loaded (registering
fake kernels for ops that do not exist would break ``import cpsl_ops``); ``class_counts`` is a
Python custom op, registered in every build.
"""

from cpsl_ops._loader import native_available
from cpsl_ops.ops import class_counts  # noqa: F401

if native_available():
    from cpsl_ops.ops import prototype_update, rectify, similarity, sinkhorn  # noqa: F401

"""Python side of the ops: fake (meta) kernels for torch.compile, autograd formulas, and the
reference backend's ops.

The modules of balanced_sinkhorn, update_prototypes and rectify_pseudo_labels register, in every
build, the reference backend's form of the op (``cpsl_ops_reference::<op>``, a Python custom op
running :mod:`cpsl_ops.reference`), and one fake kernel for it and for the native op, the latter
only when the extension loaded (registering fake kernels for ops that do not exist would break
``import cpsl_ops``). ``similarity`` registers the native op's fake kernel and autograd only: its
reference is plain differentiable PyTorch, which every transform traces. ``class_counts`` is a
Python custom op, registered in every build, for both backends.
"""

from cpsl_ops._loader import native_available
from cpsl_ops.ops import class_counts, prototype_update, rectify, sinkhorn  # noqa: F401

if native_available():
    from cpsl_ops.ops import similarity  # noqa: F401

"""Metadata checks shared by the public functions. They read shapes, dtypes and devices only, so
they cost nothing on a GPU and torch.compile can trace them; value checks live in the kernels."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from cpsl_ops.reference import accumulation_dtype, check_metric as check_metric  # the reference checks the metric too

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_tensor(value: object, name: str, ranks: Sequence[int], shape_text: str, floating: bool = True) -> Tensor:
    """``value`` is a tensor of one of ``ranks`` dims with a supported floating (or integer) dtype."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in ranks:
        raise ValueError(f"{name} must be {shape_text}, got shape {tuple(value.shape)}")
    allowed = FLOATING_DTYPES if floating else INTEGER_DTYPES
    if value.dtype not in allowed:
        kind = "fp16, bf16, fp32 or fp64" if floating else "an integer dtype"
        raise TypeError(f"{name} must be {kind}, got {value.dtype}")
    return value


def check_same_device(first: Tensor, first_name: str, second: Tensor, second_name: str) -> None:
    if first.device != second.device:
        raise ValueError(f"{first_name} is on {first.device} but {second_name} is on {second.device}")


def check_nonzero(size: int, what: str) -> None:
    if size == 0:
        raise ValueError(f"{what} must not be empty")


INT64_MAX = 2**63 - 1


def _is_real(value: object) -> bool:
    """An int or float, but not a bool (True is an int in Python, never a meant temperature)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(value: float, name: str, dtype: torch.dtype | None = None) -> float:
    """A positive finite number; with the inputs' ``dtype``, also one that is normal in the dtype the
    kernels compute in (fp32 for fp16, bf16 and fp32 inputs, fp64 for fp64): a temperature or ε
    that is zero or subnormal there (below 1.2e-38 in fp32) overflows the kernels' 1/τ, and the
    backends disagreed on what to return."""
    # Comparisons, not math.isfinite: torch.compile traces a float that changes between calls as a
    # symbolic float, which comparisons accept (as guards) and math.isfinite does not.
    if not (_is_real(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if dtype is not None:
        acc = accumulation_dtype(dtype)
        smallest = torch.finfo(acc).tiny
        if value < smallest:
            raise ValueError(f"{name} must be at least {smallest!r} (the smallest normal {acc}, the dtype of the "
                             f"computation for {dtype} inputs), got {value!r}")
    return float(value)


def check_unit_interval(value: float, name: str) -> float:
    if not (_is_real(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def check_number(value: float, name: str) -> float:
    """A real number (infinities allowed), not NaN and not a bool."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value:  # NaN (as a comparison, for symbolic floats: check_positive says why)
        raise ValueError(f"{name} must not be NaN")
    return float(value)


def check_int(value: int, name: str, minimum: int | None = None, maximum: int = INT64_MAX) -> int:
    """A Python int (not a bool) in [minimum, maximum]; the kernels take int64, hence the default."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if value > maximum or value < -INT64_MAX - 1:
        raise ValueError(f"{name} must lie in [{-INT64_MAX - 1 if minimum is None else minimum}, {maximum}], got {value}")
    return value

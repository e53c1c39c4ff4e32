"""Shared test helpers: devices, dtype tolerances, random tensors and backend comparison."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, settings

import cpsl_ops

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("CPSL_OPS_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (rtol, atol) of a native result against the reference run in the same dtype, for values of
# order one. Both accumulate in fp32 (fp64), so the 16-bit bounds are a few output roundings.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

requires_native = pytest.mark.skipif(not cpsl_ops.native_available(), reason="native extension not built")

# Both backends, for tests that hold of each (selected with cpsl_ops.use_backend).
BACKENDS = [pytest.param("native", marks=requires_native), "reference"]


def random_tensor(shape: Sequence[int], dtype: torch.dtype, device: str, seed: int, transposed: bool = False,
                  scale: float = 1.0) -> torch.Tensor:
    """Normal values; with ``transposed`` the result has the same shape but reversed strides."""
    generator = torch.Generator().manual_seed(seed)
    if transposed:
        data = torch.randn(tuple(reversed(shape)), generator=generator, dtype=torch.float64) * scale
        return data.permute(*reversed(range(len(shape)))).to(device=device, dtype=dtype)
    return (torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def native_and_reference(function: Callable, *args, **kwargs):
    """``function`` run on the native backend, then on the reference backend."""
    with cpsl_ops.use_backend("native"):
        native = function(*args, **kwargs)
    with cpsl_ops.use_backend("reference"):
        expected = function(*args, **kwargs)
    return native, expected


def load_wheel_policy():
    """tools/wheel_policy.py as a module (it is a script, not part of the package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "wheel_policy.py"
    spec = importlib.util.spec_from_file_location("wheel_policy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["wheel_policy"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module

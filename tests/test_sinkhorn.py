"""balanced_sinkhorn: the official iteration, native against reference, properties, stability."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cpsl_ops
from cpsl_ops import reference
from conftest import DEVICES, FLOAT_DTYPES, assert_close, native_and_reference, random_tensor, requires_native

CPSL_PRIOR = torch.tensor([0.37922, 0.04930, 0.22665, 0.01551, 0.01721, 0.01403, 0.00219, 0.00221, 0.13338,
                           0.02424, 0.04341, 0.01315, 0.00161, 0.06605, 0.00408, 0.00279, 0.00185, 0.00123, 0.00191])


def official_sinkhorn(scores: torch.Tensor, prior: torch.Tensor, epsilon: float, num_iters: int) -> torch.Tensor:
    """The exp-domain loop of the official CPSL code, in fp64, for one (N, K) problem."""
    q = torch.exp(scores.double() / epsilon).T
    q /= q.sum()
    classes, samples = q.shape
    r = prior.double() / prior.sum()
    for _ in range(num_iters):
        q /= q.sum(dim=1, keepdim=True)
        q *= r[:, None]
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    return (q * samples).T


@st.composite
def sinkhorn_case(draw):
    batch = draw(st.sampled_from([None, 0, 1, 3]))
    samples = draw(st.integers(1, 300))
    classes = draw(st.integers(1, 40))
    shape = (samples, classes) if batch is None else (batch, samples, classes)
    prior_kind = draw(st.sampled_from(["none", "shared", "per_problem"] if batch is not None else ["none", "shared"]))
    return shape, prior_kind, draw(st.integers(1, 6)), draw(st.sampled_from([0.05, 0.1, 0.02])), draw(
        st.booleans()), draw(st.integers(0, 2**31 - 1))


def make_prior(kind, shape, device, seed):
    if kind == "none":
        return None
    generator = torch.Generator().manual_seed(seed)
    prior_shape = (shape[-1],) if kind == "shared" else (shape[0], shape[-1])
    return (torch.rand(prior_shape, generator=generator) + 0.05).to(device)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(case=sinkhorn_case())
def test_matches_reference(device, dtype, case):
    shape, prior_kind, num_iters, epsilon, transposed, seed = case
    scores = random_tensor(shape, dtype, device, seed, transposed=transposed).clamp(-1, 1)
    prior = make_prior(prior_kind, shape, device, seed)
    native, expected = native_and_reference(cpsl_ops.balanced_sinkhorn, scores, prior, epsilon, num_iters)
    assert native.shape == scores.shape and native.dtype == dtype and not native.requires_grad
    assert_close(native, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@given(case=sinkhorn_case())
def test_equals_official_iteration(device, case):
    shape, prior_kind, num_iters, epsilon, _, seed = case
    scores = random_tensor(shape, torch.float64, device, seed).clamp(-1, 1)
    prior = make_prior(prior_kind, shape, device, seed)
    result = cpsl_ops.balanced_sinkhorn(scores, prior, epsilon, num_iters)
    problems = scores.reshape(-1, *shape[-2:])
    priors = torch.ones(shape[-1], device=device) if prior is None else prior
    for b, problem in enumerate(problems):
        expected = official_sinkhorn(problem, priors if priors.dim() == 1 else priors[b], epsilon, num_iters)
        torch.testing.assert_close(result.reshape(problems.shape)[b], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_sum_to_one_and_classes_approach_prior(device, dtype):
    scores = random_tensor((4000, 19), dtype, device, 0).clamp(-1, 1)
    prior = CPSL_PRIOR.to(device)
    three = cpsl_ops.balanced_sinkhorn(scores, prior, 0.05, 3)
    torch.testing.assert_close(three.sum(1), torch.ones(4000, dtype=dtype, device=device))
    many = cpsl_ops.balanced_sinkhorn(scores, prior, 0.05, 300)
    class_share = many.double().mean(0)
    torch.testing.assert_close(class_share, prior.double() / prior.sum(), rtol=2e-3, atol=1e-5)
    gap = lambda q: (q.double().mean(0) - prior.double()).abs().sum()  # noqa: E731
    assert gap(many) < gap(three)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_added_to_one_class_changes_nothing(device):
    scores = random_tensor((500, 7), torch.float64, device, 0).clamp(-1, 1)
    shifted = scores.clone()
    shifted[:, 3] += 0.7
    prior = torch.rand(7, dtype=torch.float64, device=device) + 0.1
    torch.testing.assert_close(cpsl_ops.balanced_sinkhorn(scores, prior), cpsl_ops.balanced_sinkhorn(shifted, prior))


# |shift| keeping every k/64 score in [-2, 2] and its shift exact in each dtype.
EXACT_SHIFT = {torch.float64: 2.0**40, torch.float32: 2.0**16, torch.float16: 16.0, torch.bfloat16: 1.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@given(data=st.data())
def test_shifting_or_masking_one_class_changes_nothing(device, dtype, backend, data):
    """The iteration normalizes each class first: an exact shift of one class's scores, or one class
    masked to any finite constant, gives the same assignment bit for bit, however large the shift."""
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    batch, samples, classes = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 300)), data.draw(st.integers(2, 24))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scores = (torch.randint(-128, 129, (batch, samples, classes), generator=generator) / 64).to(device=device, dtype=dtype)
    shifted_class, masked_class = data.draw(st.integers(0, classes - 1)), data.draw(st.integers(0, classes - 1))
    shift = data.draw(st.integers(-int(EXACT_SHIFT[dtype]) * 64, int(EXACT_SHIFT[dtype]) * 64)) / 64
    largest = torch.finfo(dtype).max
    mask = torch.tensor(data.draw(st.floats(-largest, largest, allow_nan=False, allow_infinity=False)), dtype=dtype)
    shifted = scores.clone()
    shifted[..., shifted_class] += shift
    assert torch.equal(shifted[..., shifted_class] - shift, scores[..., shifted_class])  # the shift is exact
    masked, zeroed = scores.clone(), scores.clone()
    masked[..., masked_class], zeroed[..., masked_class] = mask.item(), 0.0
    prior = torch.rand(classes, generator=generator).to(device) + 0.05
    epsilon = data.draw(st.sampled_from([0.01, 0.05, 0.5]))
    with cpsl_ops.use_backend(backend):
        assert torch.equal(cpsl_ops.balanced_sinkhorn(shifted, prior, epsilon), cpsl_ops.balanced_sinkhorn(scores, prior, epsilon))
        assert torch.equal(cpsl_ops.balanced_sinkhorn(masked, prior, epsilon), cpsl_ops.balanced_sinkhorn(zeroed, prior, epsilon))


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mask", [-1e12, -3e38, 1e30, -60000.0, 65000.0])
@pytest.mark.parametrize("samples", [40, 1000, 5000])
def test_a_masked_class_matches_the_reference(device, dtype, mask, samples):
    """Masked to a constant far from the other scores, a class gets the same mass natively as in the
    reference, and as masked to 0, on either design of the CPU kernel's first pass (narrow or
    widely spread scores)."""
    if abs(mask) > torch.finfo(dtype).max:
        pytest.skip("not a finite value of this dtype")
    for spread in (1.0, 8.0):  # cosine-like scores, and logits the CPU kernel takes in two passes
        scores = (random_tensor((2, samples, 7), torch.float64, device, samples) * spread).clamp(-3 * spread, 3 * spread)
        scores[..., 2] = mask
        scores = scores.to(dtype)
        prior = CPSL_PRIOR[:7].to(device)
        native, expected = native_and_reference(cpsl_ops.balanced_sinkhorn, scores, prior, 0.05)
        assert_close(native, expected, dtype)
        zeroed = scores.clone()
        zeroed[..., 2] = 0
        native_zeroed, expected_zeroed = native_and_reference(cpsl_ops.balanced_sinkhorn, zeroed, prior, 0.05)
        assert torch.equal(native, native_zeroed) and torch.equal(expected, expected_zeroed)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_equals_separate_calls(device):
    scores = random_tensor((3, 200, 11), torch.float32, device, 1).clamp(-1, 1)
    prior = torch.rand(3, 11, device=device) + 0.1
    batched = cpsl_ops.balanced_sinkhorn(scores, prior)
    for b in range(3):
        torch.testing.assert_close(batched[b], cpsl_ops.balanced_sinkhorn(scores[b], prior[b]), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_overlapping_windows(device):
    rows = random_tensor((50, 5), torch.float32, device, 2).clamp(-1, 1)
    windows = rows.as_strided((3, 30, 5), (10 * 5, 5, 1))
    result = cpsl_ops.balanced_sinkhorn(windows)
    for b in range(3):
        torch.testing.assert_close(result[b], cpsl_ops.balanced_sinkhorn(rows[10 * b:10 * b + 30]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 5e-4), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("epsilon", [0.01, 0.05])
def test_small_epsilon_and_low_precision_match_fp64(device, dtype, tolerance, epsilon):
    # Logits of a τ = 0.08 classifier reach 12.5, so S/ε reaches above 1000: exp overflows without care.
    scores = (random_tensor((3000, 19), torch.float32, device, 3) * 6).to(dtype)
    prior = CPSL_PRIOR.to(device)
    result = cpsl_ops.balanced_sinkhorn(scores, prior, epsilon, 3)
    assert torch.isfinite(result).all()
    exact = cpsl_ops.balanced_sinkhorn(scores.double(), prior, epsilon, 3)
    error = (result.double() - exact).abs().max().item()
    assert error <= tolerance
    torch.testing.assert_close(result.double().sum(1), torch.ones(3000, dtype=torch.float64, device=device),
                               rtol=0, atol=tolerance * 19)
    if cpsl_ops.native_available():
        # The kernel's error against fp64 is at most about that of the reference in the same dtype.
        with cpsl_ops.use_backend("reference"):
            reference_error = (cpsl_ops.balanced_sinkhorn(scores, prior, epsilon, 3).double() - exact).abs().max()
        assert error <= 2 * reference_error.item() + 1e-6


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_no_gradient(backend):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    scores = torch.randn(10, 3, requires_grad=True)
    with cpsl_ops.use_backend(backend):
        assert not cpsl_ops.balanced_sinkhorn(scores).requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 3e38])  # 3e38 / ε overflows
@pytest.mark.parametrize("row", [4, 70, 73])  # in a whole group of 8 rows, in a second tile, in the last rows
def test_non_finite_scores_raise(device, backend, bad, row):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    scores = torch.randn(75, 3, device=device)
    scores[row, 1] = bad
    with cpsl_ops.use_backend(backend), pytest.raises(ValueError, match="NaN or infinite"):
        cpsl_ops.balanced_sinkhorn(scores, epsilon=0.05)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("prior", [torch.tensor([0.5, 0.0, 0.5]), torch.tensor([0.5, -0.1, 0.6]),
                                   torch.tensor([0.5, float("nan"), 0.5])])
def test_bad_prior_values_raise(backend, prior):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    with cpsl_ops.use_backend(backend), pytest.raises(ValueError, match="positive and finite"):
        cpsl_ops.balanced_sinkhorn(torch.randn(10, 3), prior)


@pytest.mark.parametrize(
    "scores, kwargs, error, message",
    [
        (torch.randn(10), {}, ValueError, "scores must be"),
        (torch.randn(1, 2, 3, 4), {}, ValueError, "scores must be"),
        (torch.randn(10, 3).long(), {}, TypeError, "scores must be fp16"),
        (torch.randn(0, 3), {}, ValueError, "N samples. must not be empty"),
        (torch.randn(4, 0), {}, ValueError, "K classes. must not be empty"),
        (torch.randn(10, 3), {"class_prior": torch.ones(4)}, ValueError, "class_prior must be .3,."),
        (torch.randn(2, 10, 3), {"class_prior": torch.ones(3, 3)}, ValueError, r"or \(2, 3\)"),
        (torch.randn(10, 3), {"class_prior": torch.ones(3, device="meta")}, ValueError, "on meta"),
        (torch.randn(10, 3), {"epsilon": 0.0}, ValueError, "epsilon must be"),
        (torch.randn(10, 3), {"num_iters": 0}, ValueError, "num_iters must be at least 1"),
        (torch.randn(10, 3), {"num_iters": 2.5}, TypeError, "num_iters must be an int"),
        (torch.randn(10, 3), {"num_iters": 2**63}, ValueError, "num_iters must lie in"),
        (torch.randn(10, 3), {"num_iters": True}, TypeError, "num_iters must be an int"),
        (torch.randn(10, 3), {"epsilon": True}, ValueError, "epsilon must be a positive finite number"),
    ],
)
def test_bad_input(scores, kwargs, error, message):
    with pytest.raises(error, match=message):
        cpsl_ops.balanced_sinkhorn(scores, **kwargs)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpsl_size_and_large_n_match_reference(device, dtype):
    prior = CPSL_PRIOR.to(device)
    for shape in [(8, 65_792, 19), (1, 1_048_576, 19)]:
        scores = (random_tensor(shape, torch.float32, device, 7).clamp(-3, 3) / 3).to(dtype)
        native, expected = native_and_reference(cpsl_ops.balanced_sinkhorn, scores, prior)
        assert_close(native, expected, dtype)


@requires_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_blocks_walking_several_chunks_match_reference():
    # 5,862 chunks of 1,024 rows: more than any GPU holds resident blocks of the cooperative launch.
    scores = random_tensor((3, 2_000_000, 19), torch.float32, "cuda", 11).clamp(-3, 3) / 3
    native, expected = native_and_reference(cpsl_ops.balanced_sinkhorn, scores, CPSL_PRIOR.cuda())
    assert_close(native, expected, torch.float32)


@requires_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_direct_op_call_with_a_prior_on_another_device_raises():
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.cpsl_ops.balanced_sinkhorn(torch.rand(1, 10, 3, device="cuda"), torch.ones(1, 3), 0.05, 3)


def test_empty_batch_returns_empty():
    assert cpsl_ops.balanced_sinkhorn(torch.randn(0, 5, 3)).shape == (0, 5, 3)


@requires_native
def test_recycled_output_buffers_hold_only_the_new_result():
    # 2 × 70,000 × 19 fp32 is 10 MB: large outputs come from a buffer that a freed output left.
    first_scores, second_scores = (random_tensor((2, 70_000, 19), torch.float32, "cpu", seed) for seed in (1, 2))
    with cpsl_ops.use_backend("native"):
        freed = cpsl_ops.balanced_sinkhorn(first_scores, CPSL_PRIOR)
        freed_address = freed.data_ptr()
        del freed
        recycled = cpsl_ops.balanced_sinkhorn(second_scores, CPSL_PRIOR)
        kept = recycled.clone()
        alongside = cpsl_ops.balanced_sinkhorn(first_scores, CPSL_PRIOR)
    assert recycled.data_ptr() == freed_address
    assert alongside.data_ptr() != recycled.data_ptr()  # a live output is never handed out again
    assert torch.equal(recycled, kept)
    with cpsl_ops.use_backend("reference"):
        assert_close(recycled, cpsl_ops.balanced_sinkhorn(second_scores, CPSL_PRIOR), torch.float32)
        assert_close(alongside, cpsl_ops.balanced_sinkhorn(first_scores, CPSL_PRIOR), torch.float32)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
def test_rows_whose_classes_are_all_scaled_down_are_recomputed(device):
    # 299 rows prefer class 0 by 1.5 / ε = 150 in the exponent; one row with much larger scores sets
    # the column log-sum-exps, and the prior gives class 0 almost nothing. Iterations 2 and 3 then
    # scale class 0 down by e^-69 relative to the others, so the 299 rows' stored softmax rescales
    # to about 1e-35 (below the 1e-19 floor) and must be recomputed from the scores.
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(300, 4, generator=generator, dtype=torch.float64) * 0.01
    scores[:, 1:] -= 1.5
    scores[299] = torch.tensor([3.0, 2.99, 2.99, 2.99])
    prior = torch.tensor([1e-15, 0.333, 0.333, 0.334], dtype=torch.float64)
    native, expected = native_and_reference(cpsl_ops.balanced_sinkhorn, scores.float().to(device), prior.to(device),
                                            0.01, 3)
    assert_close(native, official_sinkhorn(scores, prior, 0.01, 3).to(device), torch.float32)
    assert_close(native, expected, torch.float32)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("prior", [
    torch.tensor([3e38, 1e38, 2e38]),  # the sum overflows fp32
    torch.tensor([4e-45, 1e-45, 3e-45]),  # fp32 denormals
    torch.tensor([3e-300, 1e-300, 2e-300], dtype=torch.float64),  # zeros once cast to fp32
])
def test_priors_near_the_float_range_are_normalized_safely(backend, prior):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    scores = random_tensor((2, 40, 3), torch.float32, "cpu", 7)
    rescaled = prior.double() / prior.double().amax()  # the same prior, of order one
    with cpsl_ops.use_backend(backend):
        torch.testing.assert_close(cpsl_ops.balanced_sinkhorn(scores, prior),
                                   cpsl_ops.balanced_sinkhorn(scores, rescaled), rtol=1e-5, atol=1e-6)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked_rows", ["the first row", "the CPU kernel's sampled tiles"])
def test_a_class_masked_in_some_rows_keeps_the_precision_of_the_others(device, masked_rows):
    """x = (S - M)/eps subtracts each class's largest score: a reference score far below it (a masked
    first row, or masked rows where the CPU kernel samples its tiles) would cost x its precision."""
    scores = random_tensor((1, 4096, 4), torch.float64, device, 3).clamp(-1, 1)
    rows = [0] if masked_rows == "the first row" else [r for i in range(16) for r in range(256 * i, 256 * i + 64)]
    scores[0, rows, 3] = -1e6
    expected = reference.balanced_sinkhorn(scores, CPSL_PRIOR[:4].double().to(device)[None], 0.05, 3)
    native = cpsl_ops.balanced_sinkhorn(scores.float(), CPSL_PRIOR[:4].to(device), 0.05)
    assert_close(native, expected, torch.float32)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_a_prior_entry_whose_ratio_to_the_largest_underflows(backend):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    scores = random_tensor((50, 4), torch.float32, "cpu", 4)
    prior = torch.tensor([1e10, 1e-320, 1.0, 1.0], dtype=torch.float64)
    with cpsl_ops.use_backend(backend):
        result = cpsl_ops.balanced_sinkhorn(scores, prior)
    assert torch.isfinite(result).all() and result[:, 1].max() < 1e-30
    torch.testing.assert_close(result.sum(1), torch.ones(50))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_epsilon_below_the_smallest_normal_of_the_accumulation_dtype_raises_on_both_backends(device, dtype, backend):
    # ε = 1e-40 is subnormal in fp32, the kernels' dtype for 16- and 32-bit scores: the native
    # kernel raised (its 1/ε overflows) where the reference returned an assignment.
    tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    scores = torch.zeros(4, 3, dtype=dtype, device=device)
    with cpsl_ops.use_backend(backend):
        for epsilon in (tiny / 100, tiny / 2, 1e-320 if dtype == torch.float64 else 1e-40):
            with pytest.raises(ValueError, match=f"epsilon must be at least {tiny!r}"):
                cpsl_ops.balanced_sinkhorn(scores, epsilon=epsilon)
        assert torch.allclose(cpsl_ops.balanced_sinkhorn(scores, epsilon=tiny).double(),
                              torch.full((4, 3), 1 / 3, dtype=torch.float64), atol=1e-3)


RECYCLED_OUTPUT_PROBE = """
import torch, cpsl_ops
scores = torch.rand(200_000, 19)  # a 15 MB assignment: above the recycling threshold of 8 MiB
out = cpsl_ops.balanced_sinkhorn(scores)
try:
    out.resize_(300_000, 19)
    torch.add(scores, 1, out=cpsl_ops.balanced_sinkhorn(scores[:100_000]))
    print("grew")
except RuntimeError as error:
    print("fixed:", error)
"""


@requires_native
@pytest.mark.parametrize("recycle", ["1", "0"])
def test_recycled_cpu_outputs_cannot_grow_unless_recycling_is_off(recycle, tmp_path):
    # Documented (functional.balanced_sinkhorn, docs/api.rst): a recycled output's storage is memory of
    # the kernels' own, which PyTorch cannot grow; with CPSL_OPS_RECYCLE_OUTPUTS=0 it is PyTorch's.
    env = {**os.environ, "CPSL_OPS_RECYCLE_OUTPUTS": recycle}
    # Run outside the checkout, whose cpsl_ops/ (without a built extension in CI) would shadow the
    # installed package.
    result = subprocess.run([sys.executable, "-c", RECYCLED_OUTPUT_PROBE], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = "grew" if recycle == "0" else "fixed: Trying to resize storage that is not resizable"
    assert result.stdout.strip() == expected

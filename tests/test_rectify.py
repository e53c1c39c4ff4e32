"""rectify_pseudo_labels and class_distribution."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cpsl_ops
from conftest import BACKENDS, DEVICES, FLOAT_DTYPES, assert_close, native_and_reference, random_tensor, requires_native

IGNORE = 255


@st.composite
def rectify_case(draw):
    shape = (draw(st.integers(0, 3)), draw(st.integers(1, 25)), draw(st.integers(1, 7)), draw(st.integers(0, 50)))
    return shape, draw(st.sampled_from([0.0, 0.3, 0.6])), draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def soft_labels(shape, dtype, device, seed, transposed=False):
    return random_tensor(shape, torch.float32, device, seed, transposed=transposed).softmax(dim=1).to(dtype)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(case=rectify_case())
def test_matches_reference(device, dtype, case):
    shape, threshold, transposed, seed = case
    soft = soft_labels(shape, dtype, device, seed, transposed)
    logits = random_tensor(shape, dtype, device, seed + 1, scale=5.0)
    (labels, confidence), (expected_labels, expected_confidence) = native_and_reference(
        cpsl_ops.rectify_pseudo_labels, soft, logits, threshold, IGNORE)
    assert labels.dtype == torch.long and confidence.dtype == dtype
    assert_close(confidence, expected_confidence, dtype)
    # Labels may differ only where two classes tie to within rounding.
    mismatch = labels != expected_labels
    assert mismatch.sum().item() <= (0 if dtype == torch.float64 else 0.02 * mismatch.numel())


@pytest.mark.parametrize("device", DEVICES)
def test_definition_on_a_known_pixel(device):
    soft = torch.tensor([0.5, 0.3, 0.2], device=device).view(1, 3, 1, 1)
    logits = torch.tensor([0.0, 1.0, 0.0], device=device).view(1, 3, 1, 1)
    product = soft.flatten() * logits.flatten().softmax(0)
    labels, confidence = cpsl_ops.rectify_pseudo_labels(soft, logits)
    assert labels.item() == product.argmax().item() == 1
    torch.testing.assert_close(confidence.flatten(), (product.max() / product.sum()).view(1))
    ignored, _ = cpsl_ops.rectify_pseudo_labels(soft, logits, threshold=0.9, ignore_index=IGNORE)
    assert ignored.item() == IGNORE


@pytest.mark.parametrize("device", DEVICES)
def test_underflowing_products_and_zero_mass(device):
    soft = torch.tensor([[1.0, 0.0], [0.0, 0.0]], device=device).T.reshape(1, 2, 1, 2)
    logits = torch.tensor([[-200.0, 200.0], [0.0, 0.0]], device=device).T.reshape(1, 2, 1, 2)
    labels, confidence = cpsl_ops.rectify_pseudo_labels(soft, logits, ignore_index=IGNORE)
    assert labels.flatten().tolist() == [0, IGNORE]
    assert confidence.flatten().tolist() == [1.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("bad_soft, bad_logit", [(-0.1, 0.0), (float("nan"), 0.0), (0.5, float("inf"))])
def test_bad_values_raise(device, backend, bad_soft, bad_logit):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    soft, logits = torch.rand(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    soft[0, 1, 1, 0], logits[0, 2, 0, 1] = bad_soft, bad_logit
    soft, logits = soft.to(device), logits.to(device)
    with cpsl_ops.use_backend(backend), pytest.raises(ValueError, match="non-negative"):
        cpsl_ops.rectify_pseudo_labels(soft, logits)


def test_mixed_dtypes_are_promoted():
    labels, confidence = cpsl_ops.rectify_pseudo_labels(torch.rand(1, 3, 2, 2), torch.randn(1, 3, 2, 2).bfloat16())
    assert confidence.dtype == torch.float32 and labels.shape == (1, 2, 2)


@pytest.mark.parametrize(
    "soft, logits, error, message",
    [
        (torch.rand(3, 2, 2), torch.rand(3, 2, 2), ValueError, "soft_pseudo_labels must be"),
        (torch.rand(1, 3, 2, 2), torch.rand(1, 4, 2, 2), ValueError, "must have the same shape"),
        (torch.rand(1, 0, 2, 2), torch.rand(1, 0, 2, 2), ValueError, "class dimension K must not be empty"),
        (torch.ones(1, 3, 2, 2, dtype=torch.long), torch.rand(1, 3, 2, 2), TypeError, "fp16"),
        (torch.rand(1, 3, 2, 2), torch.rand(1, 3, 2, 2, device="meta"), ValueError, "on meta"),
    ],
)
def test_bad_input(soft, logits, error, message):
    with pytest.raises(error, match=message):
        cpsl_ops.rectify_pseudo_labels(soft, logits)


@pytest.mark.parametrize("threshold, error", [(float("nan"), ValueError), (True, TypeError), ("0.5", TypeError)])
def test_bad_threshold(threshold, error):
    with pytest.raises(error, match="threshold must"):
        cpsl_ops.rectify_pseudo_labels(torch.rand(1, 3, 2, 2), torch.rand(1, 3, 2, 2), threshold)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_labels_whose_sum_overflows_agree_with_the_reference(device, dtype):
    big = torch.finfo(dtype).max / 2
    soft = torch.full((1, 4, 2, 3), big, dtype=dtype, device=device)
    soft[0, 1, 0, 0] = big / 3
    logits = torch.zeros(1, 4, 2, 3, dtype=dtype, device=device)
    native, expected = native_and_reference(cpsl_ops.rectify_pseudo_labels, soft, logits, 0.2)
    assert torch.equal(native[0], expected[0])
    torch.testing.assert_close(native[1], expected[1])
    torch.testing.assert_close(expected[1][0, 0, 1], torch.tensor(0.25, dtype=dtype, device=device))


def test_class_distribution():
    labels = torch.tensor([[0, 1, 1, IGNORE], [2, 2, 2, IGNORE]])
    torch.testing.assert_close(cpsl_ops.class_distribution(labels, 4), torch.tensor([1 / 6, 2 / 6, 3 / 6, 0.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        cpsl_ops.class_distribution(labels, 2)
    with pytest.raises(ValueError, match="every label equals ignore_index"):
        cpsl_ops.class_distribution(torch.full((3,), IGNORE), 4)
    with pytest.raises(TypeError, match="integer"):
        cpsl_ops.class_distribution(torch.rand(3), 4)


def test_class_distribution_compiles_at_fullgraph_and_still_raises_value_errors():
    compiled = torch.compile(cpsl_ops.class_distribution, fullgraph=True, backend="aot_eager")
    labels = torch.tensor([[0, 1, 1, IGNORE], [2, 2, 2, IGNORE]])
    torch.testing.assert_close(compiled(labels, 4), cpsl_ops.class_distribution(labels, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        compiled(labels, 2)
    with pytest.raises(ValueError, match="every label equals ignore_index"):
        compiled(torch.full((3,), IGNORE), 4)
    # An argument error found while tracing: the same ValueError where the graph may break.
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        torch.compile(cpsl_ops.class_distribution, backend="aot_eager")(labels, 0)


def test_class_counts_op_registration():
    torch.library.opcheck(torch.ops.cpsl_ops.class_counts.default, (torch.tensor([0, 3, 1, IGNORE, 3]), 4, IGNORE))


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("scale", [1e8, -1e8, 3e37])
def test_soft_labels_still_count_next_to_large_logits(device, backend, scale):
    # log p + l rounded log p away: with equal logits of 1e8 every pixel got label 0, confidence 1.
    soft = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.0, 0.45, 0.55], [0.5, 0.5, 0.0], [0.3, 0.3, 0.4]])
    logits = torch.full_like(soft, scale)
    logits[4] = torch.tensor([scale, scale, scale]) + torch.tensor([0.0, 1.0, -1.0]) * abs(scale) * 2**-21
    soft, logits = (t.T.reshape(1, 3, 5, 1).to(device) for t in (soft, logits))
    with cpsl_ops.use_backend(backend):
        labels, confidence = cpsl_ops.rectify_pseudo_labels(soft, logits)
    product = soft.double() * logits.double().softmax(dim=1)
    assert torch.equal(labels, product.argmax(dim=1))
    assert_close(confidence, product.amax(dim=1) / product.sum(dim=1), torch.float32)



def proda_denoised_labels(probabilities, features, centroids, proto_temperature, threshold):
    """ProDA's rectification as its paper and code describe it (microsoft/ProDA), written out."""
    distances = torch.linalg.vector_norm(features[:, None] - centroids[None, :, :, None, None], dim=2)
    weights = torch.softmax(-(distances - distances.min(1, keepdim=True).values) * proto_temperature, dim=1)
    rectified = weights * probabilities
    labels = rectified.argmax(1)
    confidence = rectified.max(1).values / rectified.sum(1)
    return labels.masked_fill(confidence < threshold, 255)


@pytest.mark.parametrize("backend", BACKENDS)
def test_proda_denoising_is_rectification_with_euclidean_logits(backend):
    generator = torch.Generator().manual_seed(5)
    probabilities = torch.rand(2, 6, 5, 7, generator=generator, dtype=torch.float64).softmax(1)
    features = torch.randn(2, 8, 5, 7, generator=generator, dtype=torch.float64)
    centroids = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    expected = proda_denoised_labels(probabilities, features, centroids, 1.0, 0.3)
    with cpsl_ops.use_backend(backend):
        logits = cpsl_ops.prototype_similarity(features, centroids, 1.0, "euclidean")
        labels, _ = cpsl_ops.rectify_pseudo_labels(probabilities, logits, 0.3)
    assert torch.equal(labels, expected)
    assert 0 < (expected == 255).sum() < expected.numel()  # the threshold acts, on some pixels only

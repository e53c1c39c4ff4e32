"""update_prototypes_: native against reference, semantics, labels, bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cpsl_ops
from conftest import DEVICES, FLOAT_DTYPES, assert_close, random_tensor, requires_native

IGNORE = 255


def random_labels(shape, classes, device, seed, dtype=torch.long, ignore_share=0.2):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignore_share] = IGNORE
    return labels.to(device=device, dtype=dtype)


@st.composite
def update_case(draw):
    channel_first = draw(st.booleans())
    dim = draw(st.integers(1, 24))
    classes = draw(st.integers(1, 20))
    if channel_first:
        batch, height, width = draw(st.integers(0, 3)), draw(st.integers(1, 8)), draw(st.integers(0, 40))
        feature_shape, label_shape = (batch, dim, height, width), (batch, height, width)
    else:
        pixels = draw(st.integers(0, 300))
        feature_shape, label_shape = (pixels, dim), (pixels,)
    label_dtype = draw(st.sampled_from([torch.long, torch.int32, torch.uint8]))
    return (feature_shape, label_shape, classes, label_dtype, draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
            draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(case=update_case())
def test_matches_reference(device, dtype, case):
    feature_shape, label_shape, classes, label_dtype, momentum, transposed, seed = case
    features = random_tensor(feature_shape, dtype, device, seed, transposed=transposed)
    labels = random_labels(label_shape, classes, device, seed, label_dtype)
    initial = random_tensor((classes, feature_shape[1]), dtype, device, seed + 1)
    results = {}
    for backend in ("native", "reference"):
        prototypes = initial.clone()
        with cpsl_ops.use_backend(backend):
            counts = cpsl_ops.update_prototypes_(prototypes, features, labels, momentum, IGNORE)
        results[backend] = (prototypes, counts)
    assert torch.equal(results["native"][1], results["reference"][1])
    assert_close(results["native"][0], results["reference"][0], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_ema_of_class_means_and_absent_classes_untouched(device):
    features = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [7.0, 7.0]], device=device)
    labels = torch.tensor([0, 0, IGNORE, 2], device=device)
    prototypes = torch.tensor([[1.0, 1.0], [9.0, 9.0], [0.0, 0.0]], device=device)
    counts = cpsl_ops.update_prototypes_(prototypes, features, labels, momentum=0.75)
    expected = torch.tensor([[0.75 + 0.25 * 2.0, 0.75 + 0.25 * 1.0], [9.0, 9.0], [0.25 * 7.0, 0.25 * 7.0]])
    torch.testing.assert_close(prototypes.cpu(), expected)
    assert counts.tolist() == [2, 0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_channel_first_equals_flat(device):
    features = random_tensor((2, 5, 3, 4), torch.float64, device, 0)
    labels = random_labels((2, 3, 4), 4, device, 1)
    first = random_tensor((4, 5), torch.float64, device, 2)
    flat = first.clone()
    cpsl_ops.update_prototypes_(first, features, labels, 0.5)
    cpsl_ops.update_prototypes_(flat, features.permute(0, 2, 3, 1).reshape(-1, 5), labels.reshape(-1), 0.5)
    torch.testing.assert_close(first, flat)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_all_ignored_and_momentum_one_change_nothing(device, backend):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    prototypes = random_tensor((3, 4), torch.float32, device, 0)
    before = prototypes.clone()
    with cpsl_ops.use_backend(backend):
        counts = cpsl_ops.update_prototypes_(prototypes, torch.randn(6, 4, device=device),
                                             torch.full((6,), IGNORE, device=device))
        assert counts.tolist() == [0, 0, 0] and torch.equal(prototypes, before)
        cpsl_ops.update_prototypes_(prototypes, torch.randn(6, 4, device=device), torch.zeros(6, dtype=torch.long,
                                    device=device), momentum=1.0)
        assert torch.equal(prototypes, before)


def test_custom_ignore_index_and_parameter_target():
    prototypes = torch.nn.Parameter(torch.zeros(2, 3))
    counts = cpsl_ops.update_prototypes_(prototypes, torch.ones(4, 3), torch.tensor([0, -1, -1, 1]), 0.0, ignore_index=-1)
    assert counts.tolist() == [1, 1] and torch.equal(prototypes.detach(), torch.ones(2, 3))
    assert prototypes.grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("bad", [-1, 3, 254])
def test_out_of_range_label_raises_and_writes_nothing(device, backend, bad):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    prototypes = torch.randn(3, 4, device=device)
    before = prototypes.clone()
    # The CPU kernel and the reference name the bad value; the CUDA kernel raises a device flag.
    names_value = device == "cpu" or backend == "reference"
    message = "labels must lie in \\[0, 3\\)" + (f".*found {bad}" if names_value else "")
    with cpsl_ops.use_backend(backend), pytest.raises(ValueError, match=message):
        cpsl_ops.update_prototypes_(prototypes, torch.randn(5, 4, device=device),
                                    torch.tensor([0, 1, bad, 2, IGNORE], device=device))
    assert torch.equal(prototypes, before)


@pytest.mark.parametrize(
    "features, labels, kwargs, error, message",
    [
        (torch.randn(5, 3), torch.zeros(5, dtype=torch.long), {}, ValueError, "D = 3 but prototypes have D = 4"),
        (torch.randn(5, 4), torch.zeros(6, dtype=torch.long), {}, ValueError, r"labels must have shape \(5,\)"),
        (torch.randn(2, 4, 3, 3), torch.zeros(2, 3, 4, dtype=torch.long), {}, ValueError, "labels must have shape"),
        (torch.randn(2, 4, 3, 3), torch.zeros(2, 9, dtype=torch.long), {}, ValueError, "labels must be"),
        (torch.randn(5, 4), torch.zeros(5), {}, TypeError, "labels must be an integer dtype"),
        (torch.randn(5, 4, 1), torch.zeros(5, dtype=torch.long), {}, ValueError, "features must be"),
        (torch.randn(5, 4), torch.zeros(5, dtype=torch.long), {"momentum": 1.5}, ValueError, "momentum must lie"),
        (torch.randn(5, 4), torch.zeros(5, dtype=torch.long, device="meta"), {}, ValueError, "on meta"),
    ],
)
def test_bad_input(features, labels, kwargs, error, message):
    with pytest.raises(error, match=message):
        cpsl_ops.update_prototypes_(torch.zeros(3, 4), features, labels, **kwargs)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_inside_the_class_range_is_ignored(device):
    features = random_tensor((2, 4, 3, 5), torch.float32, device, 0)
    labels = random_labels((2, 3, 5), 3, device, 1, ignore_share=0.0)
    initial = random_tensor((3, 4), torch.float32, device, 2)
    prototypes, expected = initial.clone(), initial.clone()
    counts = cpsl_ops.update_prototypes_(prototypes, features, labels, 0.5, ignore_index=0)
    with cpsl_ops.use_backend("reference"):
        expected_counts = cpsl_ops.update_prototypes_(expected, features, labels, 0.5, ignore_index=0)
    assert counts[0] == 0 and torch.equal(counts, expected_counts)
    assert torch.equal(prototypes[0], initial[0])
    torch.testing.assert_close(prototypes, expected)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
def test_direct_op_call_rejects_labels_of_other_pixels(device):
    """The kernels check what the Python wrapper checks first: one label per feature pixel."""
    prototypes, features = torch.zeros(3, 4, device=device), torch.randn(2, 4, 3, 5, device=device)
    for labels in (torch.zeros(2, 3, 6, dtype=torch.long), torch.zeros(1, 3, 5, dtype=torch.long)):
        with pytest.raises(RuntimeError, match="do not match the pixels of features"):
            torch.ops.cpsl_ops.update_prototypes(prototypes, features, labels.to(device), 0.5, 255)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise_unless_their_pixel_is_ignored(device, backend, bad):
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    features = random_tensor((2, 4, 3, 5), torch.float32, device, 0)
    labels = random_labels((2, 3, 5), 3, device, 1, ignore_share=0.0)
    labels[1, 2, 4] = IGNORE
    features[1, 2, 2, 4] = bad  # an ignored pixel: harmless
    initial = random_tensor((3, 4), torch.float32, device, 2)
    with cpsl_ops.use_backend(backend):
        prototypes, clean = initial.clone(), initial.clone()
        cpsl_ops.update_prototypes_(prototypes, features, labels, 0.5)
        cpsl_ops.update_prototypes_(clean, features.where(labels[:, None] != IGNORE, 0), labels, 0.5)
        torch.testing.assert_close(prototypes, clean)
        features[0, 1, 1, 1] = bad  # a counted pixel
        with pytest.raises(ValueError, match="features must be finite"):
            cpsl_ops.update_prototypes_(prototypes, features, labels, 0.5)
        torch.testing.assert_close(prototypes, clean)  # nothing written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_class_means_keep_fp32_precision_over_many_pixels(device, backend):
    """2^25 equal fp32 features: summed in fp32 their mean was off in the third digit."""
    if backend == "native" and not cpsl_ops.native_available():
        pytest.skip("native extension not built")
    value = torch.tensor([0.1234567, -3.3333333], dtype=torch.float32)
    features = value.to(device).expand(2**25, 2)
    labels = torch.zeros(2**25, dtype=torch.uint8, device=device)
    prototypes = torch.zeros(1, 2, device=device)
    with cpsl_ops.use_backend(backend):
        cpsl_ops.update_prototypes_(prototypes, features, labels, momentum=0.0)
    torch.testing.assert_close(prototypes[0].cpu(), value, rtol=1e-6, atol=0)

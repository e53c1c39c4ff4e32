"""prototype_similarity, both metrics: native kernels against the reference, gradients, properties, bad input."""

import pytest
import torch
from hypothesis import given
from torch.autograd import forward_ad
from hypothesis import strategies as st

import cpsl_ops
from conftest import DEVICES, FLOAT_DTYPES, assert_close, native_and_reference, random_tensor, requires_native

TEMPERATURE = 0.08
METRICS = ["cosine", "euclidean"]


@st.composite
def similarity_case(draw):
    channel_first = draw(st.booleans())
    dim = draw(st.integers(1, 40))
    classes = draw(st.integers(1, 24))
    if channel_first:
        shape = (draw(st.integers(0, 3)), dim, draw(st.integers(1, 9)), draw(st.integers(0, 70)))
    else:
        shape = (draw(st.integers(0, 150)), dim)
    return shape, classes, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@given(case=similarity_case())
def test_forward_matches_reference(device, dtype, metric, case):
    shape, classes, transposed, seed = case
    features = random_tensor(shape, dtype, device, seed, transposed=transposed)
    prototypes = random_tensor((classes, shape[1]), dtype, device, seed + 1)
    native, expected = native_and_reference(cpsl_ops.prototype_similarity, features, prototypes, TEMPERATURE, metric)
    assert native.shape == expected.shape and native.dtype == dtype
    assert_close(native, expected, dtype, scale=1 / TEMPERATURE)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@given(case=similarity_case())
def test_backward_matches_reference(device, dtype, metric, case):
    shape, classes, transposed, seed = case
    grads = {}
    for backend in ("native", "reference"):
        features = random_tensor(shape, dtype, device, seed, transposed=transposed).requires_grad_()
        prototypes = random_tensor((classes, shape[1]), dtype, device, seed + 1).requires_grad_()
        with cpsl_ops.use_backend(backend):
            logits = cpsl_ops.prototype_similarity(features, prototypes, TEMPERATURE, metric)
        weights = random_tensor(logits.shape, dtype, device, seed + 2)
        (logits * weights).sum().backward()
        grads[backend] = (features.grad, prototypes.grad)
    pixels = max(1, features.numel() // shape[1])
    if metric == "cosine":
        # A pixel's gradient is a difference of two terms of size 1/(τ|f|) that cancel exactly for
        # D = 1, so it is compared after scaling by |f|; prototype gradients also sum over pixels.
        norms = features.detach().double().norm(dim=1, keepdim=True)
        assert_close(grads["native"][0] * norms, grads["reference"][0] * norms, dtype, scale=1 / TEMPERATURE)
    else:  # a sum over the classes of unit vectors times g_k / τ
        assert_close(grads["native"][0], grads["reference"][0], dtype, scale=classes / TEMPERATURE)
    assert_close(grads["native"][1], grads["reference"][1], dtype, scale=pixels / TEMPERATURE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (17, 6)])
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_fp64(device, shape, metric):
    features = random_tensor(shape, torch.float64, device, 0).requires_grad_()
    prototypes = random_tensor((5, 6), torch.float64, device, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, c: cpsl_ops.prototype_similarity(f, c, 0.5, metric),
                                    (features, prototypes))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_non_contiguous_features(device, metric):
    features = random_tensor((2, 6, 3, 4), torch.float64, device, 3, transposed=True).requires_grad_()
    prototypes = random_tensor((4, 6), torch.float64, device, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, c: cpsl_ops.prototype_similarity(f, c, 0.3, metric),
                                    (features, prototypes))


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (17, 6)])
@pytest.mark.parametrize("metric", METRICS)
def test_double_backward_on_both_backends(device, shape, metric):
    features = random_tensor(shape, torch.float64, device, 0).requires_grad_()
    prototypes = random_tensor((5, 6), torch.float64, device, 1).requires_grad_()
    with cpsl_ops.use_backend("native"):
        assert torch.autograd.gradgradcheck(lambda f, c: cpsl_ops.prototype_similarity(f, c, 0.5, metric),
                                            (features, prototypes))
    # Where neither metric has a second derivative (NaN on both backends): a zero-norm prototype for
    # the cosine, a prototype at a pixel for the euclidean distance.
    prototypes.data[2] = 0 if metric == "cosine" else features.data.movedim(1, -1).reshape(-1, 6)[3]
    second = {}
    for backend in ("native", "reference"):
        with cpsl_ops.use_backend(backend):
            logits = cpsl_ops.prototype_similarity(features, prototypes, 0.3, metric)
            grads = torch.autograd.grad(logits.square().sum(), (features, prototypes), create_graph=True)
            second[backend] = torch.autograd.grad(grads[0].sin().sum() + grads[1].sum(), (features, prototypes))
    for native, expected in zip(second["native"], second["reference"]):  # NaN at the zero prototype, alike
        torch.testing.assert_close(native, expected, rtol=1e-10, atol=1e-10, equal_nan=True)


@requires_native
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", METRICS)
def test_both_backends_compute_in_fp32_under_autocast(autocast_dtype, metric):
    # The reference's matrix product ran in 16 bits under autocast (logit error 2.5e-2 in bf16).
    features = random_tensor((2, 16, 5, 6), torch.float32, "cpu", 9)
    prototypes = random_tensor((19, 16), torch.float32, "cpu", 10)
    expected = cpsl_ops.reference.similarity(features.double(), prototypes.double(), TEMPERATURE, metric)
    for backend in ("native", "reference"):
        with cpsl_ops.use_backend(backend), torch.autocast("cpu", dtype=autocast_dtype):
            logits = cpsl_ops.prototype_similarity(features, prototypes, TEMPERATURE, metric)
        assert logits.dtype == torch.float32
        assert_close(logits, expected, torch.float32, scale=1 / TEMPERATURE)


def every_transform(function, features, prototypes, tangents):
    """The results of forward-mode AD and of torch.func's transforms of ``function``."""
    with forward_ad.dual_level():
        dual = function(forward_ad.make_dual(features, tangents[0]), forward_ad.make_dual(prototypes, tangents[1]))
        dual_tangent = forward_ad.unpack_dual(dual).tangent
    return {
        "forward_ad": dual_tangent,
        "jvp": torch.func.jvp(function, (features, prototypes), tangents)[1],
        "jacfwd": torch.func.jacfwd(function, argnums=(0, 1))(features, prototypes),
        "grad": torch.func.grad(lambda f, c: function(f, c).square().sum(), argnums=(0, 1))(features, prototypes),
        "jacrev": torch.func.jacrev(function, argnums=(0, 1))(features, prototypes),
        "vmap": torch.func.vmap(function, in_dims=(0, None))(features.expand(3, *features.shape), prototypes),
    }


@requires_native
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (9, 6)])
@pytest.mark.parametrize("metric", METRICS)
def test_forward_mode_and_function_transforms_give_the_reference_result_natively(shape, metric):
    # Forward-mode AD through the kernel's autograd gave a silent zero tangent, and torch.func's
    # grad and jacrev raised: the native backend must answer as the reference does.
    features, prototypes = random_tensor(shape, torch.float64, "cpu", 5), random_tensor((4, 6), torch.float64, "cpu", 6)
    prototypes[1] = 0
    tangents = (random_tensor(shape, torch.float64, "cpu", 7), random_tensor((4, 6), torch.float64, "cpu", 8))
    results = {}
    for backend in ("native", "reference"):
        with cpsl_ops.use_backend(backend):
            results[backend] = every_transform(lambda f, c: cpsl_ops.prototype_similarity(f, c, 0.2, metric),
                                               features, prototypes, tangents)
    assert results["native"]["jvp"].abs().sum() > 0
    for name, expected in results["reference"].items():
        torch.testing.assert_close(results["native"][name], expected, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_invariant_to_positive_rescaling_and_bounded(device):
    features = random_tensor((2, 8, 5, 5), torch.float64, device, 0)
    prototypes = random_tensor((3, 8), torch.float64, device, 1)
    logits = cpsl_ops.prototype_similarity(features, prototypes, TEMPERATURE)
    rescaled = cpsl_ops.prototype_similarity(features * 7.5, prototypes * 0.01, TEMPERATURE)
    torch.testing.assert_close(logits, rescaled)
    assert logits.abs().max() <= 1 / TEMPERATURE + 1e-9


def test_zero_feature_gives_zero_logits():
    features = torch.zeros(3, 4)
    logits = cpsl_ops.prototype_similarity(features, torch.randn(2, 4))
    assert torch.equal(logits, torch.zeros(3, 2))


def test_prototypes_are_cast_to_feature_dtype():
    features = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    logits = cpsl_ops.prototype_similarity(features, torch.randn(5, 4))
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 5, 3, 3)


@pytest.mark.parametrize(
    "features, prototypes, error, message",
    [
        (torch.randn(2, 3, 4), torch.randn(5, 3), ValueError, "features must be"),
        (torch.randn(4, 3), torch.randn(5, 4), ValueError, "D = 3"),
        (torch.randn(4, 3), torch.randn(5, 3, 1), ValueError, "prototypes must be"),
        (torch.ones(4, 3, dtype=torch.long), torch.randn(5, 3), TypeError, "features must be fp16"),
        (torch.randn(4, 3), torch.randn(0, 3), ValueError, "prototypes .K. must not be empty"),
        (torch.randn(4, 0), torch.randn(2, 0), ValueError, "feature dimension D must not be empty"),
        (torch.randn(4, 3), torch.randn(2, 3, device="meta"), ValueError, "features is on cpu but prototypes is on meta"),
        ([[1.0]], torch.randn(2, 3), TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_input(features, prototypes, error, message):
    with pytest.raises(error, match=message):
        cpsl_ops.prototype_similarity(features, prototypes)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        cpsl_ops.prototype_similarity(torch.randn(3, 2), torch.randn(2, 2), temperature)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, huge", [(torch.float32, 1e20), (torch.float32, 3e38), (torch.bfloat16, 3e38),
                                         (torch.float64, 1e308)])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (17, 6)])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_huge_finite_values_give_the_answer_of_their_scaled_down_copies(device, dtype, huge, shape, backend):
    # Cosines are scale-invariant, but |f|^2 overflowed (above ~1e19 in fp32): zero logits on both
    # backends. Rows of entries up to `huge` (features and prototypes, beside ordinary rows) must
    # give the fp64 answer of the same rows scaled down, and gradients 1/huge times theirs.
    def rows_up_to_one(t):  # every row's largest magnitude 1
        return t / t.abs().amax(1, keepdim=True)

    features = rows_up_to_one(random_tensor(shape, torch.float64, device, 11))
    prototypes = rows_up_to_one(random_tensor((5, 6), torch.float64, device, 12))
    feature_scale = torch.ones_like(features[:, :1])
    feature_scale.view(-1)[::2] = huge  # every other pixel
    prototype_scale = torch.tensor([[huge], [1.0], [huge], [1.0], [1.0]], dtype=torch.float64, device=device)
    f = (features * feature_scale).to(dtype).requires_grad_()
    c = (prototypes * prototype_scale).to(dtype).requires_grad_()
    with cpsl_ops.use_backend(backend):
        logits = cpsl_ops.prototype_similarity(f, c, TEMPERATURE)
    weights = random_tensor(logits.shape, dtype, device, 13)
    (logits * weights).sum().backward()

    f_down = (f.detach().double() / feature_scale).requires_grad_()
    c_down = (c.detach().double() / prototype_scale).requires_grad_()
    expected = cpsl_ops.reference.similarity(f_down, c_down, TEMPERATURE)
    (expected * weights.double()).sum().backward()
    assert_close(logits, expected.detach(), dtype, scale=1 / TEMPERATURE)
    assert torch.isfinite(f.grad).all() and torch.isfinite(c.grad).all()
    # The gradient of a row scaled by s is 1/s times that of the row: compared after scaling back.
    assert_close(f.grad.double() * feature_scale, f_down.grad, dtype, scale=1 / TEMPERATURE)
    assert_close(c.grad.double() * prototype_scale, c_down.grad, dtype, scale=f.shape[0] / TEMPERATURE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_temperature_below_the_smallest_normal_of_the_accumulation_dtype_raises_on_both_backends(device, dtype,
                                                                                                 backend):
    # τ subnormal in the kernels' dtype (fp32 for 16- and 32-bit features) overflowed 1/τ natively:
    # NaN logits where the reference's cos / τ gave 0 (an orthogonal prototype) or finite values.
    tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    features = torch.tensor([[1.0, 0.0], [1e-30, 0.0]], dtype=dtype, device=device)
    prototypes = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype, device=device)
    with cpsl_ops.use_backend(backend):
        for temperature in (tiny / 100, tiny / 2):
            with pytest.raises(ValueError, match=f"temperature must be at least {tiny!r}"):
                cpsl_ops.prototype_similarity(features, prototypes, temperature)
        assert not cpsl_ops.prototype_similarity(features, prototypes, tiny).isnan().any()


# ---- the euclidean metric ----


def test_euclidean_logits_are_negated_distances_over_the_temperature():
    features, prototypes = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    logits = cpsl_ops.prototype_similarity(features, prototypes, 0.5, metric="euclidean")
    distances = torch.cdist(features.movedim(1, -1).reshape(-1, 5), prototypes).view(2, 3, 4, 6).movedim(-1, 1)
    torch.testing.assert_close(logits, -distances / 0.5)
    # not scale-invariant, unlike the cosine, and the prototypes are used as they are
    assert not torch.allclose(cpsl_ops.prototype_similarity(features * 2, prototypes, 0.5, "euclidean"), logits)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (17, 6)])
def test_euclidean_pixels_on_a_prototype_get_logit_zero_and_a_defined_gradient(device, dtype, shape):
    # The distance has no derivative where a pixel sits on a prototype: its gradient is 0 there on
    # both backends (torch.linalg.vector_norm's choice), not NaN, and every other term is unchanged.
    features = random_tensor(shape, dtype, device, 21)
    pixels = features.movedim(1, -1).reshape(-1, 6)
    prototypes = torch.cat([pixels[:3], random_tensor((2, 6), dtype, device, 22)]).contiguous()  # 3 on pixels
    grads, logits = {}, {}
    for backend in ("native", "reference"):
        f, c = features.clone().requires_grad_(), prototypes.clone().requires_grad_()
        with cpsl_ops.use_backend(backend):
            logits[backend] = cpsl_ops.prototype_similarity(f, c, TEMPERATURE, "euclidean")
        (logits[backend] * random_tensor(logits[backend].shape, dtype, device, 23)).sum().backward()
        grads[backend] = (f.grad, c.grad)
    on_prototype = logits["native"].movedim(1, -1).reshape(-1, 5)
    assert torch.equal(on_prototype[[0, 1, 2], [0, 1, 2]], torch.zeros(3, dtype=dtype, device=device))
    for native, expected in zip(grads["native"], grads["reference"]):
        assert torch.isfinite(native).all()
        assert_close(native, expected, dtype, scale=features.numel() / TEMPERATURE)


@requires_native
def test_euclidean_gradient_keeps_its_precision_near_a_prototype():
    # w_k = g_k / (τ d_k) grows as a pixel nears a prototype: summing w f - w c instead of w (f - c)
    # would lose |f| / d of the fp32 precision (1e-4 here, 50 times the tolerance).
    prototypes = random_tensor((4, 32), torch.float32, "cpu", 31) * 10
    offsets = random_tensor((64, 32), torch.float32, "cpu", 32) * 1e-4
    features = (prototypes[torch.arange(64) % 4] + offsets).requires_grad_()
    c = prototypes.clone().requires_grad_()
    weights = random_tensor((64, 4), torch.float32, "cpu", 33)
    with cpsl_ops.use_backend("native"):
        (cpsl_ops.prototype_similarity(features, c, 1.0, "euclidean") * weights).sum().backward()
    f64, c64 = features.detach().double().requires_grad_(), prototypes.double().requires_grad_()
    (cpsl_ops.reference.similarity(f64, c64, 1.0, "euclidean") * weights.double()).sum().backward()
    assert_close(features.grad, f64.grad, torch.float32, scale=4)
    assert_close(c.grad, c64.grad, torch.float32, scale=64)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_euclidean_distance_overflows_as_vector_norm_does(device, backend):
    # Differences of 1e20 in fp32 overflow the sum of squares: -inf logits and zero gradients, as
    # torch.linalg.vector_norm gives; the other pixels are unaffected.
    features = torch.tensor([[1e20, 0.0], [1.0, 2.0]], device=device, requires_grad=True)
    prototypes = torch.tensor([[0.0, 0.0], [1.0, 1.0]], device=device, requires_grad=True)
    with cpsl_ops.use_backend(backend):
        logits = cpsl_ops.prototype_similarity(features, prototypes, 1.0, "euclidean")
    logits[1].sum().backward()
    assert torch.isinf(logits[0]).all() and (logits[0] < 0).all()
    torch.testing.assert_close(logits[1], -torch.tensor([5.0, 1.0], device=device).sqrt())
    assert torch.equal(features.grad[0], torch.zeros(2, device=device))


@pytest.mark.parametrize("metric", ["cos", "Euclidean", "l2", None])
def test_bad_metric(metric):
    with pytest.raises(ValueError, match='metric must be "cosine" or "euclidean"'):
        cpsl_ops.prototype_similarity(torch.randn(3, 2), torch.randn(2, 2), metric=metric)


@requires_native
@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_refuse_a_bad_metric(device):
    features, prototypes = torch.randn(3, 2, device=device), torch.randn(2, 2, device=device)
    with pytest.raises(RuntimeError, match='metric must be "cosine" or "euclidean", got "l2"'):
        torch.ops.cpsl_ops.similarity(features, prototypes, 1.0, "l2")
    with pytest.raises(RuntimeError, match='metric must be "cosine" or "euclidean", got "l2"'):
        torch.ops.cpsl_ops.similarity_backward(torch.randn(3, 2, device=device), features, prototypes, 1.0, "l2")

"""The CUDA kernels where PyTorch users run them: both Sinkhorn launch paths and any K, small grids,
CUDA-graph capture and replay (narrow and wide Sinkhorn layouts, fp16 and bf16 too), TF32 and
deterministic modes, side streams, batches over 65,535 for every op, channels-last and flat inputs,
a second GPU. Every test here needs a GPU and skips without one; the op tests of the other files
also run on CUDA where it is present."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cpsl_ops
from cpsl_ops import SelfLabelingLoss
from conftest import assert_close, native_and_reference, random_tensor, requires_native

pytestmark = [requires_native, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAUNCH, MAX_BLOCKS = "CPSL_OPS_CUDA_SINKHORN_LAUNCH", "CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS"


def native_sinkhorn(monkeypatch, scores, prior, launch="auto", max_blocks=None):
    monkeypatch.setenv(LAUNCH, launch)
    if max_blocks is None:
        monkeypatch.delenv(MAX_BLOCKS, raising=False)
    else:
        monkeypatch.setenv(MAX_BLOCKS, str(max_blocks))
    with cpsl_ops.use_backend("native"):
        try:
            return cpsl_ops.balanced_sinkhorn(scores, prior)
        except RuntimeError as error:
            if "cooperative launch was refused" in str(error):  # e.g. under MPS: auto falls back
                pytest.skip(str(error))
            raise


@pytest.mark.parametrize("classes", [1, 19, 64, 100, 256, 300, 3000])
def test_sinkhorn_launch_paths_and_grid_sizes_agree_bit_for_bit_and_match_reference(classes, monkeypatch):
    samples = 2_500 if classes <= 300 else 1_100  # three or two chunks of 1,024 rows per problem
    scores = random_tensor((2, samples, classes), torch.float32, "cuda", classes).clamp(-3, 3) / 3
    prior = torch.rand(2, classes, generator=torch.Generator().manual_seed(classes)).add(0.1).cuda()
    cooperative = native_sinkhorn(monkeypatch, scores, prior, "cooperative")
    for launch, max_blocks in [("per_pass", None), ("per_pass", 2), ("cooperative", 2), ("auto", 1)]:
        other = native_sinkhorn(monkeypatch, scores, prior, launch, max_blocks)
        assert torch.equal(other, cooperative), (launch, max_blocks)
    with cpsl_ops.use_backend("reference"):
        expected = cpsl_ops.balanced_sinkhorn(scores, prior)
    assert_close(cooperative, expected, torch.float32)


def test_sinkhorn_per_pass_path_raises_the_same_value_errors(monkeypatch):
    scores = torch.rand(1, 3000, 300, device="cuda")
    scores[0, 2500, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        native_sinkhorn(monkeypatch, scores, None, "per_pass")
    with pytest.raises(ValueError, match="positive and finite"):
        native_sinkhorn(monkeypatch, torch.rand(1, 3000, 300, device="cuda"), -torch.ones(300, device="cuda"),
                        "per_pass", 1)


@pytest.mark.parametrize("launch", ["cooperative", "per_pass"])
def test_sinkhorn_raises_on_finite_scores_spread_too_widely(launch, monkeypatch):
    # Both scores are finite, but (S - max)/ε overflows fp32: the passes after the first raise it.
    scores = torch.rand(2, 3000, 19, device="cuda")
    scores[1, 10, 4], scores[1, 2900, 4] = 1e37, -1e37
    with pytest.raises(ValueError, match="spread so widely"):
        native_sinkhorn(monkeypatch, scores, None, launch, 2)


def test_bad_launch_settings_raise(monkeypatch):
    scores = torch.rand(1, 10, 3, device="cuda")
    with pytest.raises(RuntimeError, match="auto, cooperative or per_pass"):
        native_sinkhorn(monkeypatch, scores, None, "sideways")
    with pytest.raises(RuntimeError, match="positive integer"):
        native_sinkhorn(monkeypatch, scores, None, "auto", 0)


def warm_up(function):
    """``function()`` on a side stream, as PyTorch asks before a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        function()
    torch.cuda.current_stream().wait_stream(side)


def record(function):
    """A CUDA graph of ``function()`` and the outputs of the capture (its replay's output buffers)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = function()
    return graph, outputs


def test_ops_replay_from_a_cuda_graph_like_eager_and_mark_bad_values_instead_of_raising():
    scores = random_tensor((2, 3000, 19), torch.float32, "cuda", 1)
    soft = torch.rand(2, 5, 6, 7, device="cuda").softmax(1)
    logits = torch.randn(2, 5, 6, 7, device="cuda")
    initial = torch.randn(5, 8, device="cuda")
    prototypes = initial.clone()
    features = torch.randn(2, 8, 6, 7, device="cuda")
    labels = torch.randint(0, 5, (2, 6, 7), device="cuda")
    with cpsl_ops.use_backend("native"):
        assignment = cpsl_ops.balanced_sinkhorn(scores)
        rectified = cpsl_ops.rectify_pseudo_labels(soft, logits)
        updated = initial.clone()
        counts = cpsl_ops.update_prototypes_(updated, features, labels, 0.9)

        def step():
            return (cpsl_ops.balanced_sinkhorn(scores), *cpsl_ops.rectify_pseudo_labels(soft, logits),
                    cpsl_ops.update_prototypes_(prototypes, features, labels, 0.9))

        warm_up(step)
        graph, outputs = record(step)
    prototypes.copy_(initial)
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(outputs, (assignment, *rectified, counts)):
        assert torch.equal(got, expected)
    assert torch.equal(prototypes, updated)

    scores[1, 2999, 3] = float("inf")  # caught by the first pass
    soft[0, 2, 3, 4] = -1.0
    labels[1, 0, 0] = 7
    graph.replay()
    torch.cuda.synchronize()
    assert outputs[0].isnan().all()
    assert (outputs[1] == 255).all() and outputs[2].isnan().all()
    assert prototypes.isnan().all()

    scores[1, 2999, 3] = 0.5
    scores[1, 10, 4], scores[1, 2900, 4] = 1e37, -1e37  # finite, but overflowing in the later passes
    graph.replay()
    torch.cuda.synchronize()
    assert outputs[0].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes", [19, 256, 300])
def test_sinkhorn_replays_from_a_cuda_graph_in_the_narrow_and_wide_layouts_and_16_bit_types(classes, dtype):
    # A capture takes the per-pass path, whose kernel for this layout and dtype the eager call
    # before it (cooperative) must have loaded; the replay must give the eager call's bits.
    def new_scores(seed):
        return random_tensor((2, 1_100, classes), torch.float32, "cuda", seed).clamp(-3, 3).div(3).to(dtype)

    scores = new_scores(classes)
    prior = torch.rand(classes, generator=torch.Generator().manual_seed(classes)).add(0.1).cuda()
    with cpsl_ops.use_backend("native"):
        warm_up(lambda: cpsl_ops.balanced_sinkhorn(scores, prior))
        graph, assignment = record(lambda: cpsl_ops.balanced_sinkhorn(scores, prior))
        scores.copy_(new_scores(classes + 1))  # the replay must not give the captured call's result
        graph.replay()
        expected = cpsl_ops.balanced_sinkhorn(scores, prior)
    torch.cuda.synchronize()
    assert assignment.dtype == dtype and torch.equal(assignment, expected)


def test_a_whole_self_labeling_step_replays_from_a_cuda_graph_like_eager():
    torch.manual_seed(0)
    module = SelfLabelingLoss(num_classes=19, feat_dim=32, queue_size=512, samples_per_image=64).cuda()
    features = torch.randn(4, 32, 16, 16, device="cuda")
    logits = torch.randn(4, 19, 16, 16, device="cuda")
    soft = torch.rand(4, 19, 16, 16, device="cuda").softmax(1)

    def step(m):
        m.prototypes.grad = None  # each step's gradient is its own: capture allocates it, replay rewrites it
        loss = m(features, logits)
        loss.backward()
        m.update_ema()
        return (loss, *m.rectify(soft, features))

    with cpsl_ops.use_backend("native"):
        for _ in range(3):  # 4 x 64 rows a step fill the 512-row queue in two: a step no longer syncs
            warm_up(lambda: step(module))
        twin = copy.deepcopy(module)
        graph, outputs = record(lambda: step(module))
        torch.cuda.manual_seed(1)
        graph.replay()
        torch.cuda.manual_seed(1)
        expected = step(twin)
    torch.cuda.synchronize()
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)
    assert torch.equal(module.prototypes.grad, twin.prototypes.grad)
    twin_buffers = dict(twin.named_buffers())
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, twin_buffers[name]), name


def test_capturing_before_the_memory_bank_is_full_raises_a_clear_error():
    features = torch.randn(1, 4, 3, 3, device="cuda")
    SelfLabelingLoss(num_classes=3, feat_dim=4, queue_size=64, samples_per_image=4).cuda()(features)  # loads kernels
    module = SelfLabelingLoss(num_classes=3, feat_dim=4, queue_size=64, samples_per_image=4).cuda()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="once the memory bank is full"):
        with torch.cuda.graph(graph):
            module(features)


def run_every_op(features, prototypes, scores, labels, soft):
    """Outputs and gradients of every op on the native backend, as a list of tensors."""
    features = features.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    with cpsl_ops.use_backend("native"):
        logits = cpsl_ops.prototype_similarity(features, prototypes)
        logits.square().sum().backward()
        updated = prototypes.detach().clone()
        counts = cpsl_ops.update_prototypes_(updated, features.detach(), labels, 0.9)
        assignment = cpsl_ops.balanced_sinkhorn(scores)
        rectified = cpsl_ops.rectify_pseudo_labels(soft, logits.detach())
    return [logits, features.grad, prototypes.grad, updated, counts, assignment, *rectified]


def every_op_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 64, 17, 19, generator=generator)
    return [t.cuda() for t in (features, torch.randn(19, 64, generator=generator),
                               torch.rand(2, 5000, 19, generator=generator),
                               torch.randint(0, 19, (2, 17, 19), generator=generator),
                               torch.rand(2, 19, 17, 19, generator=generator).softmax(1))]


def tf32_rounded(tensor):
    """fp32 ``tensor`` rounded to TF32's 10-bit mantissa, as a TF32 matmul reads its inputs."""
    return ((tensor.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def test_tf32_changes_no_result_and_would_be_caught():
    inputs = every_op_inputs()
    features, prototypes = inputs[0].double().requires_grad_(), inputs[1].double().requires_grad_()
    with cpsl_ops.use_backend("reference"):
        exact = cpsl_ops.prototype_similarity(features, prototypes)
        exact.square().sum().backward()
    # A similarity kernel that took a TF32 matmul (or cuBLAS under TF32) would be off by this much,
    # which the accuracy check below does not let through.
    rounded = [tf32_rounded(F.normalize(t, dim=1)).double() for t in inputs[:2]]
    with pytest.raises(AssertionError):
        assert_close(torch.einsum("bdhw,kd->bkhw", *rounded) / 0.08, exact, torch.float32, scale=1 / 0.08)
    default = run_every_op(*inputs)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls
    try:
        with_tf32 = run_every_op(*inputs)
    finally:
        torch.set_float32_matmul_precision(precision)
    for got, want in zip(with_tf32, default):
        assert torch.equal(got, want)
    assert_close(with_tf32[0], exact, torch.float32, scale=1 / 0.08)
    assert_close(with_tf32[2], prototypes.grad, torch.float32, scale=float(prototypes.grad.abs().max()))


def test_deterministic_mode_gives_the_same_bits_though_fresh_memory_is_nan(monkeypatch):
    # Deterministic mode fills fresh tensors with NaN (the kernels' outputs and workspaces too) and
    # raises for a nondeterministic torch op or cuBLAS without CUBLAS_WORKSPACE_CONFIG: the same
    # bits as without it mean no kernel reads memory it did not write and no op takes such a path.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    inputs = every_op_inputs(1)
    expected = run_every_op(*inputs)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(8, device="cuda").isnan().all()
        got = run_every_op(*inputs)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_ops_on_a_side_stream_match_the_default_stream():
    inputs = every_op_inputs(2)
    expected = run_every_op(*inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run_every_op(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_similarity_and_rectification_on_more_than_65535_images(metric):
    features = random_tensor((70_000, 8, 1, 2), torch.float32, "cuda", 3).requires_grad_()
    prototypes = random_tensor((5, 8), torch.float32, "cuda", 4)
    native, expected = native_and_reference(cpsl_ops.prototype_similarity, features, prototypes, 0.08, metric)
    assert_close(native, expected, torch.float32, scale=1 / 0.08)
    (native_grad,) = torch.autograd.grad(native.sum(), features)
    (expected_grad,) = torch.autograd.grad(expected.sum(), features)
    assert_close(native_grad, expected_grad, torch.float32, scale=1 / 0.08)
    soft = torch.rand(70_000, 5, 1, 2, device="cuda")
    (labels, confidence), (want_labels, want_confidence) = native_and_reference(
        cpsl_ops.rectify_pseudo_labels, soft, native.detach())
    assert torch.equal(labels, want_labels)
    assert_close(confidence, want_confidence, torch.float32)


@pytest.mark.parametrize("launch", ["cooperative", "per_pass"])
def test_sinkhorn_on_more_than_65535_problems(launch, monkeypatch):
    scores = random_tensor((70_000, 3, 5), torch.float32, "cuda", 5).clamp(-3, 3) / 3
    prior = torch.rand(70_000, 5, generator=torch.Generator().manual_seed(5)).add(0.1).cuda()
    native = native_sinkhorn(monkeypatch, scores, prior, launch)
    with cpsl_ops.use_backend("reference"):
        expected = cpsl_ops.balanced_sinkhorn(scores, prior)
    assert_close(native, expected, torch.float32)


def test_prototype_update_on_more_than_65535_images():
    features = random_tensor((70_000, 8, 1, 2), torch.float32, "cuda", 6)
    labels = torch.randint(0, 4, (70_000, 1, 2), generator=torch.Generator().manual_seed(6)).cuda()
    labels[::7, 0, 1] = 255
    labels[65_536:] = 4  # class 4 only in the images past 65,535
    native, expected = random_tensor((5, 8), torch.float32, "cuda", 7), random_tensor((5, 8), torch.float32, "cuda", 7)
    with cpsl_ops.use_backend("native"):
        counts = cpsl_ops.update_prototypes_(native, features, labels, 0.5)
    with cpsl_ops.use_backend("reference"):
        expected_counts = cpsl_ops.update_prototypes_(expected, features, labels, 0.5)
    assert counts[4] == 2 * (70_000 - 65_536) and torch.equal(counts, expected_counts)
    assert_close(native, expected, torch.float32)


def test_channels_last_and_flat_features_match_channel_first():
    features, prototypes, _, labels, _ = every_op_inputs(5)
    with cpsl_ops.use_backend("native"):
        expected = cpsl_ops.prototype_similarity(features, prototypes)
        channels_last = cpsl_ops.prototype_similarity(features.to(memory_format=torch.channels_last), prototypes)
        flat = cpsl_ops.prototype_similarity(features.permute(0, 2, 3, 1).reshape(-1, 64), prototypes)
        assert_close(channels_last, expected, torch.float32, scale=1 / 0.08)
        assert_close(flat, expected.permute(0, 2, 3, 1).reshape(-1, 19), torch.float32, scale=1 / 0.08)
        dense, strided = prototypes.clone(), prototypes.clone()
        cpsl_ops.update_prototypes_(dense, features, labels, 0.5)
        cpsl_ops.update_prototypes_(strided, features.to(memory_format=torch.channels_last), labels, 0.5)
    assert torch.equal(dense, strided)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    inputs = every_op_inputs(6)
    on_first = run_every_op(*inputs)
    with torch.cuda.device(0):
        on_second = run_every_op(*[t.to("cuda:1") for t in inputs])
    for a, b in zip(on_second, on_first):
        assert a.device == torch.device("cuda:1")
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("generation", ["current", "previous"])
@pytest.mark.parametrize("classes", [1, 19, 32, 33, 100])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "flat"])
def test_euclidean_similarity_for_any_class_count_and_layout_matches_the_reference(generation, classes, layout,
                                                                                    monkeypatch):
    # The register kernels take K <= 32; more classes, and the previous generation, take other paths.
    monkeypatch.setenv("CPSL_OPS_CUDA_KERNELS", generation)
    features = random_tensor((2, 40, 9, 30), torch.float32, "cuda", classes)
    features = {"channels_first": features, "channels_last": features.to(memory_format=torch.channels_last),
                "flat": features.permute(0, 2, 3, 1).reshape(-1, 40)}[layout]
    prototypes = random_tensor((classes, 40), torch.float32, "cuda", classes + 1)
    prototypes[0] = features[0] if layout == "flat" else features[0, :, 0, 0]  # a pixel on a prototype
    results = {}
    for backend in ("native", "reference"):
        f, c = features.detach().clone().requires_grad_(), prototypes.clone().requires_grad_()
        with cpsl_ops.use_backend(backend):
            logits = cpsl_ops.prototype_similarity(f, c, 0.5, "euclidean")
        (logits * random_tensor(logits.shape, torch.float32, "cuda", 7)).sum().backward()
        results[backend] = (logits, f.grad, c.grad)
    pixels = features.numel() // 40
    for native, expected, scale in zip(results["native"], results["reference"], (2, 2 * classes, 2 * pixels)):
        assert torch.isfinite(native).all()
        assert_close(native, expected, torch.float32, scale=scale)

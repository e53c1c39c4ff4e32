"""The torch.nn modules, above all SelfLabelingLoss."""

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F

import cpsl_ops
from cpsl_ops import BalancedSinkhorn, PrototypeEMA, PrototypeSimilarity, SelfLabelingLoss
from conftest import BACKENDS


def clustered_features(batch, classes, dim, height, width, seed, noise=0.3):
    """(B, D, H, W) features around ``classes`` random centers, and their (B, H, W) cluster ids."""
    generator = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    ids = torch.randint(0, classes, (batch, height, width), generator=generator)
    features = centers[ids] + noise * torch.randn(batch, height, width, dim, generator=generator)
    return features.permute(0, 3, 1, 2).contiguous(), ids


def test_prototype_similarity_module():
    module = PrototypeSimilarity(num_classes=5, feat_dim=8, temperature=0.1)
    features = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(module(features), cpsl_ops.prototype_similarity(features, module.prototypes, 0.1))
    module(features).sum().backward()
    assert module.prototypes.grad is not None and "num_classes=5" in repr(module)


def test_prototype_modules_take_either_metric():
    features = torch.randn(2, 8, 3, 3)
    module = PrototypeSimilarity(num_classes=5, feat_dim=8, temperature=0.1, metric="euclidean")
    torch.testing.assert_close(module(features),
                               cpsl_ops.prototype_similarity(features, module.prototypes, 0.1, "euclidean"))
    assert "metric=euclidean" in repr(module)
    ema = PrototypeEMA(num_classes=2, feat_dim=8, momentum=0.0, temperature=1.0, metric="euclidean")
    ema.update(features, torch.randint(0, 2, (2, 3, 3)))
    torch.testing.assert_close(ema(features), cpsl_ops.prototype_similarity(features, ema.prototypes, 1.0, "euclidean"))


def test_balanced_sinkhorn_module_and_prior_checks():
    prior = torch.tensor([0.5, 0.25, 0.25])
    module = BalancedSinkhorn(num_classes=3, class_prior=prior * 4, epsilon=0.1, num_iters=5)
    scores = torch.randn(50, 3)
    torch.testing.assert_close(module(scores), cpsl_ops.balanced_sinkhorn(scores, prior, 0.1, 5))
    torch.testing.assert_close(module.class_prior, prior)
    with pytest.raises(ValueError, match="positive and finite"):
        BalancedSinkhorn(num_classes=3, class_prior=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="must have 3 entries"):
        BalancedSinkhorn(num_classes=3, class_prior=[0.5, 0.5])


def test_priors_near_the_float32_limit_are_normalized_not_zeroed():
    # An fp32 sum of 3e38 + 3e38 overflowed: the prior was stored as zeros, then refused later.
    module = BalancedSinkhorn(num_classes=3, class_prior=torch.tensor([3e38, 3e38, 3e37]))
    torch.testing.assert_close(module.class_prior, torch.tensor([10 / 21, 10 / 21, 1 / 21]))
    with pytest.raises(ValueError, match="spans too wide a range"):
        BalancedSinkhorn(num_classes=2, class_prior=[3e38, 1e-10])


@pytest.mark.parametrize("prior", [None, [0.2, 0.3, 0.5], "meta tensor"])
def test_modules_build_and_run_on_meta(prior):
    # A prior under torch.device("meta") was copied to the CPU and failed; with a memory bank the
    # loss read its fill level with .item().
    with torch.device("meta"):
        prior = torch.tensor([0.2, 0.3, 0.5]) if prior == "meta tensor" else prior
        modules = [BalancedSinkhorn(num_classes=3, class_prior=prior),
                   SelfLabelingLoss(num_classes=3, feat_dim=4, queue_size=16, samples_per_image=4, class_prior=prior)]
    for module in modules:
        assert all(buffer.is_meta for buffer in module.buffers())
    features, logits = torch.empty(2, 4, 3, 3, device="meta"), torch.empty(2, 3, 3, 3, device="meta")
    for _ in range(3):  # the queue fills (as far as shapes go) on the second step
        loss = modules[1](features, logits)
    assert loss.is_meta and loss.shape == ()
    assert modules[0](torch.empty(10, 3, device="meta")).shape == (10, 3)


def test_prototype_ema_module():
    module = PrototypeEMA(num_classes=3, feat_dim=4, momentum=0.0)
    features = torch.randn(2, 4, 2, 2)
    labels = torch.tensor([[[0, 0], [1, 255]], [[1, 1], [0, 255]]])
    counts = module.update(features, labels)
    assert counts.tolist() == [3, 3, 0]
    flat = features.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(module.prototypes[0], flat[labels.reshape(-1) == 0].mean(0))
    assert torch.equal(module.prototypes[2], torch.zeros(4))
    assert module(features).shape == (2, 3, 2, 2)


def test_loss_decreases_when_only_prototypes_learn():
    torch.manual_seed(0)
    features, _ = clustered_features(4, 6, 16, 12, 12, seed=1)
    criterion = SelfLabelingLoss(num_classes=6, feat_dim=16, queue_size=512, samples_per_image=64)
    optimizer = torch.optim.SGD([criterion.prototypes], lr=0.5, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = criterion(features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        criterion.update_ema()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_gradient_reaches_only_prototypes_for_detached_features():
    criterion = SelfLabelingLoss(num_classes=4, feat_dim=8, queue_size=0, samples_per_image=10)
    features = torch.randn(2, 8, 4, 4)
    criterion(features, torch.randn(2, 4, 4, 4)).backward()
    assert criterion.prototypes.grad is not None and criterion.prototypes.grad.abs().sum() > 0
    features.requires_grad_()
    criterion(features).backward()
    assert features.grad is not None


def sequential_official_loss(criterion, features, queue_rows):
    """The official per-image loop: Sinkhorn over (queue; current samples), then push the samples.

    Uses every pixel of each image, so the loss does not depend on the sampling order.
    """
    prototypes = criterion.prototypes.detach()
    queue = list(queue_rows)
    total = 0.0
    for image in features:
        current = F.normalize(image.flatten(1).T, dim=1)
        scores = torch.cat([torch.stack(queue), current]) @ F.normalize(prototypes, dim=1).T
        targets = cpsl_ops.balanced_sinkhorn(scores, criterion.class_prior, criterion.epsilon,
                                             criterion.sinkhorn_iters)[-current.shape[0]:]
        log_p = cpsl_ops.prototype_similarity(current, prototypes, criterion.temperature).log_softmax(-1)
        total += -(targets * log_p).sum(-1).mean().item()
        queue = queue[current.shape[0]:] + list(current)
    return total / features.shape[0]


def test_batched_windows_equal_the_sequential_official_loop():
    torch.manual_seed(0)
    criterion = SelfLabelingLoss(num_classes=5, feat_dim=8, queue_size=24, samples_per_image=6,
                                 class_prior=torch.rand(5) + 0.1)
    warmup = torch.randn(4, 8, 2, 3)
    criterion(warmup)  # fills the queue with 24 rows
    assert int(criterion.queue_len) == 24
    queue_rows = criterion._queue_in_order(criterion.feature_queue)
    features = torch.randn(3, 8, 2, 3)
    expected = sequential_official_loss(criterion, features, queue_rows)
    assert criterion(features).item() == pytest.approx(expected, rel=1e-5)


def test_queue_wraps_around_in_order():
    criterion = SelfLabelingLoss(num_classes=3, feat_dim=3, queue_size=10, samples_per_image=4)
    for image in range(3):
        features = torch.zeros(1, 3, 2, 2)
        features[:, image] = 1.0  # every pixel of image i is the unit vector e_i
        criterion(features)
    in_order = criterion._queue_in_order(criterion.feature_queue)
    expected = torch.eye(3)[[0, 0, 1, 1, 1, 1, 2, 2, 2, 2]]
    assert torch.equal(in_order, expected)
    assert int(criterion.queue_ptr) == 2 and int(criterion.queue_len) == 10


def test_more_samples_than_the_queue_keeps_the_newest():
    criterion = SelfLabelingLoss(num_classes=2, feat_dim=2, queue_size=3, samples_per_image=4)
    features = torch.zeros(2, 2, 2, 2)
    features[0, 0] = 1.0
    features[1, 1] = 1.0
    criterion(features)
    assert torch.equal(criterion._queue_in_order(criterion.feature_queue), torch.eye(2)[[1, 1, 1]])
    assert int(criterion.queue_ptr) == 8 % 3


def test_state_dict_round_trip():
    torch.manual_seed(0)
    criterion = SelfLabelingLoss(num_classes=4, feat_dim=8, queue_size=40, samples_per_image=8,
                                 class_prior=[0.4, 0.3, 0.2, 0.1])
    for _ in range(3):
        criterion(torch.randn(2, 8, 3, 3), torch.randn(2, 4, 3, 3))
    criterion.update_ema()
    state = criterion.state_dict()
    assert {"prototypes", "prototypes_ema", "class_prior", "feature_queue", "logit_queue", "queue_ptr",
            "queue_len"} <= set(state)
    restored = SelfLabelingLoss(num_classes=4, feat_dim=8, queue_size=40, samples_per_image=8)
    restored.load_state_dict(state)
    for name, value in criterion.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    features, logits = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 3, 3)
    torch.manual_seed(5)
    first = criterion(features, logits)
    torch.manual_seed(5)
    assert torch.equal(first, restored(features, logits))


def test_update_ema_and_rectify():
    criterion = SelfLabelingLoss(num_classes=3, feat_dim=4, queue_size=0, ema_momentum=0.5)
    before = criterion.prototypes_ema.clone()
    with torch.no_grad():
        criterion.prototypes.add_(1.0)
    criterion.update_ema()
    torch.testing.assert_close(criterion.prototypes_ema, 0.5 * before + 0.5 * criterion.prototypes.detach())
    features, soft = torch.randn(2, 4, 3, 3), torch.rand(2, 3, 3, 3)
    labels, confidence = criterion.rectify(soft, features)
    expected = cpsl_ops.rectify_pseudo_labels(soft, cpsl_ops.prototype_similarity(features, criterion.prototypes_ema,
                                                                                  criterion.temperature))
    assert torch.equal(labels, expected[0]) and torch.equal(confidence, expected[1])


def test_init_prototypes_and_set_class_prior():
    criterion = SelfLabelingLoss(num_classes=3, feat_dim=4, queue_size=0)
    means = torch.randn(3, 4) * 5
    criterion.init_prototypes(means)
    torch.testing.assert_close(criterion.prototypes.detach(), F.normalize(means, dim=1))
    torch.testing.assert_close(criterion.prototypes_ema, F.normalize(means, dim=1))
    criterion.set_class_prior([2.0, 1.0, 1.0])
    torch.testing.assert_close(criterion.class_prior, torch.tensor([0.5, 0.25, 0.25]))
    with pytest.raises(ValueError, match=r"prototypes must be \(3, 4\)"):
        criterion.init_prototypes(torch.randn(4, 4))


@pytest.mark.parametrize(
    "features, logits, message",
    [
        (torch.randn(2, 5, 3, 3), None, r"features must be \(B, 4, H, W\)"),
        (torch.randn(8, 4), None, r"features must be \(B, 4, H, W\)"),
        (torch.randn(2, 4, 3, 3), torch.randn(2, 2, 3, 3), r"logits must be \(B, 3, H, W\)"),
        (torch.randn(2, 4, 3, 3), torch.randn(2, 3, 3, 2), "logits must be"),
    ],
)
def test_loss_bad_input(features, logits, message):
    criterion = SelfLabelingLoss(num_classes=3, feat_dim=4, queue_size=0)
    with pytest.raises(ValueError, match=message):
        criterion(features, logits)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: BalancedSinkhorn(0), ValueError, "num_classes must be at least 1"),
        (lambda: SelfLabelingLoss(num_classes=0), ValueError, "num_classes must be at least 1"),
        (lambda: PrototypeSimilarity(feat_dim=0), ValueError, "feat_dim must be at least 1"),
        (lambda: PrototypeSimilarity(temperature=0.0), ValueError, "temperature must be a positive"),
        (lambda: PrototypeSimilarity(temperature=True), ValueError, "temperature must be a positive"),
        (lambda: BalancedSinkhorn(3, epsilon=-0.1), ValueError, "epsilon must be a positive"),
        (lambda: BalancedSinkhorn(3, num_iters=2**63), ValueError, "num_iters must lie in"),
        (lambda: BalancedSinkhorn(3, num_iters=2.0), TypeError, "num_iters must be an int"),
        (lambda: PrototypeEMA(momentum=1.5), ValueError, "momentum must lie in"),
        (lambda: PrototypeEMA(momentum=True), ValueError, "momentum must lie in"),
        (lambda: PrototypeEMA(ignore_index=2.0), TypeError, "ignore_index must be an int"),
        (lambda: SelfLabelingLoss(ema_momentum=-0.1), ValueError, "ema_momentum must lie in"),
        (lambda: SelfLabelingLoss(epsilon=float("nan")), ValueError, "epsilon must be a positive"),
        (lambda: SelfLabelingLoss(sinkhorn_iters=0), ValueError, "sinkhorn_iters must be at least 1"),
        (lambda: SelfLabelingLoss(queue_size=-1), ValueError, "queue_size must be at least 0"),
        (lambda: SelfLabelingLoss(samples_per_image=0), ValueError, "samples_per_image must be at least 1"),
        (lambda: PrototypeSimilarity(metric="l2"), ValueError, 'metric must be "cosine" or "euclidean"'),
        (lambda: PrototypeEMA(metric="dot"), ValueError, 'metric must be "cosine" or "euclidean"'),
        (lambda: SelfLabelingLoss(metric="cos"), ValueError, 'metric must be "cosine" or "euclidean"'),
    ],
)
def test_constructors_reject_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4)])
def test_loss_of_an_empty_batch_or_feature_map_raises(shape):
    criterion = SelfLabelingLoss(num_classes=3, feat_dim=8, queue_size=16)
    with pytest.raises(ValueError, match="at least one image of at least one pixel"):
        criterion(torch.randn(shape))


def test_prototype_ema_rejects_non_finite_features():
    module = PrototypeEMA(num_classes=3, feat_dim=4, momentum=0.5)
    features = torch.randn(2, 4, 2, 2)
    features[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="features must be finite"):
        module.update(features, torch.zeros(2, 2, 2, dtype=torch.long))
    assert torch.equal(module.prototypes, torch.zeros(3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@torch._inductor.config.patch(fallback_random=True)  # the pixel draws match eager's
def test_loss_compiles_with_inductor_at_fullgraph_and_matches_eager(backend):
    """The queue pointer stays a tensor (torch.compile once generated code naming an undefined
    symbol for it); the queue filling up recompiles once."""
    torch._dynamo.reset()  # the backend is read while tracing: no graph of the other backend
    torch.manual_seed(0)
    eager = SelfLabelingLoss(num_classes=5, feat_dim=8, queue_size=64, samples_per_image=16)
    module = SelfLabelingLoss(num_classes=5, feat_dim=8, queue_size=64, samples_per_image=16)
    module.load_state_dict(eager.state_dict())
    compiled = torch.compile(module, fullgraph=True)
    features, logits = torch.randn(2, 8, 6, 6), torch.randn(2, 5, 6, 6)
    for step in range(4):  # the queue is full from the third step on
        with cpsl_ops.use_backend(backend):
            torch.manual_seed(step)
            expected = eager(features, logits)
            torch.manual_seed(step)
            loss = compiled(features, logits)
        expected.backward()
        loss.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(module.prototypes.grad, eager.prototypes.grad)
        assert torch.equal(module.feature_queue, eager.feature_queue) and torch.equal(module.queue_ptr, eager.queue_ptr)


def test_euclidean_self_labeling_uses_raw_features_and_prototypes():
    # ProDA-style prototypes are feature means, not unit vectors: with the euclidean metric the
    # module keeps them and the queued features as they are, and its prediction is -||f - c|| / τ.
    torch.manual_seed(0)
    features, _ = clustered_features(2, 3, 8, 6, 6, seed=4)
    features = features * 5
    criterion = SelfLabelingLoss(num_classes=3, feat_dim=8, temperature=1.0, queue_size=16, samples_per_image=8,
                                 metric="euclidean")
    means = torch.randn(3, 8) * 5
    criterion.init_prototypes(means)
    torch.testing.assert_close(criterion.prototypes.detach(), means)
    torch.testing.assert_close(criterion.prototype_logits(features),
                               cpsl_ops.prototype_similarity(features, means, 1.0, "euclidean"))
    labels, _ = criterion.rectify(torch.full((2, 3, 6, 6), 1 / 3), features)
    assert torch.equal(labels, criterion.prototype_logits(features).argmax(1))  # a uniform P_ST: nearest mean
    loss = criterion(features)
    loss.backward()
    assert torch.isfinite(loss) and criterion.prototypes.grad.abs().sum() > 0
    queued = criterion.feature_queue[:16]
    assert queued.norm(dim=1).max() > 2  # raw features, not normalized ones
    assert all(any(torch.equal(row, pixel) for pixel in features.permute(0, 2, 3, 1).reshape(-1, 8)) for row in queued)
    criterion(features).backward()  # the full queue's scores are distances too

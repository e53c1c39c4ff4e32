"""``torch.nn`` modules of cpsl-ops, built on :mod:`cpsl_ops.functional`."""

from __future__ import annotations

import functools
import operator
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from cpsl_ops._validation import check_int, check_metric, check_positive, check_unit_interval
from cpsl_ops.functional import (
    balanced_sinkhorn,
    prototype_similarity,
    rectify_pseudo_labels,
    update_prototypes_,
)

PriorLike = Union[Tensor, Sequence[float], None]

__all__ = ["PrototypeSimilarity", "BalancedSinkhorn", "PrototypeEMA", "SelfLabelingLoss"]


def _prior_tensor(class_prior: PriorLike, num_classes: int) -> Tensor:
    """A positive (K,) float32 prior summing to 1 on the default device (a ``torch.device`` block's
    too), checked on the CPU; None is uniform. Normalized in fp64, each entry divided by the
    largest first, so that no sum overflows (priors near the float32 limit). A meta tensor has no
    values to check: its shape is."""
    if isinstance(class_prior, Tensor) and class_prior.is_meta:
        if class_prior.numel() != num_classes:
            raise ValueError(f"class_prior must have {num_classes} entries, got {class_prior.numel()}")
        return torch.empty(num_classes, device="meta")
    if class_prior is None:
        prior = torch.ones(num_classes, dtype=torch.float64, device="cpu")
    else:
        if isinstance(class_prior, Tensor):
            class_prior = class_prior.detach().cpu()
        prior = torch.as_tensor(class_prior, dtype=torch.float64, device="cpu").reshape(-1)
    if prior.numel() != num_classes:
        raise ValueError(f"class_prior must have {num_classes} entries, got {prior.numel()}")
    if not (torch.isfinite(prior).all() and (prior > 0).all()):
        raise ValueError("class_prior must be positive and finite (clamp classes never seen, e.g. to 1e-6)")
    scaled = prior / prior.max()
    normalized = (scaled / scaled.sum()).float()
    if not (normalized > 0).all():
        raise ValueError(f"class_prior spans too wide a range: its smallest entry is {prior.min().item():.3g} of a total "
                         f"of {prior.sum().item():.3g}, which float32 stores as 0 (clamp it, e.g. to 1e-6 of the total)")
    return normalized.to(torch.get_default_device())


def _check_sizes(num_classes: int, feat_dim: int) -> Tuple[int, int]:
    return check_int(num_classes, "num_classes", minimum=1), check_int(feat_dim, "feat_dim", minimum=1)


class PrototypeSimilarity(nn.Module):
    """A prototype classifier: learnable (K, D) prototypes (unit vectors at first);
    ``forward(f) = cos(f, c_k) / τ`` (``metric="cosine"``, a cosine classifier) or ``-||f - c_k|| / τ``
    (``"euclidean"``), see :func:`cpsl_ops.prototype_similarity`.

    Accepts (N, D) or (B, D, H, W) features and returns (N, K) or (B, K, H, W) logits.
    """

    def __init__(
        self, num_classes: int = 19, feat_dim: int = 256, temperature: float = 0.08, metric: str = "cosine"
    ) -> None:
        super().__init__()
        num_classes, feat_dim = _check_sizes(num_classes, feat_dim)
        self.temperature = check_positive(temperature, "temperature")
        self.metric = check_metric(metric)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_classes, feat_dim), dim=1))

    def forward(self, features: Tensor) -> Tensor:
        return prototype_similarity(features, self.prototypes, self.temperature, self.metric)

    def extra_repr(self) -> str:
        num_classes, feat_dim = self.prototypes.shape
        return f"num_classes={num_classes}, feat_dim={feat_dim}, temperature={self.temperature}, metric={self.metric}"


class BalancedSinkhorn(nn.Module):
    """Class-balanced Sinkhorn-Knopp with a stored class prior (a buffer, saved in ``state_dict``).

    ``forward(scores)`` takes (N, K) or (B, N, K) scores and returns detached assignments whose
    rows sum to 1 (see :func:`cpsl_ops.balanced_sinkhorn`).
    """

    class_prior: Tensor  # buffers, declared for type checkers (nn.Module.__getattr__ returns Tensor | Module)

    def __init__(
        self, num_classes: int = 19, class_prior: PriorLike = None, epsilon: float = 0.05, num_iters: int = 3
    ) -> None:
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        self.epsilon = check_positive(epsilon, "epsilon")
        self.num_iters = check_int(num_iters, "num_iters", minimum=1)
        self.register_buffer("class_prior", _prior_tensor(class_prior, num_classes))

    def forward(self, scores: Tensor) -> Tensor:
        return balanced_sinkhorn(scores, self.class_prior, self.epsilon, self.num_iters)

    def extra_repr(self) -> str:
        return f"num_classes={self.class_prior.numel()}, epsilon={self.epsilon}, num_iters={self.num_iters}"


class PrototypeEMA(nn.Module):
    """ProDA-style class prototypes: class-wise masked feature means folded in with an EMA.

    ``update(features, labels)`` runs :func:`cpsl_ops.update_prototypes_` on the stored (K, D)
    buffer and returns the per-class pixel counts; ``forward(features)`` returns the prototype
    logits ``cos(f, p_k) / τ``, or ProDA's ``-||f - p_k|| / τ`` with ``metric="euclidean"``.
    """

    prototypes: Tensor  # a buffer, declared for type checkers (nn.Module.__getattr__ returns Tensor | Module)

    def __init__(
        self,
        num_classes: int = 19,
        feat_dim: int = 256,
        momentum: float = 0.999,
        temperature: float = 0.08,
        ignore_index: int = 255,
        metric: str = "cosine",
    ) -> None:
        super().__init__()
        num_classes, feat_dim = _check_sizes(num_classes, feat_dim)
        self.momentum = check_unit_interval(momentum, "momentum")
        self.temperature = check_positive(temperature, "temperature")
        self.ignore_index = check_int(ignore_index, "ignore_index")
        self.metric = check_metric(metric)
        self.register_buffer("prototypes", torch.zeros(num_classes, feat_dim))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> Tensor:
        return update_prototypes_(self.prototypes, features, labels, self.momentum, self.ignore_index)

    def forward(self, features: Tensor) -> Tensor:
        return prototype_similarity(features, self.prototypes, self.temperature, self.metric)

    def extra_repr(self) -> str:
        num_classes, feat_dim = self.prototypes.shape
        return f"num_classes={num_classes}, feat_dim={feat_dim}, momentum={self.momentum}, metric={self.metric}"


class SelfLabelingLoss(nn.Module):
    """CPSL's class-balanced pixel-level self-labeling loss, with its prototypes and memory bank.

    State (all in ``state_dict``): the learnable prototypes C (K, D), their EMA copy C', the class
    prior r, the feature queue (queue_size, D), the logit queue (queue_size, K), the queue pointer
    and fill level.

    ``forward(features, logits=None)`` — for each image, ``samples_per_image`` pixels are drawn
    uniformly without replacement; their L2-normalized features F give the prediction
    ``P = softmax(cos(F, C) / τ)`` and the Sinkhorn target ``Q = balanced_sinkhorn([queue; F]·Ĉᵀ, r)``
    restricted to the current rows; the loss is the soft cross-entropy ``-mean Σ_k Q log P``.
    With ``metric="euclidean"`` the features are used as they are: ``P = softmax(-||F - C|| / τ)``,
    the Sinkhorn scores are ``-||F - C||`` (ε is on their scale) and the queue holds raw features.
    When the EMA segmentation ``logits`` are given, a second target is computed the same way from
    their L2-normalized rows and a logit queue (CPSL's two branches), and the two terms are added.
    Pass ``logits`` on every call or on none: both queues advance together.
    CPSL passes features of the EMA network computed under ``no_grad``, so only the prototypes
    learn from this loss; gradients still reach ``features`` if they require them.

    CUDA graphs: once the memory bank is full (or with ``queue_size=0``) a whole step (forward,
    backward, :meth:`update_ema`, :meth:`rectify`) makes no host synchronization and can be captured
    with ``torch.cuda.graph`` (tested where a GPU is present); until then each step reads
    ``queue_len`` on the host. The fill level is read again after ``load_state_dict``, not after
    writes to the buffers by hand.

    Choices where the official code is inconsistent or sequential, documented:

    * Queue rows are scored against the normalized prototypes, like the current rows (the official
      code uses unnormalized ones for the queue).
    * The queue is used once it is full (as in the official code); until then each image is
      balanced over its own samples. The choice is made once per call.
    * With a full queue, image b of a batch is balanced over the queue as it stands after images
      0..b-1 were pushed, plus its own samples, exactly as the official per-image loop does, but
      all images are solved in one batched Sinkhorn call over overlapping windows of one tensor.

    Args:
        num_classes: K, the number of classes.
        feat_dim: D, the feature dimension.
        class_prior: the Sinkhorn class marginal r (K,), e.g. :func:`cpsl_ops.class_distribution`
            of the warm-up model's predictions; None is uniform until :meth:`set_class_prior`.
        temperature: τ of the prototype logits (0.08).
        epsilon: ε of the Sinkhorn iteration (0.05).
        sinkhorn_iters: T, the number of Sinkhorn iterations (3).
        queue_size: rows of the memory bank (65,536; 0 disables it).
        samples_per_image: pixels drawn per image (256).
        ema_momentum: momentum m of :meth:`update_ema` (0.999).
        ignore_index: label of ignored pixels in :meth:`rectify` (255).
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``
            under DDP): each image's Sinkhorn problem spans the samples (queue window and image
            b) of all ranks, as in SwAV; the queues stay per rank, and so do their checkpoints.
            Every rank must pass the same batch size B (problem b of one rank is matched with
            problem b of the others). The prototypes' gradient is not averaged here: DDP does
            it when the module is inside the wrapped model, otherwise all-reduce it yourself.
            The group is a plain attribute, not state: it is not in ``state_dict``, and a module
            holding one cannot be deep-copied or pickled (a process group cannot).
        metric: ``"cosine"`` (CPSL) or ``"euclidean"``: the similarity of features and prototypes
            (:func:`cpsl_ops.prototype_similarity`) in the prediction, the Sinkhorn scores and
            :meth:`rectify`.
    """

    # Buffers, declared for type checkers (nn.Module.__getattr__ returns Tensor | Module).
    prototypes_ema: Tensor
    class_prior: Tensor
    feature_queue: Tensor
    logit_queue: Tensor
    queue_ptr: Tensor
    queue_len: Tensor

    def __init__(
        self,
        num_classes: int = 19,
        feat_dim: int = 256,
        class_prior: PriorLike = None,
        temperature: float = 0.08,
        epsilon: float = 0.05,
        sinkhorn_iters: int = 3,
        queue_size: int = 65536,
        samples_per_image: int = 256,
        ema_momentum: float = 0.999,
        ignore_index: int = 255,
        process_group: Optional[ProcessGroup] = None,
        metric: str = "cosine",
    ) -> None:
        super().__init__()
        num_classes, feat_dim = _check_sizes(num_classes, feat_dim)
        self.temperature = check_positive(temperature, "temperature")
        self.metric = check_metric(metric)
        self.epsilon = check_positive(epsilon, "epsilon")
        self.sinkhorn_iters = check_int(sinkhorn_iters, "sinkhorn_iters", minimum=1)
        self.queue_size = check_int(queue_size, "queue_size", minimum=0)
        self.samples_per_image = check_int(samples_per_image, "samples_per_image", minimum=1)
        self.ema_momentum = check_unit_interval(ema_momentum, "ema_momentum")
        self.ignore_index = check_int(ignore_index, "ignore_index")
        self.process_group = process_group
        initial = F.normalize(torch.randn(num_classes, feat_dim), dim=1)
        self.prototypes = nn.Parameter(initial.clone())
        self.register_buffer("prototypes_ema", initial.clone())
        self.register_buffer("class_prior", _prior_tensor(class_prior, num_classes))
        self.register_buffer("feature_queue", torch.zeros(queue_size, feat_dim))
        self.register_buffer("logit_queue", torch.zeros(queue_size, num_classes))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))
        self._queue_full = False  # a host copy of queue_len == queue_size once it holds (_queue_is_full)

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def feat_dim(self) -> int:
        return self.prototypes.shape[1]

    @torch.no_grad()
    def init_prototypes(self, prototypes: Tensor) -> None:
        """Set C and C' to the (K, D) ``prototypes`` (CPSL: warm-up class means), L2-normalized for
        the cosine metric, as they are for the euclidean one."""
        if tuple(prototypes.shape) != tuple(self.prototypes.shape):
            raise ValueError(f"prototypes must be {tuple(self.prototypes.shape)}, got {tuple(prototypes.shape)}")
        initial = prototypes.to(self.prototypes)
        initial = F.normalize(initial, dim=1) if self.metric == "cosine" else initial
        self.prototypes.copy_(initial)
        self.prototypes_ema.copy_(initial)

    @torch.no_grad()
    def set_class_prior(self, class_prior: PriorLike) -> None:
        """Replace the Sinkhorn class marginal r (positive, normalized here)."""
        self.class_prior.copy_(_prior_tensor(class_prior, self.num_classes))

    @torch.no_grad()
    def update_ema(self) -> None:
        """C' <- m C' + (1 - m) C; call after each optimizer step."""
        self.prototypes_ema.lerp_(self.prototypes.detach(), 1.0 - self.ema_momentum)

    def prototype_logits(self, features: Tensor, ema: bool = True) -> Tensor:
        """cos(f, c_k)/τ (or -||f - c_k||/τ) against C' (``ema=True``) or C, for (N, D) or (B, D, H, W)
        features."""
        prototypes = self.prototypes_ema if ema else self.prototypes
        return prototype_similarity(features, prototypes, self.temperature, self.metric)

    @torch.no_grad()
    def rectify(self, soft_pseudo_labels: Tensor, features: Tensor, threshold: float = 0.0) -> Tuple[Tensor, Tensor]:
        """CPSL rectification: argmax of P_ST · softmax(cos(f, C')/τ) (or of -||f - C'||/τ); returns
        (labels, confidence).

        ``soft_pseudo_labels`` (B, K, H, W) and ``features`` (B, D, H, W) share H and W.
        """
        return rectify_pseudo_labels(
            soft_pseudo_labels, self.prototype_logits(features), threshold, self.ignore_index
        )

    def _sample_pixels(self, maps: Tensor, index: Tensor) -> Tensor:
        """(B, C, H, W) maps at (B, S) flat pixel indices -> (B, S, C)."""
        flat = maps.flatten(2)
        return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)

    def _queue_in_order(self, queue: Tensor) -> Tensor:
        """The queue's rows from oldest to newest (it is a ring buffer).

        The pointer stays a tensor, here and in :meth:`_enqueue`: reading it on the host syncs the
        GPU, and with it read as an int, torch 2.14.1's Inductor generated code naming an undefined
        symbol (``torch.compile(SelfLabelingLoss(5, 8, queue_size=64, samples_per_image=16),
        fullgraph=True)(torch.randn(2, 8, 6, 6), torch.randn(2, 5, 6, 6))`` at commit a38c0b6 of
        cpsl-ops raised ``NameError: name 'u1' is not defined`` from the generated code).
        """
        order = (self.queue_ptr + torch.arange(self.queue_size, device=queue.device)) % self.queue_size
        return queue.index_select(0, order)

    def _queue_is_full(self, device: torch.device) -> bool:
        """Whether the memory bank is full, read from ``queue_len`` on the host until it is.

        That read syncs the GPU, which CUDA-graph capture forbids; once the queue is full it stays
        full, so from then on a step has no host synchronization and can be captured.
        """
        if self.queue_size == 0:
            return False
        if self.queue_len.is_meta:  # shapes only: no fill level to read, and the loss is a scalar either way
            return True
        if not self._queue_full:
            if device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "SelfLabelingLoss: capture a step into a CUDA graph once the memory bank is full "
                    f"(queue_len == queue_size = {self.queue_size}) or with queue_size=0: until then each step "
                    "reads the fill level on the host"
                )
            self._queue_full = int(self.queue_len) == self.queue_size
        return self._queue_full

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._queue_full = False  # read the loaded queue_len again

    def _targets(self, current: Tensor, queued: Optional[Tensor]) -> Tensor:
        """Sinkhorn targets (B, S, K) of the current scores (B, S, K), balanced with the queue."""
        batch, samples, classes = current.shape
        if queued is None:
            return balanced_sinkhorn(current, self.class_prior, self.epsilon, self.sinkhorn_iters, self.process_group)
        extended = torch.cat([queued.to(current.dtype), current.reshape(-1, classes)])
        window = queued.shape[0] + samples
        # Problem b covers the queue as it stands after images 0..b-1 were pushed, then image b.
        problems = extended.as_strided((batch, window, classes), (samples * classes, classes, 1))
        return balanced_sinkhorn(problems, self.class_prior, self.epsilon, self.sinkhorn_iters,
                                 self.process_group)[:, -samples:]

    @torch.no_grad()
    def _enqueue(self, queue: Tensor, rows: Tensor) -> None:
        """Writes ``rows`` at the ring pointer; of more rows than the queue holds, the newest stay."""
        kept = rows[-self.queue_size:]
        offsets = torch.arange(rows.shape[0] - kept.shape[0], rows.shape[0], device=queue.device)
        queue[(self.queue_ptr + offsets) % self.queue_size] = kept.to(queue.dtype)

    def forward(self, features: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        """The self-labeling loss of a batch.

        Args:
            features: (B, D, H, W) pixel features (CPSL: the EMA network's, under ``no_grad``).
            logits: optional (B, K, H, W) segmentation logits of the same pixels (CPSL: the EMA
                network's), for the second Sinkhorn branch.

        Returns:
            Scalar loss: mean over sampled pixels of ``-Σ_k Q_k log P_k``, summed over branches.

        Raises:
            ValueError: on features or logits of the wrong shape, or on an empty batch or feature
                map (there is no pixel to balance; the loss of nothing is not defined).
        """
        if features.dim() != 4 or features.shape[1] != self.feat_dim:
            raise ValueError(f"features must be (B, {self.feat_dim}, H, W), got shape {tuple(features.shape)}")
        if logits is not None and (
            logits.dim() != 4 or logits.shape[1] != self.num_classes or logits.shape[2:] != features.shape[2:]
            or logits.shape[0] != features.shape[0]
        ):
            raise ValueError(
                f"logits must be (B, {self.num_classes}, H, W) matching features {tuple(features.shape)}, "
                f"got {tuple(logits.shape)}"
            )
        batch, _, height, width = features.shape
        if batch * height * width == 0:
            raise ValueError(f"features must hold at least one image of at least one pixel, got shape "
                             f"{tuple(features.shape)}")
        samples = min(self.samples_per_image, height * width)
        index = torch.rand(batch, height * width, device=features.device).topk(samples, dim=1).indices
        sampled = self._sample_pixels(features, index)  # (B, S, D)
        predictions = prototype_similarity(
            sampled.reshape(-1, self.feat_dim), self.prototypes, self.temperature, self.metric
        )
        log_probabilities = predictions.float().log_softmax(dim=-1).view(batch, samples, -1)

        queue_ready = self._queue_is_full(features.device)
        with torch.no_grad():
            scores = predictions.detach().view(batch, samples, -1) * self.temperature
            queued_scores = (
                prototype_similarity(
                    self._queue_in_order(self.feature_queue), self.prototypes.detach(), 1.0, self.metric
                )
                if queue_ready else None
            )
            branch_targets = [self._targets(scores, queued_scores)]
            queued_features = sampled.detach().float()
            queued_features = F.normalize(queued_features, dim=-1) if self.metric == "cosine" else queued_features
            if logits is not None:
                normalized_logits = F.normalize(self._sample_pixels(logits.detach(), index).float(), dim=-1)
                queued_logits = self._queue_in_order(self.logit_queue) if queue_ready else None
                branch_targets.append(self._targets(normalized_logits, queued_logits))
        # One term per branch, added (reduce, not sum(), whose start value 0 makes the type Tensor | int).
        loss = functools.reduce(
            operator.add, [-(targets.float() * log_probabilities).sum(-1).mean() for targets in branch_targets]
        )
        if self.queue_size > 0:
            with torch.no_grad():
                self._enqueue(self.feature_queue, queued_features.reshape(-1, self.feat_dim))
                if logits is not None:
                    self._enqueue(self.logit_queue, normalized_logits.reshape(-1, self.num_classes))
                pushed = batch * samples
                self.queue_ptr.copy_((self.queue_ptr + pushed) % self.queue_size)
                self.queue_len.copy_(torch.clamp(self.queue_len + pushed, max=self.queue_size))
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, temperature={self.temperature}, "
            f"epsilon={self.epsilon}, sinkhorn_iters={self.sinkhorn_iters}, queue_size={self.queue_size}, "
            f"samples_per_image={self.samples_per_image}, metric={self.metric}"
        )

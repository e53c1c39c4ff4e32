"""Stage 1: CPSL's class-balanced pixel-level self-labeling."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpsl_ops import SelfLabelingLoss, prototype_similarity, rectify_pseudo_labels

from .augment import crop
from .context import RunContext
from .distributed import Distributed
from .files import load_torch_file
from .labels import IGNORE_INDEX
from .pseudo_labels import PseudoLabelMaker
from .stage import TrainingStage
from .teacher import EMATeacher
from .training import labelled_cross_entropy, resize, reverse_cross_entropy
from .views import TargetViews, Views


def symmetric_cross_entropy(logits: Tensor, labels: Tensor, alpha: float, beta: float) -> Tensor:
    """alpha CE + beta reverse CE of the target predictions on the rectified pseudo labels."""
    return alpha * labelled_cross_entropy(logits, labels) + beta * reverse_cross_entropy(logits, labels)


def prototype_consistency(strong_logits: Tensor, weak_target: Tensor, valid: Tensor) -> Tensor:
    """KL(weak-view prototype posterior || strong-view one) at the pixels both views see, averaged
    as the official mask does: over (class, pixel) entries, i.e. the mean KL per pixel over K."""
    terms = weak_target * (weak_target.clamp_min(1e-12).log() - strong_logits.log_softmax(1))
    return (terms.sum(1) * valid).sum() / (valid.sum().clamp_min(1) * weak_target.shape[1])


def global_self_labeling(loss_sl: SelfLabelingLoss, feats: Tensor, logits: Tensor, generator: torch.Generator,
                         context: Distributed) -> Tensor:
    """The self-labeling loss of the global batch, computed alike on every rank from this rank's
    EMA ``feats`` and ``logits`` (B, D, h, w) and (B, K, h, w), its pixels drawn from ``generator``.

    One memory bank, replicated on every rank, and the Sinkhorn problems of a single process
    with the same global batch, at any number of ranks (as the official DataParallel run has them):
    the ranks gather the EMA maps and each solves every image's problem.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    devices = [feats.device] if feats.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # SelfLabelingLoss draws its pixels with torch.rand
        torch.manual_seed(seed)
        return loss_sl(context.gather_batch(feats), context.gather_batch(logits))


def contrast_with_queue(anchors: Tensor, anchor_labels: Tensor, queue: Tensor, queue_labels: Tensor,
                        temperature: float) -> Tensor:
    """The official ``CustomModel.contrastive``: a supervised-contrastive loss of (N, D) anchors
    labelled (N,) against a (Q, D) memory bank labelled (Q,). Positives are the bank's rows of the
    anchor's label (the ignore label included, as officially); each positive's log-probability is
    taken against itself plus all negatives, averaged over positives (+1e-5), then over anchors."""
    positive = (anchor_labels[:, None] == queue_labels[None, :]).float()
    logits = anchors @ queue.t() / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    exp_logits = logits.exp()
    negatives = (exp_logits * (1 - positive)).sum(1, keepdim=True)
    log_prob = logits - torch.log(exp_logits + negatives)
    return -((positive * log_prob).sum(1) / (positive.sum(1) + 1e-5)).mean()


def supervised_contrastive_loss(features: Tensor, label_map: Tensor, queue: Tensor, queue_labels: Tensor,
                                temperature: float, samples: int, orders: Tensor) -> Tensor:
    """CPSL's supervised-contrastive term as the official ``CustomModel.step`` computes it.

    ``features`` (B, D, h, w): the student's features of the weak target crop, at its own output
    size; ``label_map`` (B, H, W): the rectified pseudo labels of that crop resized (nearest) to
    the EMA network's output on the full image, the official ``threshold_SL``; ``orders`` (B, h·w):
    a permutation of the feature pixels per image. Of each image, the first ``samples`` pixels in
    that order are L2-normalized anchors, contrasted with the memory bank (``queue``,
    ``queue_labels``) by :func:`contrast_with_queue`; the mean over images is returned.

    Reproduced as it is, misalignment included: the anchors' labels are read at the same flat
    indices from ``label_map``, a map of another size (the full image's output grid, not the
    crop's), so a feature and its label belong to different pixels. Where ``label_map`` has fewer
    pixels than the feature map (the official code would fail), the missing labels are ignored.
    """
    batch, _, height, width = features.shape
    labels = label_map.reshape(batch, -1)
    if labels.shape[1] < height * width:
        labels = F.pad(labels, (0, height * width - labels.shape[1]), value=IGNORE_INDEX)
    total = features.new_zeros(())
    for image in range(batch):
        anchors = F.normalize(features[image].flatten(1).t(), dim=1)
        picked = orders[image][:samples].to(features.device)
        total = total + contrast_with_queue(anchors[picked], labels[image][picked], queue, queue_labels, temperature)
    return total / batch


class ContrastiveLabels(nn.Module):
    """The labels of the self-labeling memory bank's rows (the official ``queue_label``), written at
    the bank's ring positions as it is filled.

    As officially, an image's rows are labelled with its first samples in raster order of the
    resized label map (``threshold_SL``), not with the labels of the pixels whose features were
    drawn for the bank: the labels are misaligned with the features, and kept so.
    """

    def __init__(self, queue_size: int) -> None:
        super().__init__()
        self.register_buffer("labels", torch.zeros(queue_size, dtype=torch.long))

    @torch.no_grad()
    def push(self, label_map: Tensor, samples: int, pointer: int) -> None:
        """Writes the (B, H, W) global batch's labels where the bank wrote its rows from ``pointer``."""
        queue_size = self.labels.shape[0]
        if queue_size == 0:
            return
        rows = label_map.reshape(label_map.shape[0], -1)[:, :samples].reshape(-1)
        kept = rows[-queue_size:]
        offsets = torch.arange(rows.shape[0] - kept.shape[0], rows.shape[0], device=self.labels.device)
        self.labels[(pointer + offsets) % queue_size] = kept.to(self.labels)


class CPSLStage(TrainingStage):
    """Stage 1: self-labeling from the warm-up model (``warmup_weights``) and its pseudo labels.

    The step's terms, as the official ``CustomModel.step``: the source CE, the symmetric CE on the
    rectified target labels (CutMix pasted), the prototype consistency between the weak and the
    strong view, the self-labeling loss on the EMA teacher's maps, and the supervised-contrastive
    term. The EMA teacher and the EMA prototypes follow after each step.
    """

    trains_on_target = True

    def __init__(self, context: RunContext, warmup_weights: Path, pseudo_labels: PseudoLabelMaker) -> None:
        cfg = context.config.cpsl
        warm = context.stage_model("warmup")
        warm.load_state_dict(load_torch_file(warmup_weights))
        warm.to(context.device)
        self.pseudo = pseudo_labels.make(warm, "warmup", flip=False, with_prototypes=True)
        summary = load_torch_file(self.pseudo / "summary.pt")
        student = warm.train()
        self.teacher = EMATeacher(student, cfg.ema_momentum, context.dist, context.device)
        self.self_labeling = SelfLabelingLoss(
            context.protocol.num_classes, context.config.model.feat_dim, summary["prior"], cfg.temperature,
            cfg.epsilon, cfg.sinkhorn_iters, cfg.queue_size, cfg.samples_per_image, cfg.ema_momentum, IGNORE_INDEX,
        ).to(context.device)
        self.self_labeling.init_prototypes(summary["prototypes"])
        prototypes = self.self_labeling.prototypes
        super().__init__(context, "cpsl", cfg.iterations, student, cfg.optim,
                         [{"name": "prototypes", "params": [prototypes], "lr_mult": cfg.prototype_lr_mult}])
        self.contrastive_labels = ContrastiveLabels(cfg.queue_size).to(context.device)
        self.modules.update(teacher=self.teacher, self_labeling=self.self_labeling,
                            contrastive_labels=self.contrastive_labels)
        # Every rank computes the same self-labeling loss; averaging the prototypes' gradient
        # (DDP owns only the network's) keeps the replicas equal should kernels round apart.
        self.shared_parameters = [prototypes]
        self.weights = {"loss_consist": cfg.consistency_weight, "loss_SL": cfg.self_labeling_weight,
                        "loss_contrast": cfg.contrastive_weight}

    def make_views(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], generator: torch.Generator) -> Views:
        cfg = self.context.config.cpsl
        return self.context.views.views(source, target, generator, cutmix=(cfg.cutmix_prob, cfg.cutmix_box))

    def target_losses(self, batch: Dict[str, Any], views: Views) -> Dict[str, Tensor]:
        """The target terms (unweighted) and ``pseudo_conf``, the rectified labels' mean confidence.

        Pure but for the memory banks, which take this step's EMA features and labels, as the
        official forward fills them."""
        context, cfg, target, source = self.context, self.context.config.cpsl, views.target, views.source
        assert target is not None and target.strong is not None and target.strong_augment is not None
        quarter, prototypes_ema = context.quarter_crop, self.self_labeling.prototypes_ema
        with torch.no_grad(), context.autocast():
            ema_out = self.teacher(target.full)
            ema_feat, ema_logits = ema_out["feat"].float(), ema_out["out"].float()
            weak_feat = crop(ema_feat, target.boxes, quarter, align_corners=True)  # the official full2weak
            prototype_logits = prototype_similarity(weak_feat, prototypes_ema, cfg.temperature)
            soft = crop(batch["soft"].to(context.device).float(), target.boxes, quarter, align_corners=True)
            labels, confidence = rectify_pseudo_labels(soft, prototype_logits, cfg.rectify_threshold, IGNORE_INDEX)
            # The official threshold_SL: the (unmixed) rectified labels at the EMA output's size.
            label_map = F.interpolate(labels[:, None].float(), size=ema_feat.shape[-2:], mode="nearest").long()[:, 0]
            if target.mix_mask is not None:  # the source crop's labels in the box, sampled at stride 4 as officially
                labels = torch.where(target.mix_mask[:, ::4, ::4], source.labels[:, ::4, ::4], labels)
            warped, valid = target.strong_augment.apply_to_maps(prototype_logits, fill=0.0)
            consistency_target = warped.softmax(1)

        with context.autocast():
            weak_out = self.net(target.weak)
            weak_logits = resize(weak_out["out"], quarter).float()
            strong_feat = resize(self.net(target.strong)["feat"], quarter).float()
        loss_seg = symmetric_cross_entropy(weak_logits, labels, cfg.rce_alpha, cfg.rce_beta)
        strong_prototype_logits = prototype_similarity(strong_feat, prototypes_ema, cfg.temperature)
        loss_consistency = prototype_consistency(strong_prototype_logits, consistency_target, valid)
        return {"loss_seg": loss_seg, "loss_consist": loss_consistency,
                **self.bank_losses(ema_feat, ema_logits, label_map, weak_out["feat"], target),
                "pseudo_conf": confidence.float().mean()}

    def bank_losses(self, ema_feat: Tensor, ema_logits: Tensor, label_map: Tensor, student_feat: Tensor,
                    target: TargetViews) -> Dict[str, Tensor]:
        """The self-labeling loss of the global batch and the supervised-contrastive term, both
        against the memory bank (which they fill), with their pixels drawn from ``target.draws``."""
        cfg, dist = self.context.config.cpsl, self.context.dist
        pointer, filled = int(self.self_labeling.queue_ptr), int(self.self_labeling.queue_len)
        loss_self_labeling = global_self_labeling(self.self_labeling, ema_feat, ema_logits, target.draws, dist)
        global_label_map = dist.gather_batch(label_map)
        samples = min(cfg.samples_per_image, label_map[0].numel())
        self.contrastive_labels.push(global_label_map, samples, pointer)
        # Officially on when no CutMix was pasted and the bank filled up (before its last image).
        loss_contrast = ema_feat.new_zeros(())
        if (cfg.contrastive_weight > 0 and target.mix_mask is None and cfg.queue_size > 0
                and filled + (global_label_map.shape[0] - 1) * samples >= cfg.queue_size):
            student_feat = student_feat.float()
            pixels = student_feat[0, 0].numel()
            orders = torch.stack([torch.randperm(pixels, generator=target.draws)
                                  for _ in range(global_label_map.shape[0])])[dist.rows(label_map.shape[0])]
            loss_contrast = supervised_contrastive_loss(student_feat, label_map, self.self_labeling.feature_queue,
                                                        self.contrastive_labels.labels, cfg.temperature,
                                                        cfg.samples_per_image, orders)
        return {"loss_SL": loss_self_labeling, "loss_contrast": loss_contrast}

    def after_step(self, iteration: int, terms: Dict[str, Tensor]) -> Dict[str, float]:
        self.teacher.update(self.model)
        self.self_labeling.update_ema()
        return {}

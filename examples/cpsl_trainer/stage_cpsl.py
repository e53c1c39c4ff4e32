"""Stage 1: CPSL's class-balanced pixel-level self-labeling."""

from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpsl_ops import SelfLabelingLoss, prototype_similarity, rectify_pseudo_labels

from .augment import box_mask, crop, cutmix_box
from .distributed import Distributed, synchronize_batch_norm
from .files import load_torch_file
from .labels import IGNORE_INDEX
from .pseudo_labels import PseudoLabels
from .training import as_float_images, ema_update, poly_lr, resize, reverse_cross_entropy


def symmetric_cross_entropy(logits: Tensor, labels: Tensor, alpha: float, beta: float) -> Tensor:
    """alpha CE + beta reverse CE of the target predictions on the rectified pseudo labels."""
    return alpha * F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX) + beta * reverse_cross_entropy(logits, labels)


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


class CPSLStage(PseudoLabels):
    """Stage 1: the self-labeling stage, from the warm-up model and its pseudo labels."""

    def cpsl(self) -> None:
        stage, cfg, data = "cpsl", self.config.cpsl, self.config.data
        warm = self.stage_model("warmup")
        warm.load_state_dict(load_torch_file(self.selected_weights("warmup")))
        warm.to(self.device)
        pseudo = self.pseudo_labels(warm, "warmup", flip=False, with_prototypes=True)
        summary = load_torch_file(pseudo / "summary.pt")
        student = warm.train()
        teacher = copy.deepcopy(student)  # the official EMA network stays in training mode
        for param in teacher.parameters():
            param.requires_grad_(False)
        teacher = synchronize_batch_norm(teacher, self.dist, self.device)
        net = self.parallel(student)
        loss_sl = SelfLabelingLoss(
            self.protocol.num_classes, self.config.model.feat_dim, summary["prior"], cfg.temperature, cfg.epsilon,
            cfg.sinkhorn_iters, cfg.queue_size, cfg.samples_per_image, cfg.ema_momentum, IGNORE_INDEX,
        ).to(self.device)
        loss_sl.init_prototypes(summary["prototypes"])
        optimizer = self.optimizer(student, cfg.optim, [{"params": [loss_sl.prototypes], "lr_mult": cfg.prototype_lr_mult}])
        scaler = self.new_scaler()
        contrastive_labels = ContrastiveLabels(cfg.queue_size).to(self.device)
        modules = {"model": student, "teacher": teacher, "self_labeling": loss_sl, "contrastive_labels": contrastive_labels,
                   "optimizer": optimizer, "scaler": scaler}
        start, source, target = self.adaptation_batches(stage, modules, pseudo)
        quarter = self.quarter_crop

        def step(iteration: int, generator: torch.Generator) -> Dict[str, float]:
            lr = poly_lr(optimizer, cfg.optim.lr, iteration, cfg.iterations, cfg.optim.poly_power)
            optimizer.zero_grad(set_to_none=True)
            source_batch = next(source)
            source_crops, source_crop_labels = cut = self.weak_crop(source_batch, generator)
            loss_source = self.source_backward(net, source_batch, generator, scaler, cut)

            batch = next(target)
            full = as_float_images(batch["image"], self.device)
            boxes = self.crop_boxes(generator, full.shape[0], full.shape[-2:])
            weak = crop(full, boxes, data.crop_size)
            strong, strong_augment = self.strong_view(generator, weak)
            mix = bool(torch.rand(1, generator=generator) < cfg.cutmix_prob)
            if mix:  # CutMix: a box of the source loss's own crop pasted into the weak target crop
                mix_mask = box_mask(cutmix_box(generator, cfg.cutmix_box), data.crop_size, self.device)
                weak = torch.where(mix_mask[:, None], source_crops, weak)

            with torch.no_grad(), self.autocast():
                ema_out = teacher(full)
                ema_feat, ema_logits = ema_out["feat"].float(), ema_out["out"].float()
                weak_feat = crop(ema_feat, boxes, quarter, align_corners=True)  # the official full2weak
                prototype_logits = prototype_similarity(weak_feat, loss_sl.prototypes_ema, cfg.temperature)
                soft = crop(batch["soft"].to(self.device).float(), boxes, quarter, align_corners=True)
                labels, confidence = rectify_pseudo_labels(soft, prototype_logits, cfg.rectify_threshold, IGNORE_INDEX)
                # The official threshold_SL: the (unmixed) rectified labels at the EMA output's size.
                label_map = F.interpolate(labels[:, None].float(), size=ema_feat.shape[-2:], mode="nearest").long()[:, 0]
                if mix:  # the source crop's labels in the box, sampled at stride 4 as officially
                    labels = torch.where(mix_mask[:, ::4, ::4], source_crop_labels[:, ::4, ::4], labels)
                warped, valid = strong_augment.apply_to_maps(prototype_logits, fill=0.0)
                consistency_target = warped.softmax(1)

            with self.autocast():
                weak_out = net(weak)
                weak_logits = resize(weak_out["out"], quarter).float()
                strong_feat = resize(net(strong)["feat"], quarter).float()
            # The paper's losses: the source CE (above), the symmetric CE on the rectified target
            # labels, the prototype consistency between views, and the self-labeling loss.
            loss_seg = symmetric_cross_entropy(weak_logits, labels, cfg.rce_alpha, cfg.rce_beta)
            strong_prototype_logits = prototype_similarity(strong_feat, loss_sl.prototypes_ema, cfg.temperature)
            loss_consistency = prototype_consistency(strong_prototype_logits, consistency_target, valid)
            pointer, filled = int(loss_sl.queue_ptr), int(loss_sl.queue_len)
            loss_self_labeling = global_self_labeling(loss_sl, ema_feat, ema_logits, generator, self.dist)
            global_label_map = self.dist.gather_batch(label_map)
            samples = min(cfg.samples_per_image, label_map[0].numel())
            contrastive_labels.push(global_label_map, samples, pointer)
            # Officially on when no CutMix was pasted and the bank filled up (before its last image).
            loss_contrast = weak_logits.new_zeros(())
            if (cfg.contrastive_weight > 0 and not mix and cfg.queue_size > 0
                    and filled + (global_label_map.shape[0] - 1) * samples >= cfg.queue_size):
                student_feat = weak_out["feat"].float()
                pixels = student_feat[0, 0].numel()
                orders = torch.stack([torch.randperm(pixels, generator=generator)
                                      for _ in range(global_label_map.shape[0])])[self.dist.rows(full.shape[0])]
                loss_contrast = supervised_contrastive_loss(student_feat, label_map, loss_sl.feature_queue,
                                                            contrastive_labels.labels, cfg.temperature,
                                                            cfg.samples_per_image, orders)
            total_loss = loss_seg + cfg.consistency_weight * loss_consistency + cfg.self_labeling_weight * loss_self_labeling
            total_loss = total_loss + cfg.contrastive_weight * loss_contrast
            scaler.scale(total_loss).backward()
            # Every rank computed the same self-labeling loss; averaging the prototypes' gradient
            # (DDP owns only the network's) keeps the replicas equal should kernels round apart.
            self.dist.average_gradients([loss_sl.prototypes])
            scaler.step(optimizer)
            scaler.update()
            ema_update(teacher, student, cfg.ema_momentum)
            loss_sl.update_ema()
            return {"loss_source": loss_source.item(), "loss_seg": loss_seg.item(), "loss_consist": loss_consistency.item(),
                    "loss_SL": loss_self_labeling.item(), "loss_contrast": loss_contrast.item(),
                    "pseudo_conf": confidence.float().mean().item(), "lr": lr}

        self.train_loop(stage, start, cfg.iterations, modules, step, student)

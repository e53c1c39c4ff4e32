"""Stage 1: CPSL's class-balanced pixel-level self-labeling."""

from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

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
        modules = {"model": student, "teacher": teacher, "self_labeling": loss_sl, "optimizer": optimizer, "scaler": scaler}
        start, source, target = self.adaptation_batches(stage, modules, pseudo)
        quarter = self.quarter_crop

        def step(iteration: int, generator: torch.Generator) -> Dict[str, float]:
            lr = poly_lr(optimizer, cfg.optim.lr, iteration, cfg.iterations, cfg.optim.poly_power)
            optimizer.zero_grad(set_to_none=True)
            source_batch = next(source)
            loss_source = self.source_backward(net, source_batch, generator, scaler)

            batch = next(target)
            full = as_float_images(batch["image"], self.device)
            boxes = self.crop_boxes(generator, full.shape[0], full.shape[-2:])
            weak = crop(full, boxes, data.crop_size)
            strong, strong_augment = self.strong_view(generator, weak)
            mix = bool(torch.rand(1, generator=generator) < cfg.cutmix_prob)
            if mix:  # CutMix: a box of the source crop pasted into the weak target crop
                mix_box = cutmix_box(generator, cfg.cutmix_box)
                source_images = as_float_images(source_batch["image"], self.device)
                source_boxes = self.crop_boxes(generator, full.shape[0], source_images.shape[-2:])
                weak = torch.where(box_mask(mix_box, data.crop_size, self.device)[:, None],
                                   crop(source_images, source_boxes, data.crop_size), weak)

            with torch.no_grad(), self.autocast():
                ema_out = teacher(full)
                ema_feat, ema_logits = ema_out["feat"].float(), ema_out["out"].float()
                weak_feat = crop(ema_feat, boxes, quarter)
                prototype_logits = prototype_similarity(weak_feat, loss_sl.prototypes_ema, cfg.temperature)
                soft = crop(batch["soft"].to(self.device).float(), boxes, quarter)
                labels, confidence = rectify_pseudo_labels(soft, prototype_logits, cfg.rectify_threshold, IGNORE_INDEX)
                if mix:
                    source_labels = crop(source_batch["label"].to(self.device).long()[:, None], source_boxes, quarter)[:, 0]
                    labels = torch.where(box_mask(mix_box, quarter, self.device), source_labels, labels)
                warped, valid = strong_augment.apply_to_maps(prototype_logits, fill=0.0)
                consistency_target = warped.softmax(1)

            with self.autocast():
                weak_logits = resize(net(weak)["out"], quarter).float()
                strong_feat = resize(net(strong)["feat"], quarter).float()
            # The paper's losses: the source CE (above), the symmetric CE on the rectified target
            # labels, the prototype consistency between views, and the self-labeling loss.
            loss_seg = symmetric_cross_entropy(weak_logits, labels, cfg.rce_alpha, cfg.rce_beta)
            strong_prototype_logits = prototype_similarity(strong_feat, loss_sl.prototypes_ema, cfg.temperature)
            loss_consistency = prototype_consistency(strong_prototype_logits, consistency_target, valid)
            loss_self_labeling = global_self_labeling(loss_sl, ema_feat, ema_logits, generator, self.dist)
            total_loss = loss_seg + cfg.consistency_weight * loss_consistency + cfg.self_labeling_weight * loss_self_labeling
            scaler.scale(total_loss).backward()
            # Every rank computed the same self-labeling loss; averaging the prototypes' gradient
            # (DDP owns only the network's) keeps the replicas equal should kernels round apart.
            self.dist.average_gradients([loss_sl.prototypes])
            scaler.step(optimizer)
            scaler.update()
            ema_update(teacher, student, cfg.ema_momentum)
            loss_sl.update_ema()
            return {"loss_source": loss_source.item(), "loss_seg": loss_seg.item(), "loss_consist": loss_consistency.item(),
                    "loss_SL": loss_self_labeling.item(), "pseudo_conf": confidence.float().mean().item(), "lr": lr}

        self.train_loop(stage, start, cfg.iterations, modules, step, student)

"""Stages 2 and 3: ProDA's self-distillation into a fresh (or the teacher's) student."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import crop
from .config import student_init as config_student_init
from .files import load_torch_file
from .labels import IGNORE_INDEX
from .pseudo_labels import PseudoLabels
from .training import as_float_images, poly_lr, resize


def distillation_kl(student_logits: Tensor, teacher_probabilities: Tensor, form: str) -> Tensor:
    """The distillation term: ``official`` is the official code's ``F.kl_div`` given the student's
    probabilities where it expects log-probabilities, averaged over every (class, pixel) entry,
    i.e. mean of t (log t - p_s); ``proper`` is KL(p_t || p_s), summed over classes and averaged
    over pixels."""
    if form == "official":
        # reduction="none" then mean: the same value as the official reduction="mean", without
        # PyTorch's warning that "mean" will change meaning.
        return F.kl_div(student_logits.softmax(1), teacher_probabilities, reduction="none").mean()
    if form == "proper":
        return F.kl_div(student_logits.log_softmax(1), teacher_probabilities, reduction="none").sum(1).mean()
    raise ValueError(f"distill.kl must be official or proper, got {form!r}")


class DistillStage(PseudoLabels):
    """Stages 2 and 3: a student distilled from the previous stage's selected model."""

    def distill(self, number: int, teacher_stage: str) -> None:
        stage, cfg, data = f"distill{number}", self.config.distill, self.config.data
        teacher = self.stage_model(teacher_stage)
        teacher.load_state_dict(load_torch_file(self.selected_weights(teacher_stage)))
        teacher.to(self.device).eval()
        pseudo = self.pseudo_labels(teacher, teacher_stage, flip=True, with_prototypes=False)
        student_init = config_student_init(self.config, number)
        if student_init == "teacher":
            student = self.stage_model(stage).to(self.device)
            # A student with bn_pretrain of a teacher without one starts with a fresh bn_pretrain.
            missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
            if unexpected or any(not name.startswith("bn_pretrain.") for name in missing):
                raise ValueError(f"the {teacher_stage} weights do not fit the {stage} student: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        else:
            student = self.stage_model(stage, cfg.pretrained or self.config.model.pretrained).to(self.device)
        student.train()
        for param in student.parameters():
            param.requires_grad_(True)
        net = self.parallel(student)
        optimizer = self.optimizer(student, cfg.optim)
        scaler = self.new_scaler()
        modules = {"model": student, "optimizer": optimizer, "scaler": scaler}
        start, source, target = self.adaptation_batches(stage, modules, pseudo)
        quarter = self.quarter_crop

        def step(iteration: int, generator: torch.Generator) -> Dict[str, float]:
            lr = poly_lr(optimizer, cfg.optim.lr, iteration, cfg.iterations, cfg.optim.poly_power)
            optimizer.zero_grad(set_to_none=True)
            loss_source = self.source_backward(net, next(source), generator, scaler)
            batch = next(target)
            full = as_float_images(batch["image"], self.device)
            boxes = self.crop_boxes(generator, full.shape[0], full.shape[-2:])
            strong, strong_augment = self.strong_view(generator, crop(full, boxes, data.crop_size))
            with torch.no_grad():
                # The stride-8 soft labels as the official code takes them (to the image, to the
                # rescaled image, cropped, to stride 4: align_corners=True throughout).
                soft = crop(batch["soft"].to(self.device).float(), boxes, quarter, align_corners=True)
                confidence, labels = soft.max(1)
                labels = torch.where(confidence > cfg.confidence, labels, IGNORE_INDEX)
                labels = strong_augment.apply_to_maps(labels[:, None], fill=IGNORE_INDEX)[0][:, 0]
                with self.autocast():
                    teacher_probabilities = resize(teacher(strong)["out"].float(), quarter).softmax(1)
            with self.autocast():
                student_logits = resize(net(strong)["out"], quarter).float()
            loss_pseudo = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX)
            loss_kd = distillation_kl(student_logits, teacher_probabilities, cfg.kl)
            total_loss = loss_pseudo + cfg.kd_weight * loss_kd
            scaler.scale(total_loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return {"loss_source": loss_source.item(), "loss_pseudo": loss_pseudo.item(), "loss_kd": loss_kd.item(), "lr": lr}

        self.train_loop(stage, start, cfg.iterations, modules, step, student)


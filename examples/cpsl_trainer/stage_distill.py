"""Stages 2 and 3: ProDA's self-distillation into a fresh (or the teacher's) student."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import crop
from .config import student_init as config_student_init
from .context import RunContext
from .files import load_torch_file
from .labels import IGNORE_INDEX
from .model import DeepLabV2
from .pseudo_labels import PseudoLabelMaker
from .stage import TrainingStage
from .training import labelled_cross_entropy, resize
from .views import Views


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


class DistillStage(TrainingStage):
    """Stage ``distill<number>``: a student distilled from the selected weights of the previous
    stage, ``teacher_stage``: the CE on the teacher's confident soft labels of the strong view,
    and the KL to the teacher's predictions on it."""

    trains_on_target = True

    def __init__(self, context: RunContext, number: int, teacher_stage: str, teacher_weights: Path,
                 pseudo_labels: PseudoLabelMaker) -> None:
        name, cfg = f"distill{number}", context.config.distill
        self.teacher = context.stage_model(teacher_stage)
        self.teacher.load_state_dict(load_torch_file(teacher_weights))
        self.teacher.to(context.device).eval()
        self.pseudo = pseudo_labels.make(self.teacher, teacher_stage, flip=True, with_prototypes=False)
        student = self.new_student(context, number, teacher_stage).train()
        for param in student.parameters():
            param.requires_grad_(True)
        super().__init__(context, name, cfg.iterations, student, cfg.optim)
        self.weights = {"loss_kd": cfg.kd_weight}

    def new_student(self, context: RunContext, number: int, teacher_stage: str) -> DeepLabV2:
        name, cfg = f"distill{number}", context.config.distill
        if config_student_init(context.config, number) != "teacher":
            return context.stage_model(name, cfg.pretrained or context.config.model.pretrained).to(context.device)
        student = context.stage_model(name).to(context.device)
        # A student with bn_pretrain of a teacher without one starts with a fresh bn_pretrain.
        missing, unexpected = student.load_state_dict(self.teacher.state_dict(), strict=False)
        if unexpected or any(not key.startswith("bn_pretrain.") for key in missing):
            raise ValueError(f"the {teacher_stage} weights do not fit the {name} student: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return student

    def target_losses(self, batch: Dict[str, Any], views: Views) -> Dict[str, Tensor]:
        """``loss_pseudo``, the CE on the teacher's labels above ``distill.confidence`` (warped as
        the strong view), and ``loss_kd`` (:func:`distillation_kl`), both at output stride 4."""
        context, cfg, target = self.context, self.context.config.distill, views.target
        assert target is not None and target.strong is not None and target.strong_augment is not None
        quarter = context.quarter_crop
        with torch.no_grad():
            soft = crop(batch["soft"].to(context.device).float(), target.boxes, quarter, align_corners=True)
            confidence, labels = soft.max(1)
            labels = torch.where(confidence > cfg.confidence, labels, IGNORE_INDEX)
            labels = target.strong_augment.apply_to_maps(labels[:, None], fill=IGNORE_INDEX)[0][:, 0]
            with context.autocast():
                teacher_probabilities = resize(self.teacher(target.strong)["out"].float(), quarter).softmax(1)
        with context.autocast():
            student_logits = resize(self.net(target.strong)["out"], quarter).float()
        return {"loss_pseudo": labelled_cross_entropy(student_logits, labels),
                "loss_kd": distillation_kl(student_logits, teacher_probabilities, cfg.kl)}

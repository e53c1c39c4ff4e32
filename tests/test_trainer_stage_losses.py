"""Each stage's ``losses(batch, views)``, term by term, against the official code's computation of
that term (lslrh/CPSL ``CustomModel.step`` / ``step_adv`` / the distillation step), written out
here from the same networks' outputs on the same views.

The geometry (crops, strong-view warps, ``full2weak``) is tested against the official functions in
test_trainer_augment.py; the self-labeling loss against the official Sinkhorn step in the op
tests; here, what each stage feeds them and how each term is formed. Dropout is off so that the
networks can be run again for the check (BatchNorm in training mode uses batch statistics).
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.config import load_config  # noqa: E402
from cpsl_trainer.context import RunContext  # noqa: E402
from cpsl_trainer.demo_data import write_demo_datasets  # noqa: E402
from cpsl_trainer.labels import IGNORE_INDEX  # noqa: E402
from cpsl_trainer.pseudo_labels import PseudoLabelMaker  # noqa: E402
from cpsl_trainer.stage_cpsl import CPSLStage  # noqa: E402
from cpsl_trainer.stage_distill import DistillStage  # noqa: E402
from cpsl_trainer.stage_warmup import WarmupStage  # noqa: E402
from test_trainer_losses import OfficialFCDiscriminator  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "demo.yaml"


def up(logits, size):
    """The official upsampling of stride-8 maps: bilinear, align_corners=True."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def official_symmetric_ce(pred, labels, alpha, beta, num_classes):
    """The official SCE: alpha CE + beta RCE, the RCE's one-hot clamped to [1e-4, 1]."""
    ce = F.cross_entropy(pred, labels, ignore_index=IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    p = pred.softmax(1).clamp(1e-7, 1.0)
    one_hot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float().clamp(1e-4, 1.0)
    return alpha * ce + beta * (-(p * one_hot.log()).sum(1))[valid].mean()


def official_prototype_logits(feat, prototypes, temperature):
    return F.normalize(feat, dim=1).permute(0, 2, 3, 1) @ F.normalize(prototypes, dim=1).t() / temperature


def context_for(tmp_path, *overrides):
    gta5, cityscapes = write_demo_datasets(tmp_path / "data", (32, 64), 4, 4, 2, seed=3, progress=False)
    config = load_config(DEMO_CONFIG, [
        f"data.source_root={gta5}", f"data.target_root={cityscapes}", f"train.output_dir={tmp_path / 'run'}",
        "data.source_size=[32, 64]", "data.target_size=[32, 64]", "data.crop_size=[32, 64]", "data.batch_size=2",
        "model.dropout=0.0", "cpsl.queue_size=32", "cpsl.samples_per_image=8", "train.progress=false", *overrides])
    return RunContext(config)


def first_step_inputs(stage):
    """The first batch and its views, drawn with the first seed whose strong view moves the image
    (a geometric operation), so that a target not warped like the view would be seen."""
    stage.start(0)
    source, target = next(stage.source), next(stage.target)
    for seed in range(100):
        views = stage.make_views(source, target, torch.Generator().manual_seed(seed))
        augment = views.target.strong_augment
        if augment is None or not torch.allclose(augment.thetas, torch.eye(2, 3).expand_as(augment.thetas)):
            return target, views
    raise AssertionError("no strong view with a geometric operation in 100 draws")


def random_weights(context, tmp_path, name="warm.pt"):
    torch.manual_seed(0)
    path = tmp_path / name
    torch.save(context.new_model().state_dict(), path)
    return path


@pytest.mark.parametrize("mix", [0.0, 1.0])
def test_cpsl_terms_are_the_official_steps(tmp_path, mix):
    context = context_for(tmp_path, f"cpsl.cutmix_prob={mix}")
    stage = CPSLStage(context, random_weights(context, tmp_path), PseudoLabelMaker(context))
    batch, views = first_step_inputs(stage)
    target, cfg = views.target, context.config.cpsl
    assert (target.mix_mask is not None) == (mix == 1.0)
    teacher, bank = copy.deepcopy(stage.teacher.network), copy.deepcopy(stage.self_labeling)
    draws = torch.Generator()
    draws.set_state(target.draws.get_state())
    terms = stage.losses(batch, views)
    assert list(terms) == ["loss_source", "source_logits", "loss_seg", "loss_consist", "loss_SL", "loss_contrast",
                           "pseudo_conf"]

    crop, quarter, net = context.config.data.crop_size, context.quarter_crop, stage.model
    source_logits = up(net(views.source.images)["out"], crop)
    torch.testing.assert_close(terms["loss_source"], F.cross_entropy(source_logits, views.source.labels,
                                                                     ignore_index=IGNORE_INDEX))
    with torch.no_grad():
        ema = teacher(target.full)
        weak_feat = stage_crop(ema["feat"], target, quarter)
        prototypes = bank.prototypes_ema
        posterior = official_prototype_logits(weak_feat, prototypes, cfg.temperature).permute(0, 3, 1, 2)
        soft = stage_crop(batch["soft"].float(), target, quarter)
        labels = (soft * posterior.softmax(1)).argmax(1)  # the rectified label: argmax of P_ST · P_SL
        if target.mix_mask is not None:
            labels = torch.where(target.mix_mask[:, ::4, ::4], views.source.labels[:, ::4, ::4], labels)
        warped, valid = target.strong_augment.apply_to_maps(posterior, fill=0.0)
    weak_logits = up(net(target.weak)["out"], quarter)
    torch.testing.assert_close(terms["loss_seg"], official_symmetric_ce(weak_logits, labels, cfg.rce_alpha,
                                                                        cfg.rce_beta, context.protocol.num_classes))
    strong = official_prototype_logits(up(net(target.strong)["feat"], quarter), prototypes, cfg.temperature)
    kl = F.kl_div(strong.permute(0, 3, 1, 2).log_softmax(1), warped.softmax(1), reduction="none")
    mask = valid[:, None].expand_as(kl).float()  # the official consistency: masked mean over (class, pixel)
    torch.testing.assert_close(terms["loss_consist"], (kl * mask).sum() / mask.sum())
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=draws)))
        torch.testing.assert_close(terms["loss_SL"], bank(ema["feat"], ema["out"]))
    assert terms["loss_contrast"] == 0  # the bank was empty: the official term waits for a full bank
    product = soft * posterior.softmax(1)
    torch.testing.assert_close(terms["pseudo_conf"], (product.max(1).values / product.sum(1)).mean())


def stage_crop(maps, target, size):
    from cpsl_trainer.augment import crop

    return crop(maps, target.boxes, size, align_corners=True)


def test_distillation_terms_are_the_official_steps(tmp_path):
    # A random teacher is rarely confident: a low threshold leaves pixels to learn from.
    context = context_for(tmp_path, "distill.student_init=teacher", "distill.confidence=0.0")
    stage = DistillStage(context, 1, "cpsl", random_weights(context, tmp_path), PseudoLabelMaker(context))
    batch, views = first_step_inputs(stage)
    target, cfg, quarter = views.target, context.config.distill, context.quarter_crop
    terms = stage.losses(batch, views)
    assert [name for name in terms if name.startswith("loss_")] == ["loss_source", "loss_pseudo", "loss_kd"]
    soft = stage_crop(batch["soft"].float(), target, quarter)
    confidence, labels = soft.max(1)
    labels[confidence <= cfg.confidence] = IGNORE_INDEX
    labels = target.strong_augment.apply_to_maps(labels[:, None], fill=IGNORE_INDEX)[0][:, 0]
    assert (labels != IGNORE_INDEX).any()
    student = up(stage.model(target.strong)["out"], quarter)
    teacher = up(stage.teacher(target.strong)["out"], quarter).softmax(1)
    torch.testing.assert_close(terms["loss_pseudo"], F.cross_entropy(student, labels, ignore_index=IGNORE_INDEX))
    # The official F.kl_div(student probabilities, teacher probabilities), reduction "mean".
    torch.testing.assert_close(terms["loss_kd"], (teacher * (teacher.log() - student.softmax(1))).mean())


def test_adversarial_warmup_terms_are_the_official_step_adv(tmp_path):
    context = context_for(tmp_path, "warmup.adversarial=true")
    stage = WarmupStage(context)
    batch, views = first_step_inputs(stage)
    terms = stage.losses(batch, views)
    official = OfficialFCDiscriminator(context.protocol.num_classes)
    official.load_state_dict(stage.discriminator.state_dict())
    target_logits = up(stage.model(views.target.weak)["out"], context.config.data.crop_size)
    scores = official(F.softmax(target_logits, dim=1))
    torch.testing.assert_close(terms["loss_adv"], F.mse_loss(scores, torch.zeros_like(scores)))  # source label 0
    loss_d = stage.after_step(0, terms)["loss_D"]
    source_scores = official(terms["source_logits"].softmax(1))
    expected = F.mse_loss(source_scores, torch.zeros_like(source_scores)) + F.mse_loss(scores, torch.ones_like(scores))
    assert loss_d == pytest.approx(expected.item(), rel=1e-5)


def test_a_term_with_no_labelled_pixel_is_zero_not_nan(tmp_path):
    from cpsl_trainer.training import labelled_cross_entropy

    logits = torch.randn(2, 5, 3, 4, requires_grad=True)
    labels = torch.full((2, 3, 4), IGNORE_INDEX)
    assert F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).isnan()  # what it replaces
    loss = labelled_cross_entropy(logits, labels)
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels[0, 1, 2] = 3
    torch.testing.assert_close(labelled_cross_entropy(logits, labels), F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX))

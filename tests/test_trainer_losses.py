"""The trainer's CPSL losses and networks against independent re-implementations of the official
code (lslrh/CPSL): the supervised-contrastive term and the warm-up's FCDiscriminator."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.labels import IGNORE_INDEX  # noqa: E402
from cpsl_trainer.stage_cpsl import ContrastiveLabels, contrast_with_queue, supervised_contrastive_loss  # noqa: E402
from cpsl_trainer.stage_warmup import FCDiscriminator  # noqa: E402
from cpsl_ops import SelfLabelingLoss  # noqa: E402


# ----------------------------------------------------------------------------- official, re-implemented


class OfficialFCDiscriminator(nn.Module):
    """models/discriminator.py FCDiscriminator(inplanes, planes=64), as published."""

    def __init__(self, inplanes, planes=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(planes, planes * 2, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(planes * 2, planes * 4, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(planes * 4, planes * 8, kernel_size=3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.classifier = nn.Conv2d(planes * 8, 1, kernel_size=1)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        x = self.leaky_relu(self.conv4(x))
        return self.classifier(x)


def official_contrastive(queue, queue_label, feats_, labels_, temperature):
    """models/adaptation_modelv2.py CustomModel.contrastive (queue_label (Q, 1), labels_ (N, 1))."""
    mask = torch.eq(labels_, torch.transpose(queue_label, 0, 1)).float()
    anchor_dot_contrast = torch.div(torch.matmul(feats_, torch.transpose(queue, 0, 1)), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    neg_mask = 1 - mask
    neg_logits = torch.exp(logits) * neg_mask
    neg_logits = neg_logits.sum(1, keepdim=True)
    exp_logits = torch.exp(logits)
    log_prob = logits - torch.log(exp_logits + neg_logits)
    mean_log_prob_pos = (mask * log_prob).sum(1) / (mask.sum(1) + 1e-5)
    loss = -mean_log_prob_pos
    return loss.mean()


def official_contrastive_term(target_feat_SL, threshold_SL, queue, queue_label, temperature, fbs, rand_indices):
    """The contrastive block of CustomModel.step, with its torch.randperm draws given."""
    bs, dim = target_feat_SL.shape[:2]
    target_feat_contrast = target_feat_SL.transpose(1, 2).transpose(2, 3).contiguous().view(bs, -1, dim)
    target_label_contrast = threshold_SL.transpose(1, 2).transpose(2, 3).contiguous().view(bs, -1, 1)
    loss_contrast = 0
    for i in range(target_feat_contrast.shape[0]):
        feats_ = torch.nn.functional.normalize(target_feat_contrast[i], dim=1, p=2)
        rand_index = rand_indices[i]
        feats_ = feats_[rand_index]
        feats_ = feats_[:fbs]
        labels_ = target_label_contrast[i][rand_index][:fbs]
        loss_contrast += official_contrastive(queue, queue_label, feats_, labels_, temperature)
    loss_contrast /= target_feat_contrast.shape[0]
    return loss_contrast


# ----------------------------------------------------------------------------- contrastive term


def random_labels(generator, shape):
    """Labels of three classes and the ignore label, so that anchors have few, many or no positives."""
    return torch.tensor([0, 1, 2, IGNORE_INDEX])[torch.randint(4, shape, generator=generator)]


@pytest.mark.parametrize("seed,label_size,samples", [(0, (9, 13), 16), (1, (5, 7), 64), (2, (12, 20), 8)])
def test_supervised_contrastive_loss_is_the_official_computation(seed, label_size, samples):
    generator = torch.Generator().manual_seed(seed)
    batch, dim, height, width, queue_size, temperature = 3, 16, 5, 7, 40, 0.08
    features = torch.randn(batch, dim, height, width, generator=generator, dtype=torch.float64)
    label_map = random_labels(generator, (batch, *label_size))  # the official threshold_SL, another grid
    queue = F.normalize(torch.randn(queue_size, dim, generator=generator, dtype=torch.float64), dim=1)
    queue_labels = random_labels(generator, (queue_size,))
    orders = torch.stack([torch.randperm(height * width, generator=generator) for _ in range(batch)])

    ours_input = features.clone().requires_grad_(True)
    ours = supervised_contrastive_loss(ours_input, label_map, queue, queue_labels, temperature, samples, orders)
    official_input = features.clone().requires_grad_(True)
    official = official_contrastive_term(official_input, label_map[:, None], queue, queue_labels[:, None].double(),
                                         temperature, samples, orders)
    torch.testing.assert_close(ours, official)
    ours.backward()
    official.backward()
    torch.testing.assert_close(ours_input.grad, official_input.grad)
    assert ours_input.grad.abs().sum() > 0


def test_contrast_with_queue_is_the_official_contrastive():
    generator = torch.Generator().manual_seed(3)
    anchors = F.normalize(torch.randn(20, 8, generator=generator, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(50, 8, generator=generator, dtype=torch.float64), dim=1)
    labels, queue_labels = random_labels(generator, (20,)), random_labels(generator, (50,))
    expected = official_contrastive(queue, queue_labels[:, None].double(), anchors, labels[:, None], 0.5)
    torch.testing.assert_close(contrast_with_queue(anchors, labels, queue, queue_labels, 0.5), expected)


def test_the_label_queue_labels_the_memory_banks_rows_as_officially():
    # Each (step, image) pushes features along its own basis vector and has one label everywhere:
    # every row of the bank must carry the label of the image its feature came from, through the
    # ring's wrap-around (the official queue_label shifts alongside the official queue).
    batch, samples, queue_size, steps = 2, 3, 10, 4
    loss = SelfLabelingLoss(5, batch * steps, queue_size=queue_size, samples_per_image=samples)
    labels = ContrastiveLabels(queue_size)
    image_label = torch.arange(batch * steps) % 5
    for step in range(steps):
        ids = torch.arange(step * batch, (step + 1) * batch)
        features = F.one_hot(ids, batch * steps).float()[:, :, None, None].expand(-1, -1, 2, 3)
        pointer = int(loss.queue_ptr)
        loss(features)
        labels.push(image_label[ids][:, None, None].expand(-1, 2, 3), samples, pointer)
    assert int(loss.queue_len) == queue_size
    torch.testing.assert_close(labels.labels, image_label[loss.feature_queue.argmax(1)])


def test_the_label_queue_takes_the_first_samples_in_raster_order_as_officially():
    labels = ContrastiveLabels(6)
    label_map = torch.arange(2 * 12).view(2, 3, 4)
    labels.push(label_map, 3, pointer=4)  # rows 4, 5, 0 for image 0, rows 1, 2, 3 for image 1
    assert labels.labels.tolist() == [2, 12, 13, 14, 0, 1]


# ----------------------------------------------------------------------------- discriminator


def test_the_discriminator_is_the_official_fcdiscriminator():
    torch.manual_seed(0)
    ours, official = FCDiscriminator(19), OfficialFCDiscriminator(inplanes=19)
    assert [(name, tuple(p.shape)) for name, p in ours.named_parameters()] == \
        [(name, tuple(p.shape)) for name, p in official.named_parameters()]
    official.load_state_dict(ours.state_dict())  # the official names, strictly
    probabilities = torch.randn(2, 19, 64, 96).softmax(1)
    scores = ours(probabilities)
    assert scores.shape == (2, 1, 4, 6)  # stride 16, one score per location
    torch.testing.assert_close(scores, official(probabilities.clone()))

"""The plug-in example (examples/plugin): a DAFormer-style self-training loop, with and without CPSL."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "plugin"))

from self_training import EMATeacher, classmix, confidence_weight, self_train, warm_model  # noqa: E402
from demo_setup import IGNORE_INDEX, evaluate, load_demo_data  # noqa: E402


def test_classmix_pastes_images_and_labels_with_the_same_mask_of_half_the_source_classes():
    generator = torch.Generator().manual_seed(0)
    source_labels = torch.tensor([0, 1, 2, 3, IGNORE_INDEX]).repeat_interleave(4).view(1, 4, 5).repeat(2, 1, 1)
    source_labels[1, :, :] = 5  # one class: it is pasted ((1 + 1) // 2 of 1)
    source, target = torch.rand(2, 3, 4, 5, generator=generator), torch.rand(2, 3, 4, 5, generator=generator)
    target_labels = torch.full((2, 4, 5), 7)
    mixed, mixed_labels, pasted = classmix(source, source_labels, target, target_labels, generator)
    assert torch.equal(mixed, torch.where(pasted[:, None], source, target))
    assert torch.equal(mixed_labels, torch.where(pasted, source_labels, target_labels))
    assert len(source_labels[0][pasted[0]].unique()) == 2  # half of the four classes, whole classes
    assert not pasted[0][source_labels[0] == IGNORE_INDEX].any()  # the ignore label is no class
    assert pasted[1].all()


def test_confidence_weight_is_the_share_of_pixels_above_the_threshold():
    max_probabilities = torch.tensor([[[0.99, 0.5], [0.97, 0.968]]])
    assert confidence_weight(max_probabilities, 0.968).item() == pytest.approx(0.5)
    assert confidence_weight(max_probabilities, 0.1).item() == 1.0


def test_ema_teacher_follows_the_student():
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    teacher = EMATeacher(student, momentum=0.75)
    before = teacher.network[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(4.0)
    student[1].num_batches_tracked.fill_(3)
    teacher.update(student)
    torch.testing.assert_close(teacher.network[0].weight, before + 1.0)
    assert int(teacher.network[1].num_batches_tracked) == 3
    assert not any(p.requires_grad for p in teacher.network.parameters())


# The shortened demo: for each of seeds 0-2 (the first three, as in this test before), a 150-iteration
# source-only warm-up, then 60 iterations of each loop from it, with the same crops and ClassMix masks;
# one thread (the thread count changes the numerics). Measured on the CPU (target-val mIoU, source-only
# -> loop alone / loop with CPSL): seed 0 35.49 -> 31.48 / 35.31, seed 1 45.89 -> 51.71 / 52.40, seed 2
# 45.42 -> 43.00 / 44.15: CPSL's edge +3.83, +0.69, +1.15. Seeds 3-7 gave +3.22, +1.15, +1.59, +0.23 and
# +0.72 (mean of the eight +1.57). From the same warm-ups, 100 iterations gave +6.22, -0.34, +2.65, +3.95,
# +1.60, +0.93, +1.34, +0.60 (seeds 0-7), and twice the learning rate +4.13, -0.10, +1.01, +2.00 (seeds
# 0-3). So one seed's edge can fall a little below zero, while the mean over seeds 0-2 was +1.68 or more
# in each setting: the test asserts a mean edge of at least 0.5 and no seed behind by 1 or more.
# Before the loop's learning rate decayed (DAFormer's linear schedule), the last student was one noisy
# SGD iterate and the edges of seeds 0-2 were +0.15, +4.08 and -5.43 (examples/plugin/README.md): this
# test would have failed there. A single seed's loop alone can end below its warm-up (seeds 0 and 2),
# so sanity is only that no model collapses. A planted bug (the prototype posterior shifted by one class
# before rectification) failed it: edges +8.95, -4.95, -9.62, the last run 12 below its warm-up.
SEEDS, WARMUP_ITERATIONS, ITERATIONS = (0, 1, 2), 150, 60


@pytest.mark.slow
def test_cpsl_gains_over_the_loop_alone_across_seeds_in_the_shortened_demo(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_demo_data(tmp_path / "demo_data")
        scores = {}
        for seed in SEEDS:
            warm = warm_model(data, WARMUP_ITERATIONS, seed)
            scores[seed] = {
                "source_only": evaluate(warm, data),
                "baseline": evaluate(self_train(copy.deepcopy(warm), data, ITERATIONS, seed), data),
                "with_cpsl": evaluate(self_train(copy.deepcopy(warm), data, ITERATIONS, seed, cpsl=True), data),
            }
    finally:
        torch.set_num_threads(threads)
    print(scores)
    for score in scores.values():
        assert score["source_only"] >= 25.0, scores  # the warm-ups learnt the source (27.8 to 45.9 measured)
        assert min(score["baseline"], score["with_cpsl"]) >= score["source_only"] - 10.0, scores
    edges = [score["with_cpsl"] - score["baseline"] for score in scores.values()]
    assert sum(edges) / len(edges) >= 0.5, (edges, scores)
    assert min(edges) > -1.0, (edges, scores)

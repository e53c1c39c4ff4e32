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


# The shortened demo: a 150-iteration warm-up, then 60 iterations of each loop. Measured on the CPU
# (target-val mIoU, source-only -> loop alone / loop with CPSL): seed 0 with two threads (this test)
# 34.53 -> 42.51 / 49.12; seed 0 with one thread 35.49 -> 43.45 / 43.60; seeds 1 and 2 with one thread
# 45.89 -> 47.19 / 51.27 and 45.42 -> 47.99 / 42.56. CPSL's edge over the loop alone ranges from -5.4
# to +6.6 mIoU with the seed and even the thread count, so this test claims none: it checks that the
# loop alone adapts (it did by +1.3 to +8.0) and that the loop with CPSL stays sane (its worst run was
# 2.9 below the source-only model), with headroom for other platforms' numerics.
# Attempts to make a gain hold (one thread; examples/plugin/README.md, "Looking for a gain that holds"):
# DAFormer's weight from the rectified labels' confidence gave 42.50 and 48.50 (seeds 0, 1; loop alone
# 43.45, 47.19), with self-labeling on the teacher's maps as CPSL does 43.78 and 47.52. From a 400-iteration
# warm-up, CPSL's edge after 60 loop iterations was +6.9, +1.0, -1.0 and -0.05 (seeds 0-3), after 100
# +7.4, -2.6, +1.3 and -0.5 (the EMA teachers' edge after 60: +0.6, +0.3, -0.3, +0.1): no margin held
# for every seed, so none is asserted.
WARMUP_ITERATIONS, ITERATIONS = 150, 60


@pytest.mark.slow
def test_both_self_training_loops_run_from_one_warm_up_and_stay_sane(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = load_demo_data(tmp_path / "demo_data")
        warm = warm_model(data, WARMUP_ITERATIONS, seed=0)
        source_only = evaluate(warm, data)
        baseline = evaluate(self_train(copy.deepcopy(warm), data, ITERATIONS, seed=0), data)
        with_cpsl = evaluate(self_train(copy.deepcopy(warm), data, ITERATIONS, seed=0, cpsl=True), data)
    finally:
        torch.set_num_threads(threads)
    scores = {"source_only": source_only, "baseline": baseline, "with_cpsl": with_cpsl}
    print(scores)
    assert source_only >= 25.0, scores  # the warm-up learnt the source (34.5 to 45.9 measured)
    assert baseline >= source_only, scores
    assert with_cpsl >= source_only - 6.0, scores

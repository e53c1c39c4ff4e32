"""The ops with a process group (gloo, spawned CPU processes) equal the single-process ops on
the concatenation of all ranks' inputs, with uneven, empty and all-ignored shards, and bad values
on one rank make every rank raise the same error instead of hanging."""

import datetime
import multiprocessing
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cpsl_ops
from cpsl_ops.distributed import active_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

K, D, IGNORE = 5, 6, 255
# Rows of each rank; zeros are ranks without any sample.
SHARDS = {2: [7, 0], 3: [4, 0, 9]}
# A rank whose rows all carry ignore_index: a shard with pixels but no valid label.
ALL_IGNORED_RANK = {3: 0}
SINKHORN_DTYPES = (torch.float32, torch.float64)
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # a hang in a collective fails the test instead
JOIN_TIMEOUT_S = 120


def split(tensor: torch.Tensor, world_size: int, dim: int = 0) -> List[torch.Tensor]:
    return list(torch.split(tensor, SHARDS[world_size], dim=dim))


def make_inputs(world_size: int) -> Dict[str, torch.Tensor]:
    """Global inputs, the same in the parent and in every worker."""
    generator = torch.Generator().manual_seed(world_size)
    total = sum(SHARDS[world_size])
    labels = torch.randint(0, K, (total,), generator=generator)
    labels[torch.rand(total, generator=generator) < 0.3] = IGNORE
    if world_size in ALL_IGNORED_RANK:
        split(labels, world_size)[ALL_IGNORED_RANK[world_size]].fill_(IGNORE)  # a view: writes into labels
    return {
        "scores": torch.randn(total, K, generator=generator, dtype=torch.float64),
        "batched_scores": torch.randn(3, total, K, generator=generator, dtype=torch.float64),
        "prior": torch.rand(K, generator=generator) + 0.2,
        "batched_prior": torch.rand(3, K, generator=generator, dtype=torch.float64) + 0.2,
        "prototypes": torch.randn(K, D, generator=generator),
        "features": torch.randn(total, D, generator=generator),
        "labels": labels,
        # SelfLabelingLoss: one image per rank of 2x2 pixels, twice (the second call uses the queue).
        "image_features": torch.randn(2, world_size, D, 2, 2, generator=generator),
    }


def sinkhorn_cases(inputs: Dict[str, torch.Tensor], dtype: torch.dtype):
    """(name, global scores, prior, epsilon, num_iters, sample dim) of the Sinkhorn checks."""
    return [
        ("sinkhorn", inputs["scores"].to(dtype), inputs["prior"], 0.05, 4, 0),
        ("sinkhorn_batched", inputs["batched_scores"].to(dtype), inputs["batched_prior"], 0.1, 3, 1),
        ("sinkhorn_no_problem", inputs["batched_scores"][:0].to(dtype), inputs["batched_prior"][:0], 0.1, 3, 1),
    ]


def raised_by(call: Callable[[], object]) -> Optional[str]:
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def worker(rank: int, world_size: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        group = dist.group.WORLD
        inputs = make_inputs(world_size)
        features, labels = split(inputs["features"], world_size)[rank], split(inputs["labels"], world_size)[rank]
        out: Dict[str, object] = {}
        for dtype in SINKHORN_DTYPES:
            for name, scores, prior, epsilon, num_iters, dim in sinkhorn_cases(inputs, dtype):
                out[name, dtype] = cpsl_ops.balanced_sinkhorn(
                    split(scores, world_size, dim)[rank], prior, epsilon, num_iters, process_group=group)
        prototypes = inputs["prototypes"].clone()
        out["counts"] = cpsl_ops.update_prototypes_(prototypes, features, labels, 0.9, process_group=group)
        out["prototypes"] = prototypes.clone()
        out["distribution"] = cpsl_ops.class_distribution(labels, K, process_group=group)

        criterion = cpsl_ops.SelfLabelingLoss(K, D, inputs["prior"], queue_size=4, samples_per_image=4,
                                              process_group=group)
        criterion.init_prototypes(inputs["prototypes"])
        out["loss_without_queue"] = criterion(inputs["image_features"][0, rank:rank + 1])
        out["loss_with_queue"] = criterion(inputs["image_features"][1, rank:rank + 1])

        # Bad values on the last rank only (no sample at all for the third call): every rank must
        # raise, and none may hang or leave the group out of step.
        scores = split(inputs["scores"].float(), world_size)[rank]
        nan_scores, zero_prior, bad_features, bad_labels = scores, inputs["prior"].clone(), features, labels
        nan_features, nan_feature_labels = features, labels
        # Finite and narrow on every rank, but one class spread over the ranks so widely that
        # (S - max)/ε overflows fp32, which the single-process op raises on.
        spread_scores = scores.clone()
        spread_scores[:, 2] = 1e37
        if rank == world_size - 1:
            spread_scores = torch.cat([scores, torch.full((1, K), -1e37)])
            nan_scores = torch.cat([scores, torch.full((1, K), float("nan"))])
            zero_prior[1] = 0.0
            bad_features, bad_labels = torch.cat([features, torch.randn(1, D)]), torch.cat([labels, torch.tensor([K])])
            nan_features = torch.cat([features, torch.full((1, D), float("nan"))])
            nan_feature_labels = torch.cat([labels, torch.tensor([0])])
        out["raised"] = [
            raised_by(lambda: cpsl_ops.balanced_sinkhorn(nan_scores, inputs["prior"], process_group=group)),
            raised_by(lambda: cpsl_ops.balanced_sinkhorn(scores, zero_prior, process_group=group)),
            raised_by(lambda: cpsl_ops.balanced_sinkhorn(scores[:0], inputs["prior"], process_group=group)),
            raised_by(lambda: cpsl_ops.balanced_sinkhorn(spread_scores, inputs["prior"], process_group=group)),
            raised_by(lambda: cpsl_ops.update_prototypes_(prototypes, bad_features, bad_labels, process_group=group)),
            raised_by(lambda: cpsl_ops.class_distribution(bad_labels, K, process_group=group)),
            raised_by(lambda: cpsl_ops.update_prototypes_(prototypes, nan_features, nan_feature_labels,
                                                          process_group=group)),
        ]
        out["prototypes_after_bad_labels"] = prototypes
        out["distribution_after_errors"] = cpsl_ops.class_distribution(labels, K, process_group=group)
        torch.save(out, f"{directory}/rank{rank}.pt")
    except Exception:
        Path(f"{directory}/rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_workers(world_size: int, directory: Path) -> List[Dict[str, object]]:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker, args=(rank, world_size, str(directory))) for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [process for process in processes if process.is_alive()]
    for process in hung:
        process.kill()
        process.join()
    errors = "\n".join(path.read_text() for path in sorted(directory.glob("*.error")))
    assert not hung, f"{len(hung)} ranks hung\n{errors}"
    assert all(process.exitcode == 0 for process in processes), errors
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def expected_self_labeling_losses(inputs: Dict[str, torch.Tensor], world_size: int) -> List[List[float]]:
    """Each rank's loss when its samples are balanced together with all ranks' (queue included),
    written without SelfLabelingLoss. Sampling order does not matter: Sinkhorn is equivariant to
    row permutations and the loss is a mean over rows."""
    prototypes = F.normalize(inputs["prototypes"], dim=1)
    features = F.normalize(inputs["image_features"].flatten(3).transpose(2, 3), dim=-1)  # (2, W, 4, D)
    cosines = features @ prototypes.T  # (2, W, 4, K)
    log_probabilities = (cosines / 0.08).log_softmax(-1)
    first = cpsl_ops.balanced_sinkhorn(cosines[0].reshape(-1, K), inputs["prior"]).view(world_size, 4, K)
    # Second call: each rank's problem is its queue (its first image) and its new image.
    second = cpsl_ops.balanced_sinkhorn(cosines.transpose(0, 1).reshape(-1, K), inputs["prior"])
    second = second.view(world_size, 2, 4, K)[:, 1]
    return [
        [float(-(first[rank] * log_probabilities[0, rank]).sum(-1).mean()),
         float(-(second[rank] * log_probabilities[1, rank]).sum(-1).mean())]
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ops_with_a_process_group_equal_the_single_process_ops_on_the_gathered_input(world_size, tmp_path):
    results = run_workers(world_size, tmp_path)
    inputs = make_inputs(world_size)
    prototypes = inputs["prototypes"].clone()
    counts = cpsl_ops.update_prototypes_(prototypes, inputs["features"], inputs["labels"], 0.9)
    distribution = cpsl_ops.class_distribution(inputs["labels"], K)
    losses = expected_self_labeling_losses(inputs, world_size)
    for dtype in SINKHORN_DTYPES:
        for name, scores, prior, epsilon, num_iters, dim in sinkhorn_cases(inputs, dtype):
            expected = split(cpsl_ops.balanced_sinkhorn(scores, prior, epsilon, num_iters), world_size, dim)
            for rank, result in enumerate(results):
                assert result[name, dtype].dtype == dtype
                torch.testing.assert_close(result[name, dtype], expected[rank], **TOLERANCES[dtype])
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["prototypes"], prototypes, rtol=1e-5, atol=1e-6)
        assert torch.equal(result["counts"], counts)
        torch.testing.assert_close(result["distribution"], distribution)
        assert result["loss_without_queue"].item() == pytest.approx(losses[rank][0], rel=1e-5)
        assert result["loss_with_queue"].item() == pytest.approx(losses[rank][1], rel=1e-5)
        # Every rank raised, for each bad call, the same error as rank 0, and wrote nothing.
        assert None not in result["raised"], result["raised"]
        assert result["raised"] == results[0]["raised"]
        assert torch.equal(result["prototypes_after_bad_labels"], result["prototypes"])
        torch.testing.assert_close(result["distribution_after_errors"], distribution)
    nan_scores, zero_prior, no_sample, spread, bad_update, bad_histogram, nan_update = results[0]["raised"]
    assert "some rank" in nan_scores and "some rank" in zero_prior and "some rank" in bad_update
    assert "outside" in bad_update and "NaN or infinite feature" in nan_update
    assert "spread so widely" in spread
    with pytest.raises(ValueError, match="spread so widely"):  # what the single-process op says
        cpsl_ops.balanced_sinkhorn(torch.tensor([[0.5, 0.5, 1e37, 0.5, 0.5], [-1e37] * K]), inputs["prior"])
    assert "no rank" in no_sample and "some rank" in bad_histogram


def fail_if_called(*args, **kwargs):
    raise AssertionError("a collective was issued on the single-process path")


def test_one_rank_or_no_group_is_the_single_process_path(tmp_path, monkeypatch):
    assert active_group(None) is None  # torch.distributed not initialized in this process
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        assert active_group(group) is None
        for collective in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
            monkeypatch.setattr(dist, collective, fail_if_called)
        inputs = make_inputs(2)
        scores, prior = inputs["batched_scores"], inputs["batched_prior"]
        assert torch.equal(cpsl_ops.balanced_sinkhorn(scores, prior, process_group=group),
                           cpsl_ops.balanced_sinkhorn(scores, prior))
        with pytest.raises(ValueError, match="N samples"):  # a lone process still needs samples
            cpsl_ops.balanced_sinkhorn(scores[:, :0], prior, process_group=group)
        updated = [inputs["prototypes"].clone() for _ in range(2)]
        counts = [cpsl_ops.update_prototypes_(prototypes, inputs["features"], inputs["labels"], 0.9,
                                              process_group=process_group)
                  for prototypes, process_group in zip(updated, (group, None))]
        assert torch.equal(updated[0], updated[1]) and torch.equal(counts[0], counts[1])
        assert torch.equal(cpsl_ops.class_distribution(inputs["labels"], K, process_group=group),
                           cpsl_ops.class_distribution(inputs["labels"], K))

        losses = []
        for process_group in (group, None):
            criterion = cpsl_ops.SelfLabelingLoss(K, D, inputs["prior"], queue_size=4, samples_per_image=3,
                                                  process_group=process_group)
            criterion.init_prototypes(inputs["prototypes"])
            assert criterion.process_group is process_group
            assert not any("process_group" in key for key in criterion.state_dict())
            torch.manual_seed(0)  # the same pixels are sampled in both runs
            losses.append([criterion(inputs["image_features"][step]) for step in range(2)])
        assert torch.equal(torch.stack(losses[0]), torch.stack(losses[1]))
    finally:
        dist.destroy_process_group()

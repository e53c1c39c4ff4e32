"""The ops with a process group (gloo, spawned CPU processes) equal the single-process ops on
the concatenation of all ranks' inputs, with uneven and empty shards, and bad values on one rank
make every rank raise instead of hanging."""

import datetime
import multiprocessing
import traceback
from pathlib import Path
from typing import Dict, List

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


def split(tensor: torch.Tensor, sizes: List[int], dim: int = 0) -> List[torch.Tensor]:
    return list(torch.split(tensor, sizes, dim=dim))


def make_inputs(world_size: int) -> Dict[str, torch.Tensor]:
    """Global inputs, the same in the parent and in every worker."""
    generator = torch.Generator().manual_seed(world_size)
    total = sum(SHARDS[world_size])
    labels = torch.randint(0, K, (total,), generator=generator)
    labels[torch.rand(total, generator=generator) < 0.3] = IGNORE
    return {
        "scores": torch.randn(total, K, generator=generator),
        "batched_scores": torch.randn(3, total, K, generator=generator, dtype=torch.float64),
        "prior": torch.rand(K, generator=generator) + 0.2,
        "batched_prior": torch.rand(3, K, generator=generator, dtype=torch.float64) + 0.2,
        "prototypes": torch.randn(K, D, generator=generator),
        "features": torch.randn(total, D, generator=generator),
        "labels": labels,
        # SelfLabelingLoss: one image per rank of 2x2 pixels, twice (the second call uses the queue).
        "image_features": torch.randn(2, world_size, D, 2, 2, generator=generator),
    }


def worker(rank: int, world_size: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails instead of blocking
    try:
        group = dist.group.WORLD
        inputs = make_inputs(world_size)
        mine = SHARDS[world_size]
        out: Dict[str, object] = {}
        out["sinkhorn"] = cpsl_ops.balanced_sinkhorn(
            split(inputs["scores"], mine)[rank], inputs["prior"], 0.05, 4, process_group=group)
        out["sinkhorn_batched"] = cpsl_ops.balanced_sinkhorn(
            split(inputs["batched_scores"], mine, dim=1)[rank], inputs["batched_prior"], 0.1, 3, process_group=group)
        prototypes = inputs["prototypes"].clone()
        out["counts"] = cpsl_ops.update_prototypes_(
            prototypes, split(inputs["features"], mine)[rank], split(inputs["labels"], mine)[rank], 0.9,
            process_group=group)
        out["prototypes"] = prototypes
        out["distribution"] = cpsl_ops.class_distribution(split(inputs["labels"], mine)[rank], K, process_group=group)

        criterion = cpsl_ops.SelfLabelingLoss(K, D, inputs["prior"], queue_size=4, samples_per_image=4,
                                              process_group=group)
        criterion.init_prototypes(inputs["prototypes"])
        out["loss_without_queue"] = criterion(inputs["image_features"][0, rank:rank + 1])
        out["loss_with_queue"] = criterion(inputs["image_features"][1, rank:rank + 1])

        # Bad values on one rank only: every rank must raise, none may hang.
        scores = split(inputs["scores"], mine)[rank].clone()
        labels = split(inputs["labels"], mine)[rank].clone()
        if rank == world_size - 1:
            scores = torch.cat([scores, torch.full((1, K), float("nan"))])
            labels = torch.cat([labels, torch.tensor([K])])
        raised = []
        for call in (
            lambda: cpsl_ops.balanced_sinkhorn(scores, inputs["prior"], process_group=group),
            lambda: cpsl_ops.update_prototypes_(prototypes, torch.randn(labels.numel(), D), labels, process_group=group),
            lambda: cpsl_ops.class_distribution(labels, K, process_group=group),
        ):
            try:
                call()
            except ValueError as error:
                raised.append(str(error))
        out["raised"] = raised
        out["prototypes_after_bad_labels"] = prototypes
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
    for process in processes:
        process.join(timeout=180)
    hung = [process for process in processes if process.is_alive()]
    for process in hung:
        process.kill()
    errors = "\n".join(path.read_text() for path in sorted(directory.glob("*.error")))
    assert not hung, f"{len(hung)} ranks hung\n{errors}"
    assert all(process.exitcode == 0 for process in processes), errors
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def expected_self_labeling_losses(inputs: Dict[str, torch.Tensor], world_size: int) -> List[List[float]]:
    """Each rank's loss when its samples are balanced together with all ranks' (queue included)."""
    prototypes = F.normalize(inputs["prototypes"], dim=1)
    features = F.normalize(inputs["image_features"].flatten(3).transpose(2, 3), dim=-1)  # (2, W, 4, D)
    cosines = features @ prototypes.T  # (2, W, 4, K)
    log_probabilities = (cosines / 0.08).log_softmax(-1)
    losses = []
    first = cpsl_ops.balanced_sinkhorn(cosines[0].reshape(-1, K), inputs["prior"]).view(world_size, 4, K)
    # Second call: each rank's problem is its queue (its first image) and its new image.
    second = cpsl_ops.balanced_sinkhorn(cosines.transpose(0, 1).reshape(-1, K), inputs["prior"]).view(world_size, 2, 4, K)
    for rank in range(world_size):
        losses.append([
            float(-(first[rank] * log_probabilities[0, rank]).sum(-1).mean()),
            float(-(second[rank, 1] * log_probabilities[1, rank]).sum(-1).mean()),
        ])
    return losses


@pytest.mark.parametrize("world_size", [2, 3])
def test_ops_with_a_process_group_equal_the_single_process_ops_on_the_gathered_input(world_size, tmp_path):
    results = run_workers(world_size, tmp_path)
    inputs = make_inputs(world_size)
    sizes = SHARDS[world_size]
    sinkhorn = cpsl_ops.balanced_sinkhorn(inputs["scores"], inputs["prior"], 0.05, 4)
    batched = cpsl_ops.balanced_sinkhorn(inputs["batched_scores"], inputs["batched_prior"], 0.1, 3)
    prototypes = inputs["prototypes"].clone()
    counts = cpsl_ops.update_prototypes_(prototypes, inputs["features"], inputs["labels"], 0.9)
    distribution = cpsl_ops.class_distribution(inputs["labels"], K)
    losses = expected_self_labeling_losses(inputs, world_size)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["sinkhorn"], split(sinkhorn, sizes)[rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["sinkhorn_batched"], split(batched, sizes, dim=1)[rank], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["prototypes"], prototypes, rtol=1e-5, atol=1e-6)
        assert torch.equal(result["counts"], counts)
        torch.testing.assert_close(result["distribution"], distribution)
        assert result["loss_without_queue"].item() == pytest.approx(losses[rank][0], rel=1e-5)
        assert result["loss_with_queue"].item() == pytest.approx(losses[rank][1], rel=1e-5)
        assert len(result["raised"]) == 3, result["raised"]  # every rank, for each of the three ops
        assert "some rank" in result["raised"][0] and "some rank" in result["raised"][1]
        assert torch.equal(result["prototypes_after_bad_labels"], result["prototypes"])  # nothing written


def test_one_rank_or_no_group_is_the_single_process_path(tmp_path):
    assert active_group(None) is None  # torch.distributed not initialized in this process
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert active_group(dist.group.WORLD) is None
        scores, prior = torch.randn(50, K), torch.rand(K) + 0.1
        assert torch.equal(cpsl_ops.balanced_sinkhorn(scores, prior, process_group=dist.group.WORLD),
                           cpsl_ops.balanced_sinkhorn(scores, prior))
        with pytest.raises(ValueError, match="N samples"):  # a lone process still needs samples
            cpsl_ops.balanced_sinkhorn(scores[:0], prior, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()

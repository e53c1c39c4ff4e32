"""The example trainer under ``torchrun`` (CPU, gloo): two ranks train like one process."""

import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist

import cpsl_ops
import cpsl_ops.nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.cli import main  # noqa: E402
from cpsl_trainer.config import load_config  # noqa: E402
from cpsl_trainer.demo_data import write_demo_datasets  # noqa: E402
from cpsl_trainer.distributed import Distributed  # noqa: E402
from cpsl_trainer.stage_cpsl import global_self_labeling  # noqa: E402
from cpsl_trainer.training import EpochBatches  # noqa: E402

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_cpsl.py"
DEMO_CONFIG = TRAIN_SCRIPT.parent / "configs" / "demo.yaml"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


@pytest.fixture
def one_thread():
    """Runs in this process on one thread, as the spawned ranks do (so that they round alike),
    and gives the later tests their threads back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ranks_split_each_global_batch_and_together_see_the_single_process_batches():
    single = iter(EpochBatches(10, 4, seed=3, start_batch=1))
    ranks = [iter(EpochBatches(10, 2, seed=3, start_batch=1, rank=r, world_size=2)) for r in range(2)]
    for _ in range(7):  # across epoch boundaries
        assert next(single) == next(ranks[0]) + next(ranks[1])


def test_the_global_batch_is_shared_evenly_or_refused():
    ranks = [Distributed(rank, 4, rank, None) for rank in range(4)]
    assert [r.share(8) for r in ranks] == [2] * 4 and [r.rows(2) for r in ranks][3] == slice(6, 8)
    with pytest.raises(ValueError, match="multiple of the 4 processes, got 6"):
        ranks[0].share(6)


# ----------------------------------------------------------------------------- one memory bank

GLOBAL_BATCH, FEAT_DIM, CLASSES, STEPS = 4, 8, 5, 4


def self_labeling_run(context: Distributed) -> Dict[str, Any]:
    """STEPS CPSL self-labeling steps on this rank's share of fixed global batches, recording every
    Sinkhorn problem the loss solves (scores, prior) and its targets."""
    torch.manual_seed(0)
    feats = torch.randn(STEPS, GLOBAL_BATCH, FEAT_DIM, 5, 6)
    logits = torch.randn(STEPS, GLOBAL_BATCH, CLASSES, 5, 6)
    criterion = cpsl_ops.SelfLabelingLoss(CLASSES, FEAT_DIM, torch.rand(CLASSES) + 0.2, queue_size=40,
                                          samples_per_image=10)
    criterion.init_prototypes(torch.randn(CLASSES, FEAT_DIM))
    problems = []
    solve = cpsl_ops.nn.balanced_sinkhorn

    def recording(scores, prior, *args, **kwargs):
        targets = solve(scores, prior, *args, **kwargs)
        problems.append((scores.clone(), prior.clone(), targets.clone()))
        return targets

    cpsl_ops.nn.balanced_sinkhorn = recording
    losses, gradients = [], []
    rows = context.rows(context.share(GLOBAL_BATCH))
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 + step)
        loss = global_self_labeling(criterion, feats[step, rows], logits[step, rows], generator, context)
        criterion.prototypes.grad = None
        loss.backward()
        losses.append(loss.detach())
        gradients.append(criterion.prototypes.grad.clone())
    cpsl_ops.nn.balanced_sinkhorn = solve
    return {"problems": problems, "losses": losses, "gradients": gradients, "state": criterion.state_dict()}


def self_labeling_worker(rank: int, world_size: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(self_labeling_run(Distributed(rank, world_size, 0, dist.group.WORLD)), f"{directory}/rank{rank}.pt")
    except Exception:
        Path(f"{directory}/rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_four_ranks_solve_the_sinkhorn_problems_of_one_process_with_one_memory_bank(tmp_path, one_thread):
    world_size = 4
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=self_labeling_worker, args=(rank, world_size, str(tmp_path)))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    errors = "\n".join(path.read_text() for path in sorted(tmp_path.glob("*.error")))
    assert all(process.exitcode == 0 for process in processes), errors
    single = self_labeling_run(Distributed())
    # Two branches (features, logits) per step; the queue is full and used from the second step.
    assert len(single["problems"]) == 2 * STEPS and single["problems"][-1][0].shape == (GLOBAL_BATCH, 40 + 10, CLASSES)
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(result["problems"]) == len(single["problems"])
        for (scores, prior, targets), (scores_1, prior_1, targets_1) in zip(result["problems"], single["problems"]):
            assert torch.equal(scores, scores_1) and torch.equal(prior, prior_1) and torch.equal(targets, targets_1)
        for name in ("losses", "gradients"):
            for value, expected in zip(result[name], single[name]):
                assert torch.equal(value, expected), name
        for key, value in single["state"].items():  # one memory bank: the same queues everywhere
            assert torch.equal(result["state"][key], value), key


# ----------------------------------------------------------------------------- the trainer under torchrun


def run_config(tmp_path: Path, name: str, *extra: str) -> Path:
    gta5, cityscapes = write_demo_datasets(tmp_path / "data", (32, 64), 8, 6, 4, seed=1, progress=False)
    overrides = [
        f"data.source_root={gta5}", f"data.target_root={cityscapes}", f"train.output_dir={tmp_path / name}",
        "data.source_size=[32, 64]", "data.target_size=[32, 64]", "data.crop_size=[32, 64]",
        "data.batch_size=4", "model.dropout=0.0", "warmup.iterations=4", "cpsl.iterations=3",
        # The demo's short-schedule rate would leave this tiny teacher with no confident pixel on
        # one rank, where the per-rank means (below) differ from one process by half.
        "cpsl.optim.lr=0.005",
        "cpsl.queue_size=64", "cpsl.samples_per_image=16", "distill.stages=1", "distill.iterations=2",
        "distill.student_init=teacher", "train.progress=false", "train.log_every=1", "train.checkpoint_every=2",
        "eval.save_images=0", *extra,
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text(load_config(DEMO_CONFIG, overrides).to_yaml())
    return path


def logged(output: Path, stage: str, key: str):
    lines = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if line["stage"] == stage]


def compare_curves(expected_run: Path, actual_run: Path, curves: Dict[str, Any], rtol: float = 5e-3) -> None:
    for stage, keys in curves.items():
        for key in keys:
            expected, actual = logged(expected_run, stage, key), logged(actual_run, stage, key)
            assert len(actual) == len(expected) > 0
            torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=rtol, atol=1e-4,
                                       msg=lambda text: f"{stage} {key}: {text}")


def torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    environment.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(TRAIN_SCRIPT), "--config", str(config), *extra]
    # A hung collective fails the test instead of blocking CI.
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def test_torchrun_with_two_ranks_trains_like_one_process_on_the_global_batch(tmp_path, one_thread):
    # The official warm-up (adversarial): the discriminator is a DDP replica too.
    single = run_config(tmp_path, "single", "warmup.adversarial=true")
    assert main(["--config", str(single)]) == 0
    distributed = run_config(tmp_path, "ddp", "warmup.adversarial=true")
    result = torchrun(distributed)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("== warmup: target val IoU") == 1  # rank 0 alone evaluates and logs

    # Same data, crops and initial weights, BatchNorm over the global batch and averaged
    # gradients: the warm-up's loss curves are those of one process, to float reduction order.
    compare_curves(tmp_path / "single", tmp_path / "ddp", {"warmup": ("loss_source", "loss_adv", "loss_D")})
    # From the same warm-up weights (a tiny network a few steps from random amplifies rounding
    # differences), also the same strong views, CutMix boxes, pixel draws and one memory bank.
    adopted = run_config(tmp_path, "adopted", f"warmup.weights={tmp_path / 'ddp' / 'checkpoints' / 'warmup.pt'}")
    assert main(["--config", str(adopted)]) == 0
    compare_curves(tmp_path / "adopted", tmp_path / "ddp", {
        "cpsl": ("loss_source", "loss_seg", "loss_consist", "loss_SL", "pseudo_conf"),
        "distill1": ("loss_source", "loss_kd")})
    # Each rank averages its pixel losses over its own pixels (docs/trainer.rst): where the confident
    # pseudo-labelled pixels split unevenly between the ranks (170 and 147 once), the mean of the
    # two means departs from the pixel-weighted mean of one process by about 0.7 %.
    compare_curves(tmp_path / "adopted", tmp_path / "ddp", {"distill1": ("loss_pseudo",)}, rtol=2e-2)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["warmup", "cpsl", "distill1"]
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert checkpoint["world_size"] == 2


def test_a_killed_torchrun_job_resumes_exactly_like_an_uninterrupted_one(tmp_path):
    straight = run_config(tmp_path, "straight")
    assert torchrun(straight).returncode == 0
    killed = run_config(tmp_path, "killed")
    stopped = torchrun(killed, "train.stop_after=cpsl:2")
    assert stopped.returncode == 0 and "stopped after cpsl iteration 2" in stopped.stdout, stopped.stderr[-3000:]
    resumed = torchrun(killed, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "distill1.pt")
    actual = torch.load(tmp_path / "killed" / "checkpoints" / "distill1.pt")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    with pytest.raises(ValueError, match="written by 2 processes"):
        main(["--config", str(killed), "--resume", "auto"])

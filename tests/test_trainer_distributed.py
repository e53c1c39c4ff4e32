"""The example trainer under ``torchrun`` (CPU, gloo): two ranks train like one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cpsl_trainer.cli import main  # noqa: E402
from cpsl_trainer.config import load_config  # noqa: E402
from cpsl_trainer.demo_data import write_demo_datasets  # noqa: E402
from cpsl_trainer.training import EpochBatches  # noqa: E402

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_cpsl.py"
DEMO_CONFIG = TRAIN_SCRIPT.parent / "configs" / "demo.yaml"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def test_ranks_split_each_global_batch_and_together_see_the_single_process_batches():
    single = iter(EpochBatches(10, 4, seed=3, start_batch=1))
    ranks = [iter(EpochBatches(10, 2, seed=3, start_batch=1, rank=r, world_size=2)) for r in range(2)]
    for _ in range(7):  # across epoch boundaries
        assert next(single) == next(ranks[0]) + next(ranks[1])


def run_config(tmp_path: Path, name: str, batch_size: int) -> Path:
    gta5, cityscapes = write_demo_datasets(tmp_path / "data", (32, 64), 8, 6, 4, seed=1, progress=False)
    overrides = [
        f"data.source_root={gta5}", f"data.target_root={cityscapes}", f"train.output_dir={tmp_path / name}",
        "data.source_size=[32, 64]", "data.target_size=[32, 64]", "data.crop_size=[32, 64]",
        f"data.batch_size={batch_size}", "model.dropout=0.0", "warmup.iterations=4", "cpsl.iterations=3",
        "cpsl.queue_size=64", "cpsl.samples_per_image=16", "distill.stages=1", "distill.iterations=2",
        "distill.student_init=teacher", "train.progress=false", "train.log_every=1", "train.checkpoint_every=2",
        "eval.save_images=0",
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text(load_config(DEMO_CONFIG, overrides).to_yaml())
    return path


def logged(output: Path, stage: str, key: str):
    lines = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if line["stage"] == stage]


def torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    environment.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(TRAIN_SCRIPT), "--config", str(config), *extra]
    # A hung collective fails the test instead of blocking CI.
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def test_torchrun_with_two_ranks_trains_like_one_process_on_the_global_batch(tmp_path):
    torch.set_num_threads(1)
    single = run_config(tmp_path, "single", batch_size=4)
    assert main(["--config", str(single)]) == 0
    distributed = run_config(tmp_path, "ddp", batch_size=2)
    result = torchrun(distributed)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("== warmup: target val IoU") == 1  # rank 0 alone evaluates and logs

    # Warm-up: same data, crops and initial weights, BatchNorm over the global batch and
    # averaged gradients: the loss curve of one process, to float reduction order.
    expected, actual = logged(tmp_path / "single", "warmup", "loss_source"), logged(tmp_path / "ddp", "warmup", "loss_source")
    assert len(actual) == 4
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=2e-3, atol=1e-4)
    # CPSL and distillation draw pixels and strong views per rank: they run and stay finite.
    for stage in ("cpsl", "distill1"):
        assert all(value == value for value in logged(tmp_path / "ddp", stage, "loss_source"))
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["warmup", "cpsl", "distill1"]
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rank_modules"]) == 2


def test_a_killed_torchrun_job_resumes_exactly_like_an_uninterrupted_one(tmp_path):
    straight = run_config(tmp_path, "straight", batch_size=2)
    assert torchrun(straight).returncode == 0
    killed = run_config(tmp_path, "killed", batch_size=2)
    stopped = torchrun(killed, "train.stop_after=cpsl:2")
    assert stopped.returncode == 0 and "stopped after cpsl iteration 2" in stopped.stdout, stopped.stderr[-3000:]
    resumed = torchrun(killed, "--resume", "auto")  # each rank gets its own queue back
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "distill1.pt")
    actual = torch.load(tmp_path / "killed" / "checkpoints" / "distill1.pt")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    with pytest.raises(ValueError, match="written by 2 processes"):
        main(["--config", str(killed), "--resume", "auto"])

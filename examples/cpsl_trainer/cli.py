"""Command line of the example trainer: ``train`` (the default), ``evaluate``, ``export`` and
``prepare``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from .config import Config, load_config
from .config_check import check_config
from .context import RunContext
from .data import prepare_main
from .demo_data import write_demo_datasets
from .distributed import Distributed
from .engine import Pipeline
from .evaluation import Evaluator
from .model import DeepLabV2, load_weights, save_official_checkpoint
from .training import StopRequested, choose_device, protocol_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

USAGE = """\
train (default):  train_cpsl.py [--demo | --config FILE] [--resume PATH|auto] [section.field=value ...]
  on N devices:   torchrun --nproc-per-node=N train_cpsl.py [same arguments]
evaluate weights: train_cpsl.py evaluate (--demo | --config FILE) --weights PATH [section.field=value ...]
export weights:   train_cpsl.py export --config FILE --weights PATH --output FILE   (the official checkpoint format)
check datasets:   train_cpsl.py prepare --gta5 DIR --cityscapes DIR [--synthia DIR]
"""


def export_main(argv: List[str]) -> int:
    """Writes a weights file of this trainer in the official checkpoint format, for the official
    code (its test.py, or a stage started from it)."""
    parser = argparse.ArgumentParser(prog="train_cpsl.py export", description=export_main.__doc__)
    parser.add_argument("--config", type=Path, required=True,
                        help="the run's YAML config: its model must be a ResNet-101 in the official layout")
    parser.add_argument("--weights", type=Path, required=True, help="e.g. OUTPUT_DIR/checkpoints/cpsl_best.pt")
    parser.add_argument("--output", type=Path, required=True, help="the official checkpoint to write")
    parser.add_argument("overrides", nargs="*", help="config overrides such as model.layout=official")
    args = parser.parse_intermixed_args(argv)
    config = check_config(load_config(args.config, args.overrides), training=False)
    model_config, num_classes = config.model, protocol_of(config.data.protocol).num_classes
    model = load_weights(args.weights, lambda bn_pretrain: DeepLabV2.from_config(model_config, num_classes,
                                                                                  bn_pretrain=bn_pretrain),
                         num_classes, (model_config.backbone, model_config.layout))
    save_official_checkpoint(model, args.output)
    print(f"{args.weights} written in the official format to {args.output}")
    return 0


def train_main(argv: Optional[List[str]] = None, evaluate_only: bool = False) -> int:
    parser = argparse.ArgumentParser(
        prog="train_cpsl.py", usage=USAGE,
        description="CPSL (class-balanced pixel-level self-labeling) domain-adaptive segmentation on cpsl_ops.",
    )
    parser.add_argument("--config", type=Path, help="YAML config (see examples/configs/)")
    parser.add_argument("--demo", action="store_true",
                        help="generate synthetic GTA5/Cityscapes-format data and run the whole pipeline on the CPU")
    if evaluate_only:
        parser.add_argument("--weights", type=Path, required=True,
                            help="model weights, e.g. OUTPUT_DIR/checkpoints/cpsl.pt, or an official CPSL checkpoint")
    else:
        parser.add_argument("--resume", help="a checkpoint to continue from, or 'auto' for OUTPUT_DIR/checkpoints/last.pt "
                                             "where it exists (a fresh start where it does not)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as cpsl.iterations=2000")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.demo and args.config:
        parser.error("--demo uses examples/configs/demo.yaml; pass overrides instead of --config")
    if not args.demo and not args.config:
        parser.error("pass --config FILE (real datasets) or --demo (synthetic data)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Checked before anything is written or read; the Pipeline checks the final config again.
    config = check_config(load_config(CONFIGS / "demo.yaml" if args.demo else args.config, args.overrides),
                          training=not evaluate_only)
    if evaluate_only:
        config = with_demo_data(config) if args.demo else config
        run = RunContext(config, training=False)
        model = load_weights(args.weights, lambda bn_pretrain: run.new_model(None, bn_pretrain), run.protocol.num_classes)
        Evaluator(run).evaluate(model.to(run.device), args.weights.stem)
        return 0
    resume = None
    if args.resume == "auto":  # a preemptible job passes it every time, its first start included
        resume = Path(config.train.output_dir) / "checkpoints" / "last.pt"
        if not resume.exists():
            print(f"--resume auto: no {resume} yet, starting from the beginning")
            resume = None
    elif args.resume:
        resume = Path(args.resume)
        if not resume.exists():
            parser.error(f"--resume: {resume} does not exist")
    context = Distributed.from_environment(choose_device(config.train.device).type)
    try:
        if args.demo:
            if context.is_main:  # the other ranks wait, then find the finished tree
                with_demo_data(config)
            context.barrier()
            config = with_demo_data(config)
        Pipeline(config, context=context).run(resume)
    except StopRequested as stop:
        if context.is_main:
            print(f"{stop}; continue with --resume auto")
    finally:
        context.close()
    return 0


def with_demo_data(config: Config) -> Config:
    """Writes (or reuses) the demo datasets under the output folder and points the config at them."""
    demo_root = Path(config.train.output_dir) / "demo_data"
    gta5, cityscapes = write_demo_datasets(demo_root, tuple(config.data.source_size), progress=config.train.progress)
    return load_config(None, [f"data.source_root={gta5}", f"data.target_root={cityscapes}"], base=config)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prepare":
        return prepare_main(argv[1:])
    if argv and argv[0] == "evaluate":
        return train_main(argv[1:], evaluate_only=True)
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    return train_main(argv[1:] if argv and argv[0] == "train" else argv)

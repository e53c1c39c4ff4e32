"""The training pipeline: warm-up, pseudo labels, CPSL self-labeling, distillation, evaluation.

Every stage is a loop of iterations whose randomness (data order, augmentation, dropout, pixel
sampling) is a function of the seed, the stage, the iteration number and the rank, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.

Under torchrun each rank trains a DistributedDataParallel replica on its share of every global
batch of ``data.batch_size`` images; the data order, crops, strong views, CutMix boxes and
self-labeling pixels are drawn for the global batch, and the self-labeling loss is solved on the
gathered global batch with one memory bank, so none of them depends on the number of ranks.
Rank 0 alone writes pseudo labels, evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from .checkpoints import Checkpoints
from .config import Config, stage_iterations
from .context import RunContext
from .distributed import Distributed
from .evaluation import Evaluator
from .files import OutputLock
from .loop import CheckpointHook, EvaluationHook, LogHook, TrainLoop
from .pseudo_labels import PseudoLabelMaker
from .recipe import departures, recipe_table
from .stage import Stage
from .stage_cpsl import CPSLStage
from .stage_distill import DistillStage
from .stage_warmup import warmup_stage
from .training import iteration_seed, parse_stop_after, SELECTION_NOTES


class Pipeline:
    """One training run: the context, checkpoints, evaluator and pseudo labels it is built from,
    its stages in order, and the one loop that runs them with logging, evaluation and checkpoint
    hooks; resumes where asked."""

    def __init__(self, config: Config, stop_after: Optional[Tuple[str, int]] = None,
                 context: Optional[Distributed] = None, training: bool = True) -> None:
        self.context = run = RunContext(config, context, training)
        self.config = run.config
        self.checkpoints = Checkpoints(run.config, run.dist, run.output)
        self.evaluator = Evaluator(run)
        self.pseudo_labels = PseudoLabelMaker(run)
        self.departures = departures(run.config)
        stop = stop_after or parse_stop_after(run.config.train.stop_after)
        self.loop = TrainLoop(run, self.checkpoints, [
            LogHook(run), EvaluationHook(run, self.evaluator, self.checkpoints), CheckpointHook(run, self.checkpoints, stop)])

    def stages(self) -> List[Tuple[str, Callable[[], Stage]]]:
        """(name, builder) of each stage in order; a stage is built when it starts, from the weights
        its predecessor selected."""
        run, selected = self.context, self.checkpoints.selected_weights
        plan: List[Tuple[str, Callable[[], Stage]]] = [
            ("warmup", lambda: warmup_stage(run)),
            ("cpsl", lambda: CPSLStage(run, selected("warmup"), self.pseudo_labels))]
        names = list(stage_iterations(self.config))
        for number, (previous, name) in enumerate(zip(names[1:], names[2:]), start=1):
            plan.append((name, lambda n=number, p=previous: DistillStage(run, n, p, selected(p), self.pseudo_labels)))
        return plan

    def run(self, resume: Optional[Path] = None) -> Dict[str, Any]:
        """Runs every stage not completed yet, from ``resume`` if given; the main rank holds the
        output folder's lock throughout (a second run on the folder is refused)."""
        with OutputLock(self.context.output) if self.context.dist.is_main else nullcontext():
            return self._run(resume)

    def _run(self, resume: Optional[Path]) -> Dict[str, Any]:
        run = self.context
        if resume is not None:
            self.checkpoints.load(resume)
        if run.dist.is_main:
            (run.output / "config.yaml").write_text(self.config.to_yaml())
        run.log(run.describe())
        run.log(recipe_table(self.departures))
        for name, build in self.stages():
            if name in self.checkpoints.state["completed"]:
                continue
            torch.manual_seed(iteration_seed(self.config.train.seed, name, -1))  # initial weights, alike on all ranks
            self.loop.run(build())
        return self.write_metrics() if run.dist.is_main else {}

    def write_metrics(self) -> Dict[str, Any]:
        stages = self.checkpoints.state["metrics"]
        final = list(stages)[-1]
        metrics = {"source_only": stages["warmup"], "adapted": stages[final], "adapted_stage": final,
                   "mIoU_gain": round(stages[final]["mIoU"] - stages["warmup"]["mIoU"], 2),
                   "selection": SELECTION_NOTES[self.config.eval.select], "recipe_departures": self.departures,
                   "stages": stages}
        path = self.context.output / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2))
        tqdm.write(f"source-only mIoU {stages['warmup']['mIoU']:.2f} → adapted ({final}) mIoU "
                   f"{stages[final]['mIoU']:.2f} (gain {metrics['mIoU_gain']:+.2f}); metrics written to {path}")
        return metrics

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

from .config import stage_iterations
from .evaluation import Evaluation
from .recipe import departures, recipe_table
from .files import OutputLock
from .stage_cpsl import CPSLStage
from .stage_distill import DistillStage
from .stage_warmup import WarmupStage
from .training import iteration_seed, SELECTION_NOTES, StopRequested


class Pipeline(WarmupStage, CPSLStage, DistillStage, Evaluation):
    """One training run: builds the data and models and runs the stages, resuming where asked.

    The stages live in their own modules (stage_warmup, pseudo_labels, stage_cpsl, stage_distill,
    evaluation) over the shared context of context.py; this class orders and resumes them."""

    def stages(self) -> List[Tuple[str, Callable[[], None]]]:
        names = list(stage_iterations(self.config))
        plan = [("warmup", self.warmup), ("cpsl", self.cpsl)]
        for number, (previous, name) in enumerate(zip(names[1:], names[2:]), start=1):
            plan.append((name, lambda n=number, p=previous: self.distill(n, p)))
        return plan

    def run(self, resume: Optional[Path] = None) -> Dict[str, Any]:
        """Runs every stage not completed yet, from ``resume`` if given; the main rank holds the
        output folder's lock throughout (a second run on the folder is refused)."""
        with OutputLock(self.output) if self.dist.is_main else nullcontext():
            return self._run(resume)

    def _run(self, resume: Optional[Path]) -> Dict[str, Any]:
        if resume is not None:
            self.load_checkpoint(resume)
        if self.dist.is_main:
            (self.output / "config.yaml").write_text(self.config.to_yaml())
        self.log(self.describe())
        self.log(recipe_table(departures(self.config)))
        for name, stage in self.stages():
            if name in self.state["completed"]:
                continue
            torch.manual_seed(iteration_seed(self.config.train.seed, name, -1))  # initial weights, alike on all ranks
            stage()
            if self.dist.is_main:
                self.state["metrics"][name] = self.select(name)
            self.dist.barrier()
            self.state["completed"] = self.state["completed"] + [name]
            self.save_checkpoint(name, 0, {})
            if self.stop_after == (name, stage_iterations(self.config)[name]):
                raise StopRequested(f"stopped after stage {name}")
        return self.write_metrics() if self.dist.is_main else {}

    def write_metrics(self) -> Dict[str, Any]:
        stages = self.state["metrics"]
        final = list(stages)[-1]
        metrics = {"source_only": stages["warmup"], "adapted": stages[final], "adapted_stage": final,
                   "mIoU_gain": round(stages[final]["mIoU"] - stages["warmup"]["mIoU"], 2),
                   "selection": SELECTION_NOTES[self.config.eval.select], "recipe_departures": departures(self.config),
                   "stages": stages}
        path = self.output / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2))
        tqdm.write(f"source-only mIoU {stages['warmup']['mIoU']:.2f} → adapted ({final}) mIoU "
                   f"{stages[final]['mIoU']:.2f} (gain {metrics['mIoU_gain']:+.2f}); metrics written to {path}")
        return metrics

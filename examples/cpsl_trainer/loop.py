"""The one training loop every stage runs, and its hooks: logging, evaluation with best-keeping,
checkpoints.

Each iteration's randomness is a function of the seed, the stage, the iteration number and the
rank, so a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from .checkpoints import Checkpoints
from .context import RunContext
from .evaluation import Evaluator
from .stage import Stage
from .training import iteration_seed, peak_memory_mb, StopRequested


class Hook:
    """Work the loop does around a stage's iterations."""

    def before_stage(self, stage: Stage, start: int) -> None:
        """The stage starts (or resumes) at iteration ``start``."""

    def after_iteration(self, stage: Stage, done: int, values: Dict[str, float]) -> None:
        """``done`` iterations of the stage are complete; ``values`` are the last step's logs."""

    def after_stage(self, stage: Stage) -> None:
        """The stage's last weights are saved (``Checkpoints.stage_weights``)."""


class TrainLoop:
    """Runs a stage from where the checkpoints say, then hands its end to the hooks in order."""

    def __init__(self, context: RunContext, checkpoints: Checkpoints, hooks: Sequence[Hook]) -> None:
        self.context, self.checkpoints, self.hooks = context, checkpoints, list(hooks)

    def run(self, stage: Stage) -> None:
        """Runs iterations start..end-1 of ``stage``: torch's global generator (dropout) is seeded
        per rank, and the step's ``generator``, for what is drawn for the global batch (crops,
        strong views, CutMix, pixel draws), alike on every rank."""
        context, train = self.context, self.context.config.train
        start = self.checkpoints.resume_modules(stage.name, stage.modules)
        stage.start(start)
        for hook in self.hooks:
            hook.before_stage(stage, start)
        bar = tqdm(range(start, stage.iterations), desc=stage.name, initial=start, total=stage.iterations,
                   disable=not (train.progress and context.dist.is_main), dynamic_ncols=True)
        for iteration in bar:
            torch.manual_seed(iteration_seed(train.seed, stage.name, iteration, context.dist.rank))
            shared = torch.Generator().manual_seed(iteration_seed(train.seed + 1, stage.name, iteration))
            values = stage.step(iteration, shared)
            for hook in self.hooks:
                hook.after_iteration(stage, iteration + 1, values)
        bar.close()
        if context.dist.is_main:
            self.checkpoints.stage_weights(stage.name).parent.mkdir(parents=True, exist_ok=True)
            torch.save(stage.model.state_dict(), self.checkpoints.stage_weights(stage.name))
        context.dist.barrier()
        for hook in self.hooks:
            hook.after_stage(stage)


class LogHook(Hook):
    """Every ``train.log_every`` iterations and at the end: the mean of each logged value over
    those iterations and the ranks, printed, appended to ``log.jsonl`` and to TensorBoard."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.recent: List[Dict[str, float]] = []
        self.tick = time.perf_counter()

    def before_stage(self, stage: Stage, start: int) -> None:
        self.recent, self.tick = [], time.perf_counter()

    def after_iteration(self, stage: Stage, done: int, values: Dict[str, float]) -> None:
        context = self.context
        self.recent.append(values)
        if done % context.config.train.log_every and done != stage.iterations:
            return
        seconds = (time.perf_counter() - self.tick) / len(self.recent)
        means = context.dist.mean({k: sum(r[k] for r in self.recent) / len(self.recent) for k in self.recent[0]})
        text = " ".join(f"{k}={v:.4f}" for k, v in means.items())
        context.log(f"[{stage.name} {done}/{stage.iterations}] {text} {seconds:.2f}s/it "
                    f"peak_mem={peak_memory_mb(context.device):.0f}MB")
        if context.dist.is_main:
            with open(context.output / "log.jsonl", "a") as log:
                log.write(json.dumps({"stage": stage.name, "iteration": done, **means, "s_per_it": seconds}) + "\n")
        if context.writer is not None:
            for key, value in means.items():
                context.writer.add_scalar(f"{stage.name}/{key}", value, done)
        self.recent, self.tick = [], time.perf_counter()


class EvaluationHook(Hook):
    """Evaluates the stage's model every ``eval.every`` iterations and keeps its best weights; at
    the stage's end, evaluates the last weights and records the selected ones' metrics."""

    def __init__(self, context: RunContext, evaluator: Evaluator, checkpoints: Checkpoints) -> None:
        self.context, self.evaluator, self.checkpoints = context, evaluator, checkpoints

    def after_iteration(self, stage: Stage, done: int, values: Dict[str, float]) -> None:
        every = self.context.config.eval.every
        if not every or done % every or done == stage.iterations:
            return
        if self.context.dist.is_main:
            result = self.evaluator.evaluate(stage.model, f"{stage.name}-{done}", save_images=False,
                                             step=(stage.name, done))
            self.checkpoints.keep_if_best(stage.name, done, result, stage.model.state_dict())
        self.context.dist.barrier()

    def after_stage(self, stage: Stage) -> None:
        if self.context.dist.is_main:
            self.checkpoints.state["metrics"][stage.name] = self.select(stage)
        self.context.dist.barrier()

    def select(self, stage: Stage) -> Dict[str, Any]:
        """Main rank: evaluates the stage's last weights, keeps them if they are its best, and
        returns the metrics of the weights ``eval.select`` picks, with the selection."""
        name, end, checkpoints = stage.name, stage.iterations, self.checkpoints
        last = self.evaluator.evaluate(stage.model, name, step=(name, end))
        checkpoints.keep_if_best(name, end, last, stage.model.state_dict())
        best = checkpoints.state["best"][name]
        rule = self.context.config.eval.select
        chosen, iteration = (best["result"], best["iteration"]) if rule == "best" else (last, end)
        return {**chosen, "selection": {"rule": rule, "iteration": iteration, "last_mIoU": last["mIoU"],
                                        "best_mIoU": best["result"]["mIoU"], "best_iteration": best["iteration"]}}


class CheckpointHook(Hook):
    """Writes ``last.pt`` every ``train.checkpoint_every`` iterations, at a stage's end and at
    ``stop_after``, where it stops the run (:class:`StopRequested`); marks completed stages."""

    def __init__(self, context: RunContext, checkpoints: Checkpoints, stop_after: Optional[Tuple[str, int]]) -> None:
        self.context, self.checkpoints, self.stop_after = context, checkpoints, stop_after

    def after_iteration(self, stage: Stage, done: int, values: Dict[str, float]) -> None:
        stop = self.stop_after == (stage.name, done)
        if done % self.context.config.train.checkpoint_every == 0 or done == stage.iterations or stop:
            self.checkpoints.save(stage.name, done, stage.modules)
        if stop and done < stage.iterations:
            raise StopRequested(f"stopped after {stage.name} iteration {done}")

    def after_stage(self, stage: Stage) -> None:
        state = self.checkpoints.state
        state["completed"] = state["completed"] + [stage.name]
        self.checkpoints.save(stage.name, 0, {})
        if self.stop_after == (stage.name, stage.iterations):
            raise StopRequested(f"stopped after stage {stage.name}")

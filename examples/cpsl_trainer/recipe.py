"""The recipe check: what a run does differently from the official recipe (lslrh/CPSL).

The config's defaults are the official GTAV → Cityscapes values, so a departure is a recipe
setting that differs from its default (SYNTHIA's own image size and protocol aside), plus what no
single key says: where the warm-up and the distillation students start. The run prints the table
at its start and writes it to ``metrics.json``, so that a number is never read without it.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .checkpoints import RESUMABLE_CHANGES
from .config import Config, flat_settings, RANDOM_WEIGHTS, student_init, warmup_trained

# Where the data and weights are, and how the run is executed: not the recipe.
NOT_RECIPE = (*RESUMABLE_CHANGES, "data.source", "data.source_root", "data.target_root", "model.pretrained",
              "warmup.weights", "distill.pretrained", "train.seed", "train.device")
# The official SYNTHIA runs: its images at 1280x760, 16 classes trained.
SYNTHIA = {"data.source_size": [760, 1280], "data.protocol": "synthia16"}


def official_settings(config: Config) -> Dict[str, Any]:
    """The official value of every recipe setting, for the run's source dataset."""
    official = flat_settings(Config().to_dict())
    return {**official, **SYNTHIA} if config.data.source == "synthia" else official


def departures(config: Config) -> List[Dict[str, Any]]:
    """One row per departure from the official recipe: ``{"setting", "here", "official"}``."""
    official, here = official_settings(config), flat_settings(config.to_dict())
    ignored = set(NOT_RECIPE)
    if not warmup_trained(config):  # its settings do nothing
        ignored |= {key for key in here if key.startswith("warmup.")}
    elif not config.warmup.adversarial:
        ignored |= {"warmup.adversarial_weight", "warmup.discriminator_lr"}
    if config.data.source == "synthia":
        ignored.add("data.colour_transfer")  # GTA5 only
    if config.distill.stages == 0:
        ignored |= {key for key in here if key.startswith("distill.") and key != "distill.stages"}
    ignored |= {"warmup.adversarial", "distill.student_init"}  # the rows below say where the networks start
    rows = [{"setting": key, "here": value, "official": official[key]}
            for key, value in here.items() if key not in ignored and value != official.get(key)]
    return _origin_rows(config) + rows


def _origin_rows(config: Config) -> List[Dict[str, Any]]:
    """Where the networks start, against the official runs (a file named in distill.pretrained is
    taken for the SimCLRv2 weights)."""
    rows = []
    if warmup_trained(config) and not config.warmup.adversarial:
        rows.append({"setting": "warm-up", "here": "trained on the source only",
                     "official": "the released warm-up (41.4 mIoU), trained with an output-space adversarial loss"})
    if config.model.pretrained == RANDOM_WEIGHTS and warmup_trained(config):
        rows.append({"setting": "warm-up backbone", "here": "random weights", "official": "ImageNet weights"})
    source = config.distill.pretrained or config.model.pretrained
    fresh = "random weights" if source == RANDOM_WEIGHTS else (
        "SimCLRv2 r101_1x_sk0 weights" if config.distill.pretrained else f"model.pretrained ({source})")
    for number in range(1, config.distill.stages + 1):
        here = "its teacher's weights" if student_init(config, number) == "teacher" else fresh
        official = "SimCLRv2 r101_1x_sk0 weights" if number == 1 else "its teacher's weights"
        if here != official:
            rows.append({"setting": f"distill{number} student", "here": here, "official": official})
    return rows


def recipe_table(rows: List[Dict[str, Any]]) -> str:
    """The departures as the text table the run prints."""
    if not rows:
        return "recipe check: every setting follows the official recipe"
    width = max(len(row["setting"]) for row in rows)
    lines = [f"recipe check: {len(rows)} departure{'s' if len(rows) > 1 else ''} from the official recipe",
             f"  {'setting':<{width}}  here → official"]
    lines += [f"  {row['setting']:<{width}}  {row['here']!s} → {row['official']!s}" for row in rows]
    return "\n".join(lines)

"""The whole config checked before any work: types, ranges, choices, files and ``stop_after``.

A bad value would otherwise surface where it is first read, which for a distillation setting is
after a day of training. :func:`check_config` reports every bad key at once, one line each, and
returns the config with its numbers in their declared types (an int where a float is declared;
a float written ``1e-4``, which YAML 1.1 reads as text).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from .augment import CUTMIX_BOXES
from .config import (
    AMP_MODES, Config, DEVICES, DISTILL_KL_FORMS, EVAL_MODES, PROTOCOLS, RANDOM_WEIGHTS, SOURCES, stage_iterations,
    student_init, STUDENT_INITS, warmup_trained)
from .model import BACKBONES, GROUP_NORM_GROUPS, LAYOUTS
from .randaugment import setting_problems
from .training import parse_stop_after, SELECTION_NOTES


class ConfigError(ValueError):
    """A config with bad values; ``problems`` holds one line per bad key."""

    def __init__(self, problems: List[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} bad config value{'s' if len(problems) > 1 else ''} (nothing was run):\n  "
                         + "\n  ".join(problems))


def check_config(config: Config, training: bool = True) -> Config:
    """``config`` with its numbers in their declared types, or a ConfigError listing every bad key.
    For ``training``, also the weights files the run will read, and that no network would start
    from random weights unless the config asks for them by name (``"random"``)."""
    problems: List[str] = []
    config = _typed(config, "", problems)
    mistyped = {problem.partition("=")[0] for problem in problems}
    for key, rule in VALUE_RULES.items():  # each assumes its value's type
        problem = None if key in mistyped else rule(_get(config, key))
        if problem:
            problems.append(f"{key}={_get(config, key)!r}: {problem}")
    if not mistyped:  # as do the rules over several keys, which skip what reads a bad value
        problems += _cross_key_problems(config, {problem.partition("=")[0] for problem in problems}, training)
    if problems:
        raise ConfigError(problems)
    return config


# ----------------------------------------------------------------------------- types


def _typed(instance: Any, where: str, problems: List[str]) -> Any:
    """A copy of the dataclass ``instance`` with each field converted to its annotation; fields
    that do not fit are reported in ``problems`` and left as they are."""
    hints = typing.get_type_hints(type(instance))
    updates = {}
    for field in dataclasses.fields(instance):
        value, key = getattr(instance, field.name), where + field.name
        if dataclasses.is_dataclass(value):
            updates[field.name] = _typed(value, key + ".", problems)
            continue
        try:
            updates[field.name] = _convert(value, hints[field.name])
        except TypeError:
            problems.append(f"{key}={value!r}: must be {_describe(hints[field.name])}")
    return dataclasses.replace(instance, **updates)


def _convert(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (int, float, str, bool, List[...], Optional[...], Union[...]);
    TypeError when it is not one."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        for option in arguments:
            try:
                return _convert(value, option)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_convert(item, arguments[0]) for item in value]
    if annotation is type(None):
        if value is not None:
            raise TypeError
        return None
    if isinstance(value, bool) != (annotation is bool):  # True is an int to Python, never a meant count
        raise TypeError
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # "1e-4": YAML 1.1 reads exponents without a dot as text
        except ValueError:
            raise TypeError from None
    if annotation is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, annotation):
        raise TypeError
    return value


def _describe(annotation: Any) -> str:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join(_describe(option) for option in arguments)
    if origin is list:
        return f"a list of {_describe(arguments[0])}s"
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null"}
    return names[annotation]


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


# ----------------------------------------------------------------------------- values


Rule = Callable[[Any], Optional[str]]


def one_of(choices: Tuple[str, ...]) -> Rule:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def at_least(minimum: float, hint: str = "") -> Rule:
    return lambda value: None if value >= minimum else f"must be at least {minimum}{hint}"


def positive(value: float) -> Optional[str]:
    return None if 0 < value < math.inf else "must be a positive finite number"


def non_negative(value: float) -> Optional[str]:
    return None if 0 <= value < math.inf else "must be a finite number ≥ 0"


def unit_interval(value: float) -> Optional[str]:
    return None if 0 <= value <= 1 else "must lie in [0, 1]"


def below_one(value: float) -> Optional[str]:
    return None if 0 <= value < 1 else "must lie in [0, 1)"


def each(rule: Rule, length: Optional[int] = None) -> Rule:
    """``rule`` for every item of a list (of ``length`` items, where given; never empty)."""
    def check(values: List[Any]) -> Optional[str]:
        if length is not None and len(values) != length:
            return f"must hold {length} values"
        if not values:
            return "must not be empty"
        problems = [rule(value) for value in values]
        return next((f"every value {problem}" for problem in problems if problem), None)
    return check


def optional(rule: Rule) -> Rule:
    return lambda value: None if value is None else rule(value)


def device(value: str) -> Optional[str]:
    kind, _, index = value.partition(":")
    if kind not in DEVICES or (index and not (kind == "cuda" and index.isdigit())):
        return f"must be one of {', '.join(DEVICES)} or cuda:N"
    if kind == "cuda" and not torch.cuda.is_available():
        return "this torch sees no CUDA device (use auto or cpu)"
    return None


def optim_rules(section: str) -> Dict[str, Rule]:
    return {f"{section}.optim.lr": positive, f"{section}.optim.head_lr_mult": positive,
            f"{section}.optim.momentum": below_one, f"{section}.optim.weight_decay": non_negative,
            f"{section}.optim.poly_power": non_negative}


VALUE_RULES: Dict[str, Rule] = {
    "data.source": one_of(SOURCES),
    "data.source_size": each(at_least(1), 2),
    "data.target_size": each(at_least(1), 2),
    "data.crop_size": each(at_least(1), 2),
    "data.scale_range": lambda v: each(positive, 2)(v) or (None if v[0] <= v[1] else "must be [low, high] with low ≤ high"),
    "data.scale_long_side": optional(at_least(1)),
    "data.batch_size": at_least(1),
    "data.num_workers": at_least(0),
    "data.protocol": one_of(PROTOCOLS),
    "model.backbone": one_of(BACKBONES),
    "model.feat_dim": lambda v: None if v > 0 and v % GROUP_NORM_GROUPS == 0 else
                                f"must be a positive multiple of {GROUP_NORM_GROUPS} (the head's GroupNorm groups)",
    "model.dilations": each(at_least(1)),
    "model.dropout": below_one,
    "model.layout": one_of(LAYOUTS),
    **optim_rules("warmup"),
    "warmup.adversarial_weight": non_negative,
    "warmup.discriminator_lr": positive,
    **optim_rules("cpsl"),
    "cpsl.iterations": at_least(1),
    "cpsl.prototype_lr_mult": positive,
    "cpsl.ema_momentum": unit_interval,
    "cpsl.temperature": positive,
    "cpsl.epsilon": positive,
    "cpsl.sinkhorn_iters": at_least(1),
    "cpsl.queue_size": at_least(0),
    "cpsl.samples_per_image": at_least(1),
    "cpsl.rce_alpha": non_negative,
    "cpsl.rce_beta": non_negative,
    "cpsl.consistency_weight": non_negative,
    "cpsl.self_labeling_weight": non_negative,
    "cpsl.contrastive_weight": non_negative,
    "cpsl.rectify_threshold": unit_interval,
    "cpsl.cutmix_prob": unit_interval,
    "cpsl.cutmix_box": one_of(CUTMIX_BOXES),
    "cpsl.prototype_min_pixels": at_least(1),
    **optim_rules("distill"),
    "distill.stages": at_least(0),
    "distill.iterations": at_least(1),
    "distill.confidence": unit_interval,
    "distill.kd_weight": non_negative,
    "distill.kl": one_of(DISTILL_KL_FORMS),
    "distill.student_init": lambda v: each(one_of(STUDENT_INITS))([v] if isinstance(v, str) else v),
    "eval.every": at_least(0),
    "eval.select": one_of(tuple(SELECTION_NOTES)),
    "eval.mode": one_of(EVAL_MODES),
    "eval.window": each(at_least(1), 2),
    "eval.save_images": at_least(0),
    "train.output_dir": lambda v: None if v.strip() else "must name a folder",
    "train.seed": lambda v: None if 0 <= v < 2**32 else "must lie in [0, 2^32)",
    "train.device": device,
    "train.amp": one_of(AMP_MODES),
    "train.log_every": at_least(1),
    "train.checkpoint_every": at_least(1),
}


def _cross_key_problems(config: Config, bad: Set[str], training: bool) -> List[str]:
    """Rules over several keys, the strong view's and the files that the run will read."""
    problems = setting_problems(config.data.strong_ops, config.data.strong_magnitude, config.data.strong_jitter)
    if config.data.source == "synthia" and config.data.protocol == "cityscapes19":
        problems.append("data.protocol='cityscapes19' with data.source='synthia': SYNTHIA labels 16 of the 19 "
                        "classes, so 3 would be trained without a single example; use synthia16")
    if warmup_trained(config) and config.warmup.iterations < 1:
        problems.append(f"warmup.iterations={config.warmup.iterations!r}: must be at least 1 "
                        "(to skip the warm-up, set warmup.weights)")
    if config.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("train.tensorboard=True: the tensorboard package is not installed")
    for key, path in (_weights_read(config, bad) if training else {}).items():
        if path is None:
            problems.append(f"{key}=None: the network would start from random weights; name its weights file, or "
                            f"'{RANDOM_WEIGHTS}' to ask for random weights")
        elif path != RANDOM_WEIGHTS and not Path(path).is_file():
            problems.append(f"{key}={path!r}: no such file")
    problem = None if bad & set(ITERATION_KEYS) else _stop_after_problem(config)
    return problems + ([problem] if problem else [])


def _weights_read(config: Config, bad: Set[str]) -> Dict[str, Optional[str]]:
    """The weights each network of the run starts from, by the key that names them."""
    weights: Dict[str, Optional[str]] = {}
    if warmup_trained(config):
        weights["model.pretrained"] = config.model.pretrained
    else:
        weights["warmup.weights"] = config.warmup.weights
    students = [] if {"distill.stages", "distill.student_init"} & bad else range(1, config.distill.stages + 1)
    if any(student_init(config, number) == "pretrained" for number in students):
        key = "distill.pretrained" if config.distill.pretrained else "model.pretrained"
        weights[key] = _get(config, key)
    return weights


ITERATION_KEYS = ("warmup.iterations", "cpsl.iterations", "distill.stages", "distill.iterations")


def _stop_after_problem(config: Config) -> Optional[str]:
    text = config.train.stop_after
    if text is None:
        return None
    try:
        stage, iteration = parse_stop_after(text)
    except ValueError as error:
        return str(error)
    stages = stage_iterations(config)
    if stage not in stages:
        return f"train.stop_after={text!r}: this run's stages are {', '.join(stages)}"
    if not 1 <= iteration <= stages[stage]:
        length = "takes no iterations (warmup.weights replaces it)" if stages[stage] == 0 else \
            f"has iterations 1..{stages[stage]}"
        return f"train.stop_after={text!r}: stage {stage} {length}"
    return None

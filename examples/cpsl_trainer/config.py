"""The trainer's configuration: dataclasses with the paper's defaults, YAML files and overrides.

A run is described by one YAML file (any subset of the fields below) plus command-line overrides
``section.field=value`` whose values are parsed as YAML (``cpsl.iterations=2000``,
``data.crop_size=[512,896]``, ``model.pretrained=null``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import yaml

# The values each text setting accepts (what the modules that read them dispatch on).
SOURCES = ("gta5", "synthia")
PROTOCOLS = ("cityscapes19", "synthia16")
DISTILL_KL_FORMS = ("official", "proper")
STUDENT_INITS = ("pretrained", "teacher")
EVAL_MODES = ("whole", "slide")
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" too
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The value of model.pretrained or distill.pretrained that asks for random weights: a network
# starts from random weights only when a config says so by name.
RANDOM_WEIGHTS = "random"
AMP_MODES = ("none", *AMP_DTYPES)


@dataclass
class DataConfig:
    source: str = "gta5"  # SOURCES
    source_root: str = "data/GTA5"
    target_root: str = "data/cityscapes"
    # Images are resized to these (H, W) on loading, as in the official code.
    source_size: List[int] = field(default_factory=lambda: [1024, 2048])
    target_size: List[int] = field(default_factory=lambda: [1024, 2048])
    crop_size: List[int] = field(default_factory=lambda: [512, 896])
    # Weak augmentation: the crop is taken from the image rescaled so that its long side is
    # U(scale_range) x scale_long_side pixels (officially 2,200, whatever the dataset); null
    # rescales the loaded image by U(scale_range).
    scale_range: List[float] = field(default_factory=lambda: [0.5, 1.5])
    scale_long_side: Optional[int] = 2200
    # GTA5 only: match each source image's LAB channel statistics to a random target training
    # image, in every stage, as the official recipe does (colour.py).
    colour_transfer: bool = True
    # Images per step in all (officially 4: one per GPU); under torchrun each process takes an
    # equal share, so it must divide by the number of processes.
    batch_size: int = 4
    num_workers: int = 4
    # The strong view (randaugment.py): the official RandAugmentMC, strong_ops operations of
    # FixMatch's pool at levels 1..strong_magnitude-1, after a colour jitter of strong_jitter.
    strong_ops: int = 2
    strong_magnitude: int = 10
    strong_jitter: float = 0.4
    # 19 Cityscapes classes; SYNTHIA trains 16 and also reports the 13-class mIoU.
    protocol: str = "cityscapes19"  # PROTOCOLS


@dataclass
class ModelConfig:
    backbone: str = "resnet101"
    # A local ImageNet checkpoint of the backbone (never downloaded), e.g. resnet101-63fe2227.pth,
    # or "random" (RANDOM_WEIGHTS); a training run refuses null.
    pretrained: Optional[str] = None
    feat_dim: int = 256
    dilations: List[int] = field(default_factory=lambda: [6, 12, 18, 24])
    dropout: float = 0.1
    # "official": the official code's bottlenecks (stride on the first 1x1 conv), which its
    # checkpoints need; "torchvision": torchvision's. Same for resnet18/34 (model.py).
    layout: str = "official"
    # Recompute the backbone's activations in the backward pass instead of keeping them: less
    # memory per image (docs/trainer.rst, "Fewer or smaller GPUs"), one more backbone forward, same results.
    checkpoint_backbone: bool = False


@dataclass
class OptimConfig:
    lr: float = 2.5e-4
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 2e-4
    poly_power: float = 0.9
    # The official step: each backbone tensor updated as many times per iteration as the official
    # get_1x_lr_params lists it (3x in blocks, 4x in downsamples; optim.py), about three times the
    # nominal step. false: once, the step that lr says.
    official_step: bool = True


@dataclass
class WarmupConfig:
    """Stage 0: source training, source-only or with the official warm-up's adversarial loss."""

    iterations: int = 20000
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The official output-space LS-GAN, as the released warm-up was trained: FCDiscriminator
    # (Adam at discriminator_lr on the poly schedule) tells source from target softmax maps; the
    # network's target predictions learn to pass for source ones with adversarial_weight.
    adversarial: bool = False
    adversarial_weight: float = 0.01
    discriminator_lr: float = 1e-4
    # Skip the training: take these weights (an official warm-up checkpoint, or a weights file of
    # this trainer) as the warm-up model.
    weights: Optional[str] = None


@dataclass
class CPSLConfig:
    """Stage 1: class-balanced pixel-level self-labeling, with the paper's defaults."""

    iterations: int = 90000
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, head_lr_mult=5.0))
    prototype_lr_mult: float = 5.0
    ema_momentum: float = 0.999
    temperature: float = 0.08
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    queue_size: int = 65536
    samples_per_image: int = 256
    rce_alpha: float = 0.1
    rce_beta: float = 1.0
    consistency_weight: float = 5.0
    self_labeling_weight: float = 0.1
    # The official supervised-contrastive term (stage_cpsl.supervised_contrastive_loss): the student's
    # weak-view features against the self-labeling memory bank, labelled as officially (misaligned).
    contrastive_weight: float = 0.001
    rectify_threshold: float = 0.0
    cutmix_prob: float = 0.5
    # "official": half the crop's area exactly, aspect in [0.5, 2], inside the crop; "clipped":
    # a square around a uniform centre, clipped at the borders (augment.cutmix_box).
    cutmix_box: str = "official"
    # Prototype initialization: per image and class, the mean feature of classes with at least
    # this many predicted pixels.
    prototype_min_pixels: int = 10


@dataclass
class DistillConfig:
    """Stages 2 and 3: ProDA's self-distillation."""

    stages: int = 2
    iterations: int = 90000
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=6e-4, head_lr_mult=10.0))
    confidence: float = 0.95
    kd_weight: float = 1.0
    # "official": the official F.kl_div on probabilities, averaged over classes and pixels;
    # "proper": KL(teacher || student) on log-probabilities (stage_distill.distillation_kl).
    kl: str = "official"
    # How each distillation stage's student starts: "pretrained", a fresh network from
    # distill.pretrained; "teacher", the teacher's weights. One value for every stage, or a list
    # with one per stage; officially stage 2 starts from SimCLRv2 weights, stage 3 from stage 2.
    student_init: Union[str, List[str]] = field(default_factory=lambda: ["pretrained", "teacher"])
    # The students' initialization file (the official code: SimCLRv2 r101_1x_sk0 converted to
    # torchvision names), or "random"; null means model.pretrained.
    pretrained: Optional[str] = None
    # A BatchNorm on the students' backbone output, trained with the head (the official --bn_clr).
    bn_pretrain: bool = True


@dataclass
class EvalConfig:
    every: int = 1000  # iterations between evaluations inside a stage (0: only at stage ends)
    # "best": each stage hands on and reports its best evaluation on the target val set (the
    # official code's model selection, which the paper's figures use); "last": its last weights.
    select: str = "best"
    mode: str = "whole"  # EVAL_MODES
    window: List[int] = field(default_factory=lambda: [512, 1024])
    save_images: int = 8  # colour PNGs of predictions and pseudo labels written per evaluation


@dataclass
class TrainConfig:
    output_dir: str = "runs/cpsl"
    seed: int = 6523
    device: str = "auto"  # DEVICES, or cuda:N
    amp: str = "none"  # AMP_MODES
    log_every: int = 50
    checkpoint_every: int = 1000
    tensorboard: bool = False
    progress: bool = True
    # "stage:iteration" (e.g. "cpsl:500"): checkpoint there and stop; continue with --resume auto.
    # A stage's last iteration stops after the stage's end (its selection and checkpoint).
    stop_after: Optional[str] = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    cpsl: CPSLConfig = field(default_factory=CPSLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def warmup_trained(config: Config) -> bool:
    """Whether stage 0 trains a warm-up. ``warmup.weights`` replaces the training with given
    weights: then the warm-up's settings, and ``model.pretrained`` as its start, do nothing."""
    return not config.warmup.weights


def stage_iterations(config: Config) -> Dict[str, int]:
    """The stages a run goes through, in order, with their iterations (0 for a warm-up taken from
    ``warmup.weights``)."""
    stages = {"warmup": config.warmup.iterations if warmup_trained(config) else 0, "cpsl": config.cpsl.iterations}
    stages.update({f"distill{number}": config.distill.iterations for number in range(1, config.distill.stages + 1)})
    return stages


def flat_settings(values: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config dict (:meth:`Config.to_dict`) as ``{"section.field": value}``."""
    flat: Dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def student_init(config: Config, number: int) -> str:
    """How distillation stage ``number`` (1-based) starts its student: distill.student_init's
    value, or its entry for the stage (the last entry for stages past the list's end)."""
    choice = config.distill.student_init
    return choice if isinstance(choice, str) else choice[min(number, len(choice)) - 1]


def _merge(instance: Any, values: Dict[str, Any], where: str) -> Any:
    """A copy of the dataclass ``instance`` with ``values`` applied; unknown keys are errors."""
    names = {f.name: f for f in dataclasses.fields(instance)}
    updates = {}
    for key, value in values.items():
        if key not in names:
            raise KeyError(f"unknown config key {where}{key}; known: {', '.join(names)}")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"config section {where}{key} must be a mapping, got {value!r}")
            value = _merge(current, value, f"{where}{key}.")
        updates[key] = value
    return dataclasses.replace(instance, **updates)


def parse_override(text: str) -> Dict[str, Any]:
    """``"a.b.c=value"`` → ``{"a": {"b": {"c": value}}}`` with value parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value")
    path, raw = text.split("=", 1)
    value: Any = yaml.safe_load(raw)
    for key in reversed(path.strip().split(".")):
        value = {key: value}
    return value


def load_config(path: Optional[Path] = None, overrides: Sequence[str] = (), base: Optional[Config] = None) -> Config:
    """The default (or ``base``) config, updated by a YAML file, then by each override in turn."""
    config = base or Config()
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise TypeError(f"{path}: a config file must hold a mapping of sections")
        config = _merge(config, values, "")
    for override in overrides:
        config = _merge(config, parse_override(override), "")
    return config


def config_from_dict(values: Dict[str, Any]) -> Config:
    """Rebuilds a Config saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    return _merge(Config(), values, "")

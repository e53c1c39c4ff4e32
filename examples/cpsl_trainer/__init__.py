"""The example GTAV → Cityscapes (and SYNTHIA → Cityscapes) CPSL trainer built on cpsl_ops.

Modules: ``config`` (dataclasses and YAML with the paper's defaults), ``data`` (the on-disk
formats and ``prepare``), ``demo_data`` (synthetic scenes in those formats), ``colour`` (the
official GTA5 colour transfer), ``model`` (DeepLabV2 with CPSL's head) and ``official`` (the
official checkpoint format), ``augment`` (crops, CutMix, the warps teacher maps follow),
``randaugment`` (the official strong view), ``distributed`` (torchrun), ``labels`` and
``metrics``. The run: ``engine`` orders the stages, each its own module (``stage_warmup``,
``pseudo_labels``, ``stage_cpsl``, ``stage_distill``, ``evaluation``) over ``context`` (config,
data, models, logging, the training loop), ``checkpoints`` and ``training`` (seeded batches,
losses, schedules). ``cli`` is the command line of ``examples/train_cpsl.py``.
"""

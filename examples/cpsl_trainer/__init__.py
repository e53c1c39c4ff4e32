"""The example GTAV → Cityscapes (and SYNTHIA → Cityscapes) CPSL trainer built on cpsl_ops.

Modules: ``config`` (dataclasses and YAML with the paper's defaults), ``data`` (the on-disk
formats and ``prepare``), ``demo_data`` (synthetic scenes in those formats), ``model``
(DeepLabV2 with CPSL's head), ``augment`` (crops, strong views, CutMix), ``engine`` (the stages,
checkpoints and evaluation), ``distributed`` (torchrun), ``labels`` and ``metrics``; ``cli`` is
the command line of ``examples/train_cpsl.py``.
"""

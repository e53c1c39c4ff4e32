"""The example GTAV → Cityscapes (and SYNTHIA → Cityscapes) CPSL trainer built on cpsl_ops.

Work in progress: label tables, palette and metrics are here; data loading, the model, the
training stages and the demo follow.
"""

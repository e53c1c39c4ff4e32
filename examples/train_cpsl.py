"""CPSL domain-adaptive segmentation trainer (GTAV/SYNTHIA → Cityscapes) built on cpsl_ops.

    python examples/train_cpsl.py --demo
    python examples/train_cpsl.py --config examples/configs/gta5_to_cityscapes.yaml model.pretrained=PATH
    python examples/train_cpsl.py prepare --gta5 data/GTA5 --cityscapes data/cityscapes
"""

import sys

from cpsl_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())

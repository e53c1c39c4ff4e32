"""Memory per image and time per step of the trainer's network, with and without activation
checkpointing of the backbone (``model.checkpoint_backbone``), on the CPU.

Each configuration runs in a process of its own: the network (DeepLabV2 ResNet-101, official
layout, CPSL's head) in training mode, its gradients allocated, then one step (forward, the
source loss at crop size, backward) whose peak resident memory above what the process held before
it is the step's working memory: activations kept for the backward, and temporaries. A second
step is timed. Peak memory is read from /proc (VmHWM, reset through /proc/self/clear_refs), so
this runs on Linux only. The GPU's figures differ (cuDNN workspaces, the caching allocator): a
GPU run must confirm them with ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_trainer_memory.py [--crop 512 896] [--images 1 2] [--amp none bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def one_configuration(backbone: str, crop: List[int], images: int, checkpoint: bool, amp: str) -> Dict[str, Any]:
    """Runs in the child process: the step's peak working memory and a step's time."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(EXAMPLES))
    from cpsl_trainer.model import DeepLabV2

    torch.manual_seed(0)
    model = DeepLabV2(backbone, 19, layout="official", checkpoint_backbone=checkpoint).train()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    batch = torch.rand(images, 3, *crop)
    labels = torch.randint(0, 19, (images, *crop))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(batch)["out"]
        logits = F.interpolate(logits.float(), size=tuple(crop), mode="bilinear", align_corners=True)
        F.cross_entropy(logits, labels, ignore_index=255).backward()

    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()
    peak = status_kib("VmHWM")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"backbone": backbone, "crop": crop, "images": images, "checkpoint_backbone": checkpoint, "amp": amp,
            "step_memory_mib": round((peak - before) / 1024, 1), "step_s": round(seconds, 2),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 896])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_configuration(**json.loads(args.child))))
        return 0
    rows = []
    for amp in args.amp:
        for images in args.images:
            for checkpoint in (False, True):
                spec = {"backbone": args.backbone, "crop": args.crop, "images": images, "checkpoint": checkpoint,
                        "amp": amp}
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                row = rows[-1]
                print(f"{row['backbone']} {row['crop'][0]}x{row['crop'][1]} images={images} amp={amp} "
                      f"checkpoint_backbone={checkpoint}: step memory {row['step_memory_mib']:.0f} MiB, "
                      f"step {row['step_s']:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

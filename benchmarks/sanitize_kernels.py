"""Calls every CUDA kernel on small inputs, for compute-sanitizer (memcheck, racecheck, synccheck,
initcheck). The Sinkhorn problems span three chunks of rows and both launch paths run on a grid of
two blocks, so that blocks walk several chunks and every merge and barrier is exercised; the
narrow (K <= 256) and wide (K > 256) layouts both run.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py
"""

import os

import torch

import cpsl_ops


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    torch.manual_seed(0)
    device = torch.device("cuda")
    with cpsl_ops.use_backend("native"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            features = torch.randn(2, 32, 9, 13, device=device, dtype=dtype, requires_grad=True)
            prototypes = torch.randn(19, 32, device=device, dtype=dtype, requires_grad=True)
            logits = cpsl_ops.prototype_similarity(features, prototypes)
            logits.float().square().sum().backward()
            flat = torch.randn(37, 32, device=device, dtype=dtype, requires_grad=True)
            cpsl_ops.prototype_similarity(flat, prototypes).float().sum().backward()
            for launch in ("cooperative", "per_pass"):
                os.environ["CPSL_OPS_CUDA_SINKHORN_LAUNCH"] = launch
                os.environ["CPSL_OPS_CUDA_SINKHORN_MAX_BLOCKS"] = "2"
                for classes in (19, 64, 256, 300):
                    scores = torch.rand(2, 2500, classes, device=device, dtype=dtype)
                    cpsl_ops.balanced_sinkhorn(scores, None, 0.05, 3)
            labels = torch.randint(0, 19, (2, 9, 13), device=device)
            labels[:, 0] = 255
            cpsl_ops.update_prototypes_(prototypes.detach().clone(), features.detach(), labels, 0.9)
            cpsl_ops.rectify_pseudo_labels(logits.detach().float().softmax(1).to(dtype), logits.detach())
        try:
            cpsl_ops.update_prototypes_(torch.zeros(3, 4, device=device), torch.randn(5, 4, device=device),
                                        torch.tensor([0, 1, 7, 2, 255], device=device))
        except ValueError as error:
            print("bad label raised as expected:", error)
    torch.cuda.synchronize()
    print("all kernels ran")


if __name__ == "__main__":
    main()

"""Balanced Sinkhorn and the prototype update over a process group, checked against one process.

    torchrun --standalone --nproc-per-node=2 docs/examples/distributed_sinkhorn.py

Every rank holds its own pixels (here a different number per rank); with ``process_group=`` each
op returns what the single-process op returns on all ranks' pixels together.
"""

import sys

import torch
import torch.distributed as dist

import cpsl_ops

dist.init_process_group("gloo")  # "nccl" for CUDA tensors
rank, world = dist.get_rank(), dist.get_world_size()
group = dist.group.WORLD

# The same seed everywhere: every rank can build the whole problem and keep its own shard.
generator = torch.Generator().manual_seed(0)
K, D = 19, 32
sizes = [300 + 100 * r for r in range(world)]  # uneven shards
all_scores = torch.randn(sum(sizes), K, generator=generator)
all_features = torch.randn(sum(sizes), D, generator=generator)
all_labels = torch.randint(0, K, (sum(sizes),), generator=generator)
prior = torch.rand(K, generator=generator) + 0.1
start = sum(sizes[:rank])
mine = slice(start, start + sizes[rank])

assignment = cpsl_ops.balanced_sinkhorn(all_scores[mine], prior, process_group=group)
whole = cpsl_ops.balanced_sinkhorn(all_scores, prior)  # one process, all pixels
sinkhorn_ok = torch.allclose(assignment, whole[mine], atol=1e-5)

prototypes = torch.zeros(K, D)
counts = cpsl_ops.update_prototypes_(prototypes, all_features[mine], all_labels[mine], momentum=0.5,
                                     process_group=group)
expected = torch.zeros(K, D)
expected_counts = cpsl_ops.update_prototypes_(expected, all_features, all_labels, momentum=0.5)
update_ok = torch.equal(counts, expected_counts) and torch.allclose(prototypes, expected, atol=1e-6)

prior_ok = torch.allclose(cpsl_ops.class_distribution(all_labels[mine], K, process_group=group),
                          cpsl_ops.class_distribution(all_labels, K))

# One write of the whole line: print() writes the text and the newline separately, and two ranks'
# writes into one pipe could interleave between them.
sys.stdout.write(f"rank {rank}/{world}: sinkhorn {sinkhorn_ok}, prototypes {update_ok}, prior {prior_ok}\n")
sys.stdout.flush()
dist.destroy_process_group()

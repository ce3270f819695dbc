"""A tiny FLUX transformer, sequence-parallel over the processes of torchrun, checked against one process.

    torchrun --nproc_per_node=2 examples/flux_ulysses.py                       # ulysses = 2 (CPU is fine)
    torchrun --nproc_per_node=4 examples/flux_ulysses.py examples/usp4.toml    # ring = 2 x ulysses = 2

Random weights (seeded, so equal on every rank); on GPUs each process uses cuda:LOCAL_RANK.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import xdit_compile
from xdit_compile import models_registry

plan = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("ulysses2.toml")
if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
else:
    device = torch.device("cpu")

spec = models_registry.get("flux-tiny")
model = spec.build(seed=0, device=device)        # same seed on every rank -> same weights
inputs = spec.inputs(seed=0, device=device)      # 64x96 image: 24 image tokens + 7 text tokens

with torch.no_grad():
    reference = model(**inputs)[0]               # the plain model, one process's result

xdit_compile.parallelize(model, plan)            # in place: model.forward is now sequence-parallel
with torch.no_grad():
    out = model(**inputs)[0]                     # every rank computes a shard and gets the full output

rel = ((out - reference).norm() / reference.norm()).item()
assert rel < 1e-5, f"rank {dist.get_rank()}: parallel output differs from the reference (rel err {rel:.3e})"
report = xdit_compile.explain(model)             # shards, gathers, attention rewrites, bytes sent

xdit_compile.unparallelize(model)                # back to the original forward
with torch.no_grad():
    assert torch.equal(model(**inputs)[0], reference)

if dist.get_rank() == 0:
    print(report)
    print(f"OK: outputs match (rel err {rel:.2e}, {dist.get_world_size()} processes, {device.type})")
dist.barrier()
dist.destroy_process_group()

"""Cache acceleration at FLUX.1-dev size: ms per computed step, per skipped step, total at a forced skip rate.

    # 1 GPU and 4 GPUs (ulysses = number of processes), bf16, 1024x1024 (4096 image + 512 text tokens), 28 steps
    torchrun --nproc_per_node=1 benchmarks/cache_gpu.py --out benchmarks/results/cache_gpu_1.json
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc_per_node=4 benchmarks/cache_gpu.py \
        --out benchmarks/results/cache_gpu_4.json
    # CPU harness check (tiny Flux config, gloo): python benchmarks/cache_gpu.py --tiny --out /tmp/cache_gpu.json
    #   or torchrun --nproc_per_node=2 benchmarks/cache_gpu.py --tiny --out /tmp/cache_gpu.json

Model: diffusers FluxTransformer2DModel with the FLUX.1-dev config (19 double + 38 single blocks, 24 heads x 128,
joint_attention_dim 4096, pooled 768, in_channels 64, guidance_embeds), random weights built in bf16 on the
device with the same seed on every rank (checked by a checksum). Random weights make the cache's own
decisions meaningless, so every cached run uses a *forced* skip pattern (xdit_compile.cache_state(force=...)):
step 0 and the last step computed, the others skipped at --skip-rate (default 0.5, evenly spread). The decision
machinery still runs every step (statistics, all-reduce, torch.cond); only its outcome is fixed.

Rows: none (plan without cache), fbcache, teacache; plan [parallel] ulysses = world size, --lowering (default
inductor). Per row: warm-up (one full run, which also compiles; both branches run), then --repeat timed runs of
--steps steps, each step timed with CUDA events (perf_counter on CPU); ms per computed step and per skipped step
are medians over all timed steps of that kind (rank 0), total = median over runs of the sum of the steps.
Between steps the latent moves by an Euler step (x -= dt * v) as in a sampler, so inputs change every step.
Prints a markdown table on rank 0 and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=20, pooled_projection_dim=12, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))


def _init():
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def build(cfg, device, dtype):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)            # init directly in bf16 on the device: no fp32 copy of 12B weights
    try:
        with torch.device(device):
            m = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def checksum(m) -> float:
    s = torch.zeros((), dtype=torch.float64, device=next(m.parameters()).device)
    for i, p in enumerate(m.parameters()):
        s += p.double().sum() * ((i % 7) + 1)
    return s.item()


def inputs(cfg, h, w, txt, device, dtype):
    g = torch.Generator().manual_seed(1234)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    kw = dict(hidden_states=torch.randn(1, h * w, cfg["in_channels"], generator=g).to(device, dtype),
              encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=g).to(device, dtype),
              pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
              timestep=torch.full((1,), 1.0, device=device, dtype=dtype), img_ids=ids.reshape(h * w, 3).to(device),
              txt_ids=torch.zeros(txt, 3, device=device), guidance=torch.full((1,), 3.5, device=device, dtype=dtype),
              return_dict=False)
    return kw


def skip_pattern(steps: int, rate: float) -> list[bool]:
    """True = skip. Step 0 and the last step are computed; the rest skip at `rate`, evenly spread."""
    pat = [False] * steps
    inner = steps - 2
    for i in range(inner):
        pat[i + 1] = int((i + 1) * rate) > int(i * rate)
    return pat


class _Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, t0):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return (t0, e)
        return time.perf_counter() - t0

    def ms(self, rec):
        if self.cuda:
            return rec[0].elapsed_time(rec[1])
        return rec * 1000


def run_steps(model, base, steps, pattern, timer, cached):
    """One generation: Euler steps from t=1 to 0; returns per-step records (ms read later)."""
    import xdit_compile
    kw = dict(base)
    x = kw["hidden_states"].clone()
    recs = []
    ts = torch.linspace(1.0, 0.0, steps + 1)
    state = xdit_compile.cache_state(model, num_steps=steps, force=lambda i: "skip" if pattern[i] else "compute") \
        if cached else None
    if state is not None:
        state.__enter__()
    try:
        with torch.no_grad():
            for i in range(steps):
                kw["hidden_states"] = x
                kw["timestep"] = torch.full_like(base["timestep"], float(ts[i]))
                t0 = timer.start()
                v = model(**kw)[0]
                recs.append(timer.stop(t0))
                x = x + (float(ts[i + 1]) - float(ts[i])) * v
    finally:
        if state is not None:
            state.__exit__(None, None, None)
    if timer.cuda:
        torch.cuda.synchronize()
    return [timer.ms(r) for r in recs], (state.summary() if state is not None else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny Flux config, CPU-sized (harness check)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--skip-rate", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--lowering", default="inductor", choices=("eager", "inductor"))
    p.add_argument("--methods", default="none,fbcache,teacache")
    p.add_argument("--out", required=True, help="JSON output path")
    a = p.parse_args(argv)
    device = _init()
    rank, world = dist.get_rank(), dist.get_world_size()
    import xdit_compile

    cfg = FLUX_TINY if a.tiny else FLUX_DEV
    h = w = 8 if a.tiny else 64                         # 1024 px: 64 x 64 latent patches = 4096 tokens
    txt = 16 if a.tiny else 512
    dtype = torch.float32 if a.tiny and device.type == "cpu" else torch.bfloat16
    if a.tiny and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = build(cfg, device, dtype)
    sums = [None] * world
    dist.all_gather_object(sums, checksum(model))
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks built different weights: {sums}")
    base = inputs(cfg, h, w, txt, device, dtype)
    pattern = skip_pattern(a.steps, a.skip_rate)
    timer = _Timer(device)
    rows = []
    for method in a.methods.split(","):
        torch._dynamo.reset()
        plan = {"parallel": {"ulysses": world}, "compile": {"lowering": a.lowering},
                "cache": {"method": method, "threshold": 0.12}}
        xdit_compile.parallelize(model, plan)
        cached = method != "none"
        t0 = time.perf_counter()
        warm_steps = min(a.steps, 4)
        run_steps(model, base, warm_steps, skip_pattern(warm_steps, 0.5) if cached else [False] * warm_steps,
                  timer, cached)                                  # compile + both branches once
        warm_s = time.perf_counter() - t0
        totals, comp, skip, summary = [], [], [], None
        for _ in range(a.repeat):
            ms, summary = run_steps(model, base, a.steps, pattern if cached else [False] * a.steps, timer, cached)
            totals.append(sum(ms))
            for i, t in enumerate(ms):
                (skip if cached and pattern[i] else comp).append(t)
        if cached and summary["skipped_steps"] != [i for i, s in enumerate(pattern) if s]:
            raise RuntimeError(f"{method}: forced pattern not followed: {summary}")
        report = model._xdit_compiler.reports[0].get("cache") if model._xdit_compiler.reports else None
        xdit_compile.unparallelize(model)
        rows.append({"method": method, "world": world, "lowering": a.lowering, "steps": a.steps,
                     "skipped": sum(pattern) if cached else 0,
                     "ms_computed_step": statistics.median(comp) if comp else None,
                     "ms_skipped_step": statistics.median(skip) if skip else None,
                     "total_ms": statistics.median(totals), "warmup_s": warm_s,
                     "cache": {k: v for k, v in (report or {}).items() if k != "residuals"}})
        if rank == 0:
            print(rows[-1], flush=True)
    base_total = rows[0]["total_ms"] if rows[0]["method"] == "none" else None
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = (f"FluxTransformer2DModel {'tiny' if a.tiny else 'FLUX.1-dev'} config, {dtype}, {h * w} image + {txt} text "
            f"tokens, {a.steps} steps, ulysses={world} on {world} x {dev}, lowering {a.lowering}, forced skip rate "
            f"{a.skip_rate} ({sum(pattern)} of {a.steps} steps skipped in cached rows)")
    lines = [head, "", "| method | ms / computed step | ms / skipped step | total ms | speed-up vs none |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        f = (lambda v: f"{v:.1f}" if v is not None else "-")
        sp = f"{base_total / r['total_ms']:.2f}x" if base_total else "-"
        lines.append(f"| {r['method']} | {f(r['ms_computed_step'])} | {f(r['ms_skipped_step'])} | "
                     f"{r['total_ms']:.1f} | {sp} |")
    if rank == 0:
        print("\n".join(lines), flush=True)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"header": head, "device": dev, "world": world, "rows": rows,
                                   "pattern": pattern, "table": lines}, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

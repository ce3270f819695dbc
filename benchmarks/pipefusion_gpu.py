"""PipeFusion end to end: a 28-step Flux-dev denoising loop at 1024px and 2048px under torchrun (issue 5).

    # 4 GPUs (bf16, NCCL):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc_per_node 4 benchmarks/pipefusion_gpu.py --resolutions 1024 --out benchmarks/results/pipefusion_1024.json
    (same with --resolutions 2048 --out benchmarks/results/pipefusion_2048.json)
    # the displaced loop (xdit_compile.pipefusion_denoise) next to the per-call pipefusion=4 row:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc_per_node 4 benchmarks/pipefusion_gpu.py --resolutions 2048 --plans pipefusion=4 ulysses=4 \
        --displaced --out benchmarks/results/pipefusion_displaced_2048.json
    # CPU, gloo, tiny Flux config (a check of the harness; 3 steps keep it short):
    torchrun --nproc_per_node 4 benchmarks/pipefusion_gpu.py --tiny --steps 3 --out /tmp/pf.json

Model: FluxTransformer2DModel at the FLUX.1-dev config (19 double + 38 single blocks, 24 x 128 heads,
joint_attention_dim 4096, pooled 768, in_channels 64, guidance embeds), random bf16 weights (seed 0, the same
on every rank), batch 1, 512 text tokens, 1024px = 64 x 64 = 4096 image tokens, 2048px = 128 x 128 = 16384.

Loop: flow-matching Euler, sigmas linspace(1, 1/28, 28) then 0, x <- x + (sigma_next - sigma) * v, one
transformer call per step (guidance-distilled Flux: no CFG batch). Time = wall time of the whole loop with
device synchronisation at both ends, divided by the steps ("end-to-end ms per step"); the loop is run once to
compile and warm up, then timed ``--repeats`` times (median).

Device time (estimate, 4 H100): about 4 min at 1024 and 7 min at 2048 (each row builds the 12B model, compiles
and runs the loop); run one resolution per command to stay under a 10-minute limit.

Rows per resolution:
  1gpu         the plain model on rank 0 alone (the other ranks wait): the reference and the baseline
  <plan>       xdit_compile.parallelize(model, plan), pipefusion.warmup_steps = 1 (stale K/V after step 1)
  <plan> exact the same plan with warmup_steps = steps (every step on the whole sequence): rel err vs 1gpu
               must be at the bf16 noise level; its time is its only loop (compile included); --no-check
               skips it
  <plan> displaced  (--displaced, pipefusion plans, hybrids included) the same warm-up-1 model through
               xdit_compile.pipefusion_denoise: the last stage steps each latent patch and sends it to stage 0,
               so steps overlap (no fill/drain per step); time = the median of --repeats loops after one
Plans: pipefusion=4 (4 patches), pipefusion=2 x ulysses=2 and pipefusion=2 x ring=2 (2 patches), and ulysses=4 (the sequence-parallel
row in the same run, for comparison); --patches overrides the count, --plans picks rows.
Rel err = ||x_final - x_final_1gpu|| / ||x_final_1gpu|| of the final latent.
Writes a markdown table to stdout and JSON (all rows) to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=8, out_channels=None, num_layers=2, num_single_layers=2,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=20,
                 pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
SIZES = {1024: dict(h=64, w=64, txt=512), 2048: dict(h=128, w=128, txt=512)}
TINY_SIZES = {1024: dict(h=8, w=8, txt=16), 2048: dict(h=16, w=16, txt=16)}
PLANS = {"pipefusion=4": {"pipefusion": 4}, "pipefusion=2 x ulysses=2": {"pipefusion": 2, "ulysses": 2},
         "pipefusion=2 x ring=2": {"pipefusion": 2, "ring": 2}, "ulysses=4": {"ulysses": 4}}


def build(cfg, device, dtype):
    import diffusers
    import torch
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)          # init in the target dtype on the device: no fp32 copy
    try:
        with torch.device(device):
            m = diffusers.FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def inputs(cfg, size, device, dtype):
    import torch
    g = torch.Generator().manual_seed(1234)
    h, w, txt = size["h"], size["w"], size["txt"]
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(1, h * w, cfg["in_channels"], generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=g).to(device, dtype),
                pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
                img_ids=ids.reshape(h * w, 3).to(device), txt_ids=torch.zeros(txt, 3).to(device),
                guidance=torch.full((1,), 3.5, device=device), return_dict=False)


def displaced(model, kw, steps):
    """The same loop through xdit_compile.pipefusion_denoise (the pipeline displaced across steps)."""
    import xdit_compile
    sigmas = _sigmas(steps)
    rest = {k: v for k, v in kw.items() if k != "hidden_states"}
    return xdit_compile.pipefusion_denoise(model, kw["hidden_states"], sigmas, rest)


def _sigmas(steps):
    import torch
    return torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]


def denoise(model, kw, steps):
    """Flow-matching Euler loop; returns the final latent."""
    import torch
    sigmas = _sigmas(steps)
    x = kw["hidden_states"]
    for i in range(steps):
        t = torch.full((1,), sigmas[i], device=x.device, dtype=x.dtype)
        v = model(**{**kw, "hidden_states": x, "timestep": t})[0]
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
    return x


class Bench:
    def __init__(self, args):
        import torch
        import torch.distributed as dist
        self.args = args
        lr = int(os.environ.get("LOCAL_RANK", 0))
        if args.tiny or not torch.cuda.is_available():
            self.device, self.dtype, backend = torch.device("cpu"), torch.float32, "gloo"
        else:
            torch.cuda.set_device(lr)
            self.device, self.dtype, backend = torch.device("cuda", lr), torch.bfloat16, "nccl"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cfg = FLUX_TINY if args.tiny else FLUX_DEV
        self.rows = []

    def sync(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_loop(self, model, kw, steps, reset=None, repeats=None, loop=denoise):
        """(compile+first loop s, [loop s ...], final latent); no repeats: the first loop's time only."""
        self.sync()
        t0 = time.perf_counter()
        x = loop(model, kw, steps)
        self.sync()
        first = time.perf_counter() - t0
        times = []
        for _ in range(self.args.repeats if repeats is None else repeats):
            if reset:
                reset()
            self.sync()
            t0 = time.perf_counter()
            x = loop(model, kw, steps)
            self.sync()
            times.append(time.perf_counter() - t0)
        return first, times or [first], x

    def log(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

    def run(self):
        import torch
        import torch.distributed as dist

        import xdit_compile
        from xdit_compile.api import reset_pipefusion
        a = self.args
        sizes = TINY_SIZES if a.tiny else SIZES
        for res in a.resolutions:
            kw = inputs(self.cfg, sizes[res], self.device, self.dtype)
            ref = None
            if self.rank == 0:          # the 1-GPU reference and baseline
                m = build(self.cfg, self.device, self.dtype)
                with torch.no_grad():
                    first, times, ref = self.timed_loop(m, kw, a.steps, repeats=a.base_repeats)
                del m
                self.add(res, "1gpu", 1, times, first, None, None)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            dist.barrier()
            for name in a.plans:
                par = PLANS[name]
                pf = "pipefusion" in par
                patches = (a.patches or par["pipefusion"]) if pf else None
                for warm in ([1, a.steps] if a.check and pf else [1]):
                    torch._dynamo.reset()
                    m = build(self.cfg, self.device, self.dtype)
                    plan = {"parallel": par}
                    if pf:
                        plan["pipefusion"] = {"num_patches": patches, "warmup_steps": warm}
                    xdit_compile.parallelize(m, plan)
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                    with torch.no_grad():
                        # the exact run is a correctness check: its one loop (compile included) is not timed again
                        first, times, x = self.timed_loop(m, kw, a.steps, reset=lambda m=m: reset_pipefusion(m),
                                                          repeats=None if warm == 1 else 0)
                    params = sum(p.numel() * p.element_size() for p in m.parameters() if p.device.type != "meta")
                    peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" \
                        else float("nan")
                    # what the rank really holds after the loop (weights kept + KV buffers + the output)
                    alloc = torch.cuda.memory_allocated(self.device) / 2**30 if self.device.type == "cuda" \
                        else float("nan")
                    err = None
                    if self.rank == 0:
                        err = ((x.float() - ref.float()).norm() / ref.float().norm()).item()
                    if self.rank == 0 and res == a.resolutions[0] and warm == 1 and pf:
                        print(xdit_compile.explain(m), flush=True)
                    label = name if warm == 1 else f"{name} exact (warmup={warm}; time incl. compile)"
                    self.add(res, label, self.world, times, first, err,
                             dict(patches=patches, warmup_steps=warm if pf else None, param_gib_rank0=params / 2**30,
                                  peak_gib_rank0=peak, allocated_gib_rank0=alloc))
                    if a.displaced and warm == 1 and pf:
                        with torch.no_grad():
                            # same model, already compiled; the first displaced loop makes the latent group
                            first, times, x = self.timed_loop(m, kw, a.steps, loop=displaced)
                        err = None
                        if self.rank == 0:
                            err = ((x.float() - ref.float()).norm() / ref.float().norm()).item()
                            print(xdit_compile.explain(m), flush=True)
                        self.add(res, f"{name} displaced", self.world, times, first, err,
                                 dict(patches=patches, warmup_steps=warm, param_gib_rank0=params / 2**30))
                    del m, x
                    gc.collect()         # the parallelized forward closes over the model: a reference cycle
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    dist.barrier()
        self.report()

    def add(self, res, method, gpus, times, first, err, extra):
        if self.rank != 0:
            return
        ms = 1000 * statistics.median(times) / self.args.steps
        row = dict(resolution=res, method=method, gpus=gpus, ms_per_step=ms, first_loop_s=first,
                   steps=self.args.steps, rel_err_vs_1gpu=err, device=str(self.device), dtype=str(self.dtype),
                   **(extra or {}))
        self.rows.append(row)
        print(f"[row] {json.dumps(row)}", flush=True)

    def report(self):
        if self.rank != 0:
            return
        base = {r["resolution"]: r["ms_per_step"] for r in self.rows if r["method"] == "1gpu"}
        lines = [f"| res | plan | GPUs | ms/step (e2e, {self.args.steps}-step loop) | speedup vs 1 GPU | rel err vs 1 GPU | "
                 "params/rank GiB |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            sp = base.get(r["resolution"], float("nan")) / r["ms_per_step"]
            err = "ref" if r["rel_err_vs_1gpu"] is None else f"{r['rel_err_vs_1gpu']:.2e}"
            pg = r.get("param_gib_rank0")
            lines.append(f"| {r['resolution']} | {r['method']} | {r['gpus']} | {r['ms_per_step']:.1f} | {sp:.2f}x | "
                         f"{err} | {'' if pg is None else f'{pg:.2f}'} |")
        print("\n".join(lines), flush=True)
        if self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                json.dump({"rows": self.rows, "table": lines, "steps": self.args.steps}, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU/gloo tiny Flux config")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=1, help="timed loops after the compile loop (median)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048], choices=[1024, 2048])
    p.add_argument("--base-repeats", type=int, default=None,
                   help="timed loops of the 1-GPU row (default --repeats; 0 = its first loop is its time)")
    p.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS),
                   help="parallel rows, in order (default: all)")
    p.add_argument("--patches", type=int, default=0, help="patches (default: the pipefusion degree)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the warmup=all-steps runs (exactness vs the 1-GPU loop)")
    p.add_argument("--displaced", action="store_true",
                   help="also time xdit_compile.pipefusion_denoise (pipeline displaced across steps) for the "
                        "pipefusion plans, on the warm-up-1 model: row '<plan> displaced'")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    b = Bench(args)
    b.run()
    import torch.distributed as dist
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""FLUX.1-dev-sized transformer (random weights, bf16) on 2 GPUs: xdit_compile Ulysses / Ring vs 1 GPU vs
diffusers' native context parallelism. Correctness (rel. error vs the 1-GPU output) and ms per forward.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc_per_node=2 benchmarks/flux_2gpu_check.py [--out DIR] [--budget-s 480]
    torchrun --nproc_per_node=2 benchmarks/flux_2gpu_check.py --tiny     # CPU / gloo smoke test

Steps (--steps, each in its own try/except, so one failure keeps the others; the 1-GPU reference always runs
first and diffusers' CP last, the rest in the order given; a step whose usual cost would run past --budget-s
is skipped on every rank):
  ref               1-GPU bf16 eager reference (every rank runs the whole model alone, no communication)
  fp32              the same weights upcast to fp32, fp32 inputs, no TF32: the precision reference
  ulysses / ring    xdit_compile ulysses=2 / ring=2, eager lowering
  ulysses_inductor  xdit_compile ulysses=2, inductor lowering (first-call compile time printed separately)
  inductor          1-GPU torch.compile(model)
  diffusers         diffusers' ContextParallelConfig(ulysses_degree=2), every attention backend that runs
                    (its hooks can't be removed, so it runs last)
Every output is kept (rank 0 saves them to OUT/flux_2gpu_outputs.pt) and compared pairwise. The table's
"like-for-like" error compares each parallel run with the 1-GPU run of the same lowering. bf16 eager and
inductor round differently, so on this random-weight model they differ by ~8e-2 whatever the parallelism.
Timing: CUDA events around one forward, 2 warm-up calls, median of 5 (rank 0's number; max over ranks also
recorded). Errors: ||out - ref|| / ||ref|| and max |out - ref| in float32, the worst over ranks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import xdit_compile  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=8, out_channels=None, num_layers=1, num_single_layers=2,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=20,
                 pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6))

T0 = time.time()


def log(*a):
    if dist.get_rank() == 0:
        print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def latent_image_ids(h, w):
    try:
        from diffusers import FluxPipeline
        return FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
    except Exception:  # same construction as diffusers' FluxPipeline._prepare_latent_image_ids
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
        return ids.reshape(h * w, 3)


def build_model(cfg, device, dtype):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # init directly in the target dtype: no float32 copy of 12B params
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def checksum(model):
    s = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for i, p in enumerate(model.parameters()):
        s += p.double().sum() * ((i % 7) + 1)
    return s


def make_inputs(tiny, device, dtype):
    g = torch.Generator().manual_seed(1234)
    if tiny:
        h = w = 8
        txt, cin, tdim, pdim = 16, FLUX_TINY["in_channels"], FLUX_TINY["joint_attention_dim"], 12
    else:
        h = w = 64  # 1024x1024 image -> 128x128 latent -> 64x64 packed tokens
        txt, cin, tdim, pdim = 512, 64, 4096, 768
    kw = dict(
        hidden_states=torch.randn(1, h * w, cin, generator=g),
        encoder_hidden_states=torch.randn(1, txt, tdim, generator=g),
        pooled_projections=torch.randn(1, pdim, generator=g),
        timestep=torch.tensor([1.0]),
        img_ids=latent_image_ids(h, w),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.tensor([3.5]),
    )
    out = {}
    for k, v in kw.items():
        v = v.to(device)
        out[k] = v.to(dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
    out["return_dict"] = False
    return out


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, inputs, device, warmup=2, iters=5):
    """(median ms of rank 0, max-over-ranks median ms, last output, list of ms)."""
    for _ in range(warmup):
        out = run(model, inputs)
    sync(device)
    ts = []
    for _ in range(iters):
        dist.barrier()
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = run(model, inputs)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            out = run(model, inputs)
            ts.append((time.perf_counter() - t) * 1e3)
    med = statistics.median(ts)
    m = torch.tensor([med], dtype=torch.float64, device=device)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return med, m.item(), out, ts


def errors(out, ref, device):
    o, r = out.float(), ref.float()
    rel = ((o - r).norm() / r.norm()).item()
    mx = (o - r).abs().max().item()
    finite = bool(torch.isfinite(o).all().item())
    t = torch.tensor([rel if rel == rel else float("inf"), mx if mx == mx else float("inf"),
                      0.0 if finite else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item(), t[1].item(), t[2].item() == 0.0


def agree(flag: bool, device) -> bool:
    """True only if every rank says True (keeps ranks in step on skip decisions)."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


EST_S = dict(ref=5, fp32=15, ulysses=30, ring=30, ulysses_inductor=140, inductor=125, diffusers=15)
STEP_NAMES = dict(ref="1-GPU eager (reference)", fp32="1-GPU eager fp32", ulysses="xdit ulysses=2 eager",
                  ring="xdit ring=2 eager", ulysses_inductor="xdit ulysses=2 inductor",
                  inductor="1-GPU inductor (torch.compile)", diffusers="diffusers CP ulysses=2")
XDIT_PLANS = dict(
    ulysses=lambda w: {"parallel": {"ulysses": w}, "compile": {"lowering": "eager"}},
    ring=lambda w: {"parallel": {"ring": w}, "compile": {"lowering": "eager"}},
    ulysses_inductor=lambda w: {"parallel": {"ulysses": w}, "compile": {"lowering": "inductor"}},
)


def vs_fp32(out, ref32, device):
    if ref32 is None:
        return {}
    rel, mx, _ = errors(out, ref32, device)
    return dict(rel_vs_fp32=rel, max_abs_vs_fp32=mx)


def diffusers_cp(model, inputs, ref, ref32, device, tiny, world, rank, iters, record, keep, name):
    """diffusers' own Ulysses context parallelism, each attention backend that runs."""
    from diffusers import ContextParallelConfig
    backends = ["native"] if tiny else ["_native_cudnn", "native", "_native_flash"]
    if device.type == "cpu" and torch.accelerator.device_count() == 0:
        # diffusers computes `rank % torch.accelerator.device_count()` even on CPU (ZeroDivisionError)
        torch.accelerator.device_count = lambda: 1
    model.set_attention_backend(backends[0])
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    for be in backends:
        try:
            model.set_attention_backend(be)
            run(model, inputs)
            sync(device)
            ok = agree(True, device)
        except Exception as e:
            print(f"[rank {rank}] diffusers CP backend {be} failed:\n{traceback.format_exc()}", flush=True)
            record(f"{name} ({be})",
                   note=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                   traceback=traceback.format_exc()[-4000:])
            agree(False, device)
            continue
        if not ok:
            record(f"{name} ({be})", note="FAILED on another rank")
            continue
        ms, msx, out, ts = timed(model, inputs, device, **iters)
        keep(f"{name} ({be})", out)
        rel, mx, fin = errors(out, ref, device)
        record(f"{name} ({be})", ms, msx, rel, mx, fin, times=ts, **vs_fp32(out, ref32, device))
        del out


INDUCTOR_1GPU = "1-GPU inductor (torch.compile)"


def format_table(results, pair):
    """Markdown table. 'like-for-like' compares a parallel run with the 1-GPU run of the same lowering (eager ->
    1-GPU bf16 eager, inductor -> 1-GPU inductor, from rank 0's outputs): bf16 eager and inductor round
    differently (inductor keeps fused elementwise math in fp32), so across lowerings the gap is not a
    parallelism error. Verdict: like-for-like rel err < 2e-2 and finite."""
    base = results[0]["ms"]
    lines = ["| config | ms/step | speed-up vs 1-GPU eager | rel err vs 1-GPU bf16 eager | max abs err "
             "| rel err like-for-like | rel err vs fp32 | first call s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
    for r in results:
        ms = f(r["ms"], ".1f")
        sp = f"{base / r['ms']:.2f}x" if r["ms"] and base else "-"
        like = None
        if r["rel_err"] is not None and r["name"] not in (results[0]["name"], INDUCTOR_1GPU):
            like = (pair.get(r["name"], {}).get(INDUCTOR_1GPU) if "inductor" in r["name"] else r["rel_err"])
        lk = "-" if like is None else f"{like:.2e} " + ("ok" if like < 2e-2 and r["finite"] else "FAIL")
        lines.append(f"| {r['name']} | {ms} | {sp} | {f(r['rel_err'], '.2e')} | {f(r['max_abs_err'], '.3g')} "
                     f"| {lk} | {f(r.get('rel_vs_fp32'), '.2e')} | {f(r.get('first_call_s'), '.1f')} "
                     f"| {r['note'][:200]} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny Flux config, float32, CPU/gloo")
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs"))
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="skip optional steps that would likely run past this many seconds")
    ap.add_argument("--cmd", default="", help="the command line, recorded in the results")
    ap.add_argument("--steps", default="fp32,ulysses,ring,ulysses_inductor,inductor,diffusers",
                    help="comma list of: " + ",".join(EST_S) + " (ref always runs first, diffusers last)")
    ap.add_argument("--explain", action="store_true", help="print xdit_compile.explain() for each plan")
    args = ap.parse_args()

    tiny = args.tiny or not torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if tiny:
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
    else:
        torch.cuda.set_device(local_rank)
        device, dtype, backend = torch.device("cuda", local_rank), torch.bfloat16, "nccl"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    import diffusers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = dict(date="2026-11-26", gpu=gpu, world_size=world, torch=torch.__version__,
                diffusers=diffusers.__version__, dtype=str(dtype), tiny=tiny,
                config=FLUX_TINY if tiny else FLUX_DEV,
                cmd=args.cmd or " ".join(["torchrun", f"--nproc_per_node={world}"] + sys.argv))
    log("meta", json.dumps(meta))
    results = []  # rows: name, ms, ms_max, rel, maxabs, finite, note
    cfg = FLUX_TINY if tiny else FLUX_DEV

    def dump(partial):
        if rank != 0:
            return
        os.makedirs(args.out, exist_ok=True)
        meta["total_s"] = time.time() - T0
        meta["partial"] = partial
        with open(os.path.join(args.out, "flux_2gpu_check.json"), "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)

    def record(name, ms=None, ms_max=None, rel=None, maxabs=None, finite=None, note="", **extra):
        row = dict(name=name, ms=ms, ms_max_over_ranks=ms_max, rel_err=rel, max_abs_err=maxabs,
                   finite=finite, note=note, **extra)
        results.append(row)
        log("RESULT", json.dumps(row))
        dump(partial=True)

    def fail(name, e):
        tb = traceback.format_exc()
        print(f"[rank {rank}] STEP {name} FAILED: {type(e).__name__}: {e}\n{tb}", flush=True)
        record(name, note=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
               traceback=tb[-4000:])

    t = time.time()
    model = build_model(cfg, device, dtype)
    sync(device)
    cs = checksum(model)
    cs_all = [torch.zeros_like(cs) for _ in range(world)]
    dist.all_gather(cs_all, cs)
    same = all(c.item() == cs.item() for c in cs_all)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"built model: {nparams / 1e9:.3f} B params in {time.time() - t:.1f}s; weight checksum per rank "
        f"{[c.item() for c in cs_all]} -> identical={same}")
    meta.update(params=nparams, weights_identical=same)
    if not same:
        log("WARNING: weights differ across ranks; broadcasting rank 0's")
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    inputs = make_inputs(tiny, device, dtype)
    iters = dict(warmup=2, iters=5)
    outs = {}  # step name -> output (float32, CPU): pairwise comparisons at the end, saved to $OUT on rank 0

    def keep(name, out):
        outs[name] = out.detach().float().cpu()

    def budget_ok(step):
        return agree(time.time() - T0 + EST_S.get(step, 10) * (0.05 if tiny else 1) < args.budget_s, device)

    steps = [x for x in args.steps.split(",") if x]
    unknown = set(steps) - set(EST_S)
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; known {sorted(EST_S)}")
    # the 1-GPU reference first, diffusers' CP (irreversible hooks) last
    steps = ["ref"] + [x for x in steps if x not in ("ref", "diffusers")] + (["diffusers"] if "diffusers" in steps else [])

    ref = ref32 = None
    for step in steps:
        if step != "ref" and not budget_ok(step):
            record(STEP_NAMES[step], note="skipped: time budget")
            continue
        name = STEP_NAMES[step]
        try:
            if step == "ref":
                ms, msx, ref, ts = timed(model, inputs, device, **iters)
                ref = ref.detach().clone()
                keep(name, ref)
                _, _, fin = errors(ref, ref, device)
                record(name, ms, msx, 0.0, 0.0, fin, times=ts)
                if ref is None:
                    raise SystemExit("no reference: nothing to compare")
            elif step == "fp32":
                # the same weights upcast (bf16 -> fp32 -> bf16 is exact), fp32 inputs, no TF32
                model.float()
                inp32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in inputs.items()}
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                ref32 = run(model, inp32).detach().float()
                model.to(dtype)
                del inp32
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                keep(name, ref32)
                rel, mx, fin = errors(ref, ref32, device)
                record(name, rel_vs_fp32=0.0, finite=fin,
                       note=f"fp32 eager, same weights; bf16 1-GPU eager vs it: rel {rel:.2e}")
                results[0]["rel_vs_fp32"] = rel
                ok = checksum(model).item() == cs.item()
                log(f"fp32 round trip restored the bf16 weights exactly: {ok}")
            elif step in XDIT_PLANS:
                plan = XDIT_PLANS[step](world)
                try:
                    xdit_compile.parallelize(model, plan)
                    t = time.time()
                    first = run(model, inputs)  # dynamo capture + rewrite (+ inductor compile)
                    sync(device)
                    compile_s = time.time() - t
                    log(f"{name}: first call (capture+rewrite+lowering) {compile_s:.1f}s")
                    if rank == 0 and args.explain:
                        try:
                            print(xdit_compile.explain(model), flush=True)
                        except Exception as e:
                            print("explain failed:", e)
                    del first
                    ms, msx, out, ts = timed(model, inputs, device, **iters)
                    keep(name, out)
                    rel, mx, fin = errors(out, ref, device)
                    record(name, ms, msx, rel, mx, fin, first_call_s=compile_s, times=ts,
                           **vs_fp32(out, ref32, device))
                    del out
                finally:
                    try:
                        xdit_compile.unparallelize(model)
                    except Exception as e:
                        print(f"[rank {rank}] unparallelize failed: {e}", flush=True)
                    torch._dynamo.reset()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            elif step == "inductor":
                try:
                    cm = torch.compile(model)
                    t = time.time()
                    run(cm, inputs)
                    sync(device)
                    compile_s = time.time() - t
                    log(f"{name}: first call (compile) {compile_s:.1f}s")
                    ms, msx, out, ts = timed(cm, inputs, device, **iters)
                    keep(name, out)
                    rel, mx, fin = errors(out, ref, device)
                    record(name, ms, msx, rel, mx, fin, first_call_s=compile_s, times=ts,
                           **vs_fp32(out, ref32, device))
                    del out, cm
                finally:
                    torch._dynamo.reset()
            elif step == "diffusers":
                diffusers_cp(model, inputs, ref, ref32, device, tiny, world, rank, iters, record, keep, name)
        except Exception as e:
            fail(name, e)
            if step == "ref":
                raise SystemExit("no reference: nothing to compare")
        if rank == 0 and outs:
            os.makedirs(args.out, exist_ok=True)
            torch.save(outs, os.path.join(args.out, "flux_2gpu_outputs.pt"))

    # pairwise relative differences between the outputs (rank 0's), e.g. xdit inductor vs 1-GPU inductor
    names = list(outs)
    pair = {a: {b: ((outs[a] - outs[b]).norm() / outs[b].norm()).item() for b in names} for a in names}
    meta["pairwise_rel_diff"] = pair  # pair[a][b] = ||a - b|| / ||b||
    if rank == 0 and len(names) > 1:
        print("pairwise ||a-b||/||b|| (rank 0):", flush=True)
        for a in names:
            print(f"  {a[:34]:34s} " + " ".join(f"{pair[a][b]:.2e}" for b in names), flush=True)

    # report
    table = format_table(results, pair)
    log("\n" + table)
    dump(partial=False)
    if rank == 0:
        with open(os.path.join(args.out, "flux_2gpu_check_table.md"), "w") as f:
            f.write(table + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""parallelize(): make an unmodified diffusers transformer (or a pipeline's) run sequence-parallel.

In place and idempotent: `model.forward` is replaced by a dynamo-compiled forward whose backend is
XditCompiler(plan). Every rank must hold the same weights and call the model with the same inputs; every
rank gets the full output.
"""
from __future__ import annotations

import warnings

import torch

from .backend import XditCompiler
from .plan import Plan, load_plan


def parallelize(model, plan, *, disable_passes=()):
    """Rewrite `model` (an nn.Module, or a pipeline with `.transformer`) for the plan's parallel degrees."""
    plan = load_plan(plan)
    reason = plan.unsupported_reason()
    if reason:
        raise ValueError(reason)
    target = model
    if not isinstance(model, torch.nn.Module):
        target = getattr(model, "transformer", None)
        if not isinstance(target, torch.nn.Module):
            raise TypeError(f"parallelize() takes an nn.Module or a pipeline with .transformer, "
                            f"got {type(model).__name__}")
        if getattr(target, "_xdit_plan", None) is not None:
            if target._xdit_plan == plan:
                return model
            raise ValueError("this pipeline was already parallelized with a different plan; "
                             "build a fresh one to apply another plan")
        from .pipelines import parallelize_pipeline
        return parallelize_pipeline(model, plan)
    prev = getattr(target, "_xdit_plan", None)
    if prev is not None:
        if prev == plan:
            return model
        raise ValueError("this model was already parallelized with a different plan; "
                         "build a fresh model to apply another plan")
    compiler = XditCompiler(plan, disabled_passes=disable_passes)
    compiler.model_class = type(target).__name__
    # diffusers wraps many models' forward in one decorator (one code object): each parallelized model is
    # a recompile of it, so the default limit of 8 is too low for a process that serves several models.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    if compiler.dims.sp_enabled or compiler.dims.axis_size("cfg") > 1:
        from .models_registry.specs import apply_spec
        compiler.spec = apply_spec(target)
    orig_forward = target.forward
    options = {}
    if compiler.dims.axis_size("pipefusion") > 1:
        # Each rank drops the other stages' parameters after the first call: no guard may re-check them.
        options["guard_filter_fn"] = _no_parameter_guards
    compiled = torch.compile(orig_forward, backend=compiler, fullgraph=plan.compile.fullgraph, dynamic=False,
                             options=options or None)
    state = {"warned": False}

    def forward(*args, **kwargs):
        out = compiled(*args, **kwargs)
        if compiler.free_ids:
            _free_parameters(target, compiler.free_ids)
            compiler.free_ids = set()
        if not state["warned"]:
            state["warned"] = True
            if not compiler.reports and plan.parallel.world_size > 1:
                raise RuntimeError(
                    "xdit: dynamo ran the model without compiling it (its recompile limit was hit: many models "
                    "share diffusers' forward wrapper). Call torch._dynamo.reset() before parallelize(), or raise "
                    "torch._dynamo.config.recompile_limit")
            _warn_graph_breaks(compiler)
        return out

    target.forward = forward
    target._xdit_plan = plan
    target._xdit_compiler = compiler
    target._xdit_orig_forward = orig_forward
    return model


def _no_parameter_guards(entries):
    return [not ("_parameters" in e.name or "_buffers" in e.name) for e in entries]


def _free_parameters(model, ids) -> int:
    """Replace the parameters whose tensor id is in ``ids`` by meta tensors (pipefusion: other stages')."""
    freed = 0
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in ids:
                mod._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                           requires_grad=p.requires_grad)
                freed += p.numel()
    return freed


def reset_pipefusion(model) -> None:
    """Start a new denoising loop: the next ``pipefusion.warmup_steps`` calls run on the whole sequence again.
    Pipelines parallelized with ``parallelize(pipe, plan)`` do this at every ``pipe(...)`` call."""
    target = model if isinstance(model, torch.nn.Module) else model.transformer
    compiler = getattr(target, "_xdit_compiler", None)
    for r in getattr(compiler, "pipefusion_runners", ()):
        r.reset()


def pipefusion_denoise(model, latents, sigmas, model_kwargs=None, *, step_fn=None, step_kwargs=None,
                       latent_kwarg: str = "hidden_states", warmup_steps: int | None = None):
    """A whole denoising loop on a model parallelized with ``parallel.pipefusion`` (alone or with ulysses, ring,
    cfg or data), with the pipeline displaced across steps: the last stage steps each latent patch as it
    finishes and sends it to the other stages, so stage 0 starts step i + 1 while the later stages finish
    step i (no fill/drain per step).

    ``latents``: the latent as the model takes it (with parallel.cfg, the batched ``[uncond, cond]`` latent,
    e.g. ``torch.cat([x, x])``). ``sigmas``: the schedule, ``len(sigmas) - 1`` steps. ``model_kwargs``: the
    inputs that do not change across steps (``return_dict=False`` or not). ``step_kwargs(i) -> dict``:
    per-step inputs (default ``{"timestep": sigmas[i]}`` per batch row, as Flux pipelines pass it).
    ``step_fn(x, v, i)``: the scheduler step, applied to the whole latent in warm-up steps and to one patch
    after: ``x`` and ``v`` (the model output) hold the model's whole batch at the patch's tokens, so with
    parallel.cfg it can apply guidance (combine the rows of the two halves) and return the new latent for
    both halves. It must work token by token. Default: flow-matching Euler ``x + (sigmas[i + 1] -
    sigmas[i]) * v`` in float32 (no guidance). The first ``pipefusion.warmup_steps`` steps (or
    ``warmup_steps``: for this loop only, no recompile) are per-call full steps (exact). Returns the final
    latent, the same on every rank of a data replica. Models whose output cannot be made patch by patch
    are refused with the reason; ``model(...)`` per step keeps working for them."""
    from .runtime.pipefusion_displaced import DisplacedLoop

    target = model if isinstance(model, torch.nn.Module) else getattr(model, "transformer", None)
    compiler = getattr(target, "_xdit_compiler", None)
    if compiler is None:
        raise ValueError("pipefusion_denoise() needs a model that went through parallelize()")
    plan = compiler.plan
    par = plan.parallel
    if par.pipefusion < 2:
        raise ValueError(f"pipefusion_denoise() needs parallel.pipefusion >= 2 (got {par.pipefusion}); "
                         "call the model per step instead")
    if compiler.cfg_external and par.cfg > 1:
        raise ValueError("pipefusion_denoise() runs the transformer of a batched-CFG call; this model is driven "
                         "by a pipeline that runs the two CFG calls on two rank halves: call the pipeline")
    warm = plan.pipefusion.warmup_steps if warmup_steps is None else int(warmup_steps)
    if warm < 1:
        raise ValueError("pipefusion_denoise() needs pipefusion.warmup_steps >= 1 (a full step fills the K/V "
                         "buffers)")
    sigmas = [float(s) for s in sigmas]
    steps = len(sigmas) - 1
    if steps < 1:
        raise ValueError("pipefusion_denoise() needs at least two sigmas (one step)")
    if step_fn is None:
        def step_fn(x, v, i):
            return (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
    if step_kwargs is None:
        def step_kwargs(i):
            return {"timestep": torch.full((latents.shape[0],), sigmas[i], dtype=latents.dtype,
                                           device=latents.device)}
    model_kwargs = dict(model_kwargs or {})
    reset_pipefusion(target)
    x, loop, runner = latents, None, None
    saved = {}      # runner -> its warmup_steps (the first call of the loop may make the runner)
    try:
        with torch.no_grad():
            for i in range(steps):
                for r in compiler.pipefusion_runners:
                    saved.setdefault(r, r.warmup)
                    r.warmup = warm
                kw = {**model_kwargs, **step_kwargs(i), latent_kwarg: x}
                if i < warm:
                    out = model(**kw)
                    x = step_fn(x, out[0] if isinstance(out, (tuple, list)) else out.sample, i)
                    continue
                if loop is None:
                    runners = compiler.pipefusion_runners
                    if len(runners) != 1:
                        raise ValueError(f"pipefusion_denoise() needs the model in one captured graph; dynamo "
                                         f"made {len(runners)} (graph breaks)")
                    runner = runners[0]
                    loop = runner.displaced = DisplacedLoop(runner, num_steps=steps, step_fn=step_fn, latent=x,
                                                            latent_group=_latent_group(runner, compiler.dims),
                                                            groups=_hybrid_groups(compiler.dims))
                loop.i = i
                model(**kw)
    finally:
        for r, w in saved.items():
            r.warmup = w
        if runner is not None:
            runner.displaced = None
    return x if loop is None else loop.result


def _latent_group(runner, dims):
    """The pipefusion axis again, on a communicator of its own (latent patches must not queue behind
    activations between the same two ranks). Made once per model; a collective over the world."""
    group = getattr(runner, "_latent_group", None)
    if group is None:
        group = runner._latent_group = dims.new_axis_group("pipefusion")
    return group


def _hybrid_groups(dims) -> dict:
    groups = {}
    if dims.axis_size("cfg") > 1:
        groups["cfg"] = dims.get_group("cfg")
    if dims.sp_enabled:
        groups["sp"] = dims.sp_group
    if "cfg" in groups or "sp" in groups:
        groups["replica"] = dims.get_group("replica")
    return groups


def unparallelize(model):
    """Undo parallelize(): restore the original forward."""
    target = model if isinstance(model, torch.nn.Module) else model.transformer
    if getattr(target, "_xdit_plan", None) is None:
        return model
    if target._xdit_plan.parallel.pipefusion > 1 and any(p.device.type == "meta" for p in target.parameters()):
        raise ValueError("this model ran with parallel.pipefusion > 1, which dropped the other stages' parameters "
                         "on this rank; load the model again instead of unparallelizing it")
    target.forward = target._xdit_orig_forward
    from .models_registry.specs import undo_spec
    undo_spec(target)
    for a in ("_xdit_plan", "_xdit_compiler", "_xdit_orig_forward"):
        delattr(target, a)
    return model


def _controller(model):
    target = model if isinstance(model, torch.nn.Module) else getattr(model, "transformer", None)
    compiler = getattr(target, "_xdit_compiler", None)
    if compiler is None:
        raise ValueError("cache_state() needs a model (or pipeline) that went through parallelize()")
    if compiler.plan.cache.method == "none":
        raise ValueError("the model's plan has cache.method = 'none'; set [cache] method = 'fbcache' or 'teacache'")
    return compiler.cache


def cache_state(model, *, num_steps: int | None = None, force=None, threshold: float | None = None):
    """A fresh per-request cache state for a parallelized model; use it as a context manager around the
    denoising loop of one generation (pipelines do this themselves). ``num_steps`` lets TeaCache compute
    the last step; ``force(step) -> "compute" | "skip" | None`` forces a pattern (benchmarks, tests);
    ``threshold`` overrides the plan's for this request (it is a graph input: no recompile)."""
    return _controller(model).new_state(num_steps=num_steps, force=force, threshold=threshold)


def cache_summary(model) -> dict:
    """Steps computed vs skipped of the model's last request (see runtime.cache.CacheState.summary)."""
    ctl = _controller(model)
    return (ctl.last or ctl.current).summary()


def _warn_graph_breaks(compiler: XditCompiler) -> None:
    if len(compiler.reports) <= 1:
        return
    from torch._dynamo.utils import counters
    reasons = sorted(counters.get("graph_break", {}).keys())
    why = "; ".join(str(r).splitlines()[0][:120] for r in reasons[:3]) or "see TORCH_LOGS=graph_breaks"
    where = ", ".join(r["ends_at"] for r in compiler.reports[:-1][:5])
    warnings.warn(f"xdit: dynamo split the model into {len(compiler.reports)} graphs: graph breaks after {where} "
                  f"({why}). "
                  "Each graph is parallelized on its own and gathered at its boundary: correct, but slower.",
                  stacklevel=3)


def explain(model) -> str:
    """What the compiler did to a parallelized model (call it once first): per attention node, shards,
    gathers, bytes sent per forward per rank."""
    target = model if isinstance(model, torch.nn.Module) else model.transformer
    compiler = getattr(target, "_xdit_compiler", None)
    if compiler is None or not compiler.reports:
        raise ValueError("explain() needs a model that was parallelized and called once")
    return format_reports(compiler.reports)


def _kept(a) -> str:
    """Why an attention stayed on the xdit op although decompose_collectives was on."""
    return f" (xdit op kept: {a['kept_op']})" if a.get("kept_op") else ""


def _sizes(a) -> str:
    return f", local seq sizes {a['seq_sizes']}" if "seq_sizes" in a else ""


def format_reports(reports) -> str:
    lines = []
    for rep in reports:
        if rep.get("pipefusion"):
            lines.extend(_format_pipefusion(rep))
        lines.append(f"graph {rep['subgraph']}: sequence-parallel degree {rep['sp_size']}, "
                     f"sharded token segments (full lengths) {rep['units']}"
                     + (f", batch {rep['cfg_batch'][0]} split over the cfg axis" if rep.get("cfg_batch") else ""))
        total = 0
        for a in rep["attention"]:
            b = a.get("bytes", 0)
            total += b
            lines.append(f"  attention {a['node']}: q{tuple(a['q'])} k{tuple(a['k'])}"
                         f"{' mask' + str(tuple(a['mask'])) if a['mask'] else ''} -> {a['became']}"
                         f"{_sizes(a)}"
                         f"{f', {b:,} B sent' if b else ''}"
                         f"{_kept(a)}")
        if (rep.get("fused") or {}).get("gelu"):
            lines.append(f"  fuse_gelu: {rep['fused']['gelu']} linear + tanh-GELU pairs as one GEMM with a GELU epilogue")
        if (rep.get("fused") or {}).get("linears"):
            sizes = rep["fused"]["linears"]
            lines.append(f"  fuse_linears: {len(sizes)} groups of linears of one input as one GEMM each "
                         f"({sum(sizes)} linears)")
        if (rep.get("fused") or {}).get("split_cat_linears"):
            lines.append(f"  split_cat_linears: {rep['fused']['split_cat_linears']} linear(cat) as one linear per part "
                         "(no concatenation copy)")
        if (rep.get("fused") or {}).get("fa3_attention"):
            lines.append(f"  attention_kernel: {rep['fused']['fa3_attention']} SDPA calls as xdit::fa3_attention "
                         "(flash_attn.cute's Hopper kernel)")
        if (rep.get("fused") or {}).get("norm_rope"):
            lines.append(f"  fuse_norm_rope: {rep['fused']['norm_rope']} RMSNorm + rotary pairs as one xdit::norm_rope")
        tr = rep.get("transfers") or {}
        if tr:
            lines.append(f"  schedule_transfers: {tr['split_linears']} linear(cat) split, {tr['moved_nodes']} nodes "
                         "moved (copy-engine transfers started early, waited for late)")
        for m in rep.get("modulation", ()):
            total += m["gather_bytes"]
            lines.append(f"  modulation: {m['linears']} linear{'s' * (m['linears'] != 1)} of {m['input']} sharded over "
                         f"{m['ranks']} sequence "
                         f"ranks ({_human(m['weight_bytes'])} of weights -> {_human(m['weight_bytes'] // m['ranks'])}"
                         f" per rank){', one GEMV' if m.get('fused') else ''}, one all-gather, "
                         f"{m['gather_bytes']:,} B sent")
        for e in rep["events"]:
            total += e.get("bytes", 0)
            if e["kind"] == "shard":
                lines.append(f"  shard  {e['node']} along dims {e['dims']} (local slice, no communication)")
            elif e["kind"] == "gather":
                lines.append(f"  gather {e['node']} before {e['before']} ({e['bytes']:,} B sent)")
            elif e["kind"] == "all_reduce":
                lines.append(f"  all-reduce {e['node']} (partial sum over tokens, {e['bytes']:,} B)")
            elif e["kind"] == "sink":
                lines.append(f"  full-size op {e['node']} ({e['op']}): {e['why']}")
        if rep["unknown_ops"]:
            lines.append(f"  ops without a sharding rule (run at full size): {', '.join(rep['unknown_ops'])}")
        lines.append(f"  bytes sent per forward per rank: {total:,}")
        c = rep.get("cache")
        if c and "refused" in c:
            lines.append(f"  cache {c['method']}: not applied ({c['refused']})")
        elif c:
            lines.append(f"  cache {c['method']} (threshold {c['threshold']:g}): blocks {c['blocks']}, skippable "
                         f"{c['region']}; statistic {c['statistic']}"
                         + (f", all-reduced over {c['all_reduce_over']} ranks" if c["all_reduce_over"] else "")
                         + (f", coefficients {c['coefficients']}" if c.get("coefficients") else ""))
            lines.append("    residuals (exit value - entry value): "
                         + ", ".join(f"{o} - {m}" if m else f"{o} (cached whole)" for o, m in c["residuals"]))
    return "\n".join(lines)


def _human(b: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b} B"


def _format_pipefusion(rep) -> list[str]:
    pf = rep["pipefusion"]
    runner = rep.get("pipefusion_runner")
    lines = [f"graph {rep['subgraph']}: pipefusion over {len(pf['stages'])} stages, {pf['num_patches']} patches "
             f"(tokens per patch {pf['patch_tokens']}), warm-up {pf['warmup_steps']} full step(s), "
             f"{pf['attention_layers']} attention layers with a stale-KV buffer"]
    if pf.get("kv_buffer"):
        lines.append(f"  K/V buffer: {pf['kv_buffer']}")
    for st in pf["stages"]:
        b = st["blocks"]
        what = f"{b[0]} .. {b[-1]}" if len(b) > 1 else b[0]
        lines.append(f"  stage {st['rank']} (pipefusion rank {st['rank']}): {len(b)} blocks {what}, "
                     f"{st['params']:,} parameters")
    low = pf.get("lowering")
    if low is not None:
        lines.append(f"  lowering {low.lowering}: {low.compiled} of {low.pieces} pieces of this rank's stage, prologue "
                     f"and epilogue code compiled so far ({low.seconds:.1f} s; each on its first call), "
                     f"{low.eager_modules} PFAttention calls and {low.eager_pieces} pieces without compute eager")
    if runner is not None and runner.bytes_per_call:
        for kind, b in runner.bytes_per_call.items():
            lines.append(f"  P2P bytes sent per {kind} step by this rank: {b:,}")
    return lines

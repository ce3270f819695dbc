"""In-graph cache decision (torch.cond, fullgraph) vs diffusers' graph-breaking First-Block-Cache, under Inductor.

    python benchmarks/cache_payoff.py --out benchmarks/results/cache_payoff.json            # CPU, float32
    python benchmarks/cache_payoff.py --out /tmp/cache_payoff_gpu.json  # on CUDA: bf16, 4096 + 512 tokens

Rows, one FluxTransformer2DModel each (same seed, so the same weights), all under torch.compile with Inductor:
  none       torch.compile(model, fullgraph=True): no cache, the baseline.
  xdit       xdit_compile.parallelize(model, {"compile": {"lowering": "inductor", "fullgraph": True},
             "cache": {"method": "fbcache"}}); the decision is a torch.cond in the one graph and the threshold a
             graph input, set per generation with xdit_compile.cache_state(model, threshold=...).
  diffusers  model.enable_cache(FirstBlockCacheConfig(threshold=...)) then torch.compile(model) (not fullgraph:
             the decision is a torch.compiler.disable'd function that calls .item()). The threshold is changed
             between generations on the leader hook (FBCHeadBlockHook.threshold), which is what enable_cache set.

Computed vs skipped steps come from the caches' own decisions, the same way for both: threshold 0 never skips
(ours: `threshold > 0` is part of the test; diffusers: `diff > 0` is computed unless two steps are bitwise
equal), a huge threshold (1e9) skips every step after the first. The xdit row also runs a forced pattern
(cache_state(force=...): every other step skipped) to show forcing costs the same as deciding.

The diffusers row gets a private copy of FluxTransformer2DModel.forward's code object: its graph break sits
in the loop over the blocks, so dynamo gives up on forward and marks that *code object* to run eagerly, which
otherwise also stops the compiled forward of every other FluxTransformer2DModel in the process (measured: the
xdit row, timed after it, no longer skipped anything and its blocks got compiled one by one).

Per row: warm-up = one generation at threshold 0 and one at 1e9 (--warm-steps each; this compiles every graph,
both branches included), timed with perf_counter; graphs, graph breaks and frames dynamo gave up on
(torch._dynamo.utils.counters, cleared per row) counted over the warm-up; graphs compiled while timing are
reported too (recompiles; counted for all rows together, attributed to diffusers', the only one that is not one
fullgraph graph). Timed: --repeat rounds; in each round every row runs one generation of --steps steps at
threshold 0 and one at 1e9, rows interleaved so machine load drifts hit all rows alike. One step is a
model call timed alone (CUDA events on GPU); between steps the latent takes an Euler step (x += dt * v) and
the timestep moves, as in a sampler. ms / computed step = median over the threshold-0 steps, ms / skipped step
= median over the steps the cache skipped at 1e9. Outputs: every step's output of the xdit row at threshold 0
must equal the baseline's (asserted: rel. error <= 1e-5 float32 / 1e-2 bf16; bitwise equality reported).
Prints a markdown table and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache_gpu import _Timer, build, inputs  # noqa: E402

FLUX_SMALL = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=6, attention_head_dim=64,
                  num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
                  axes_dims_rope=(16, 24, 24))
HUGE = 1e9


def _counts() -> dict:
    from torch._dynamo.utils import counters
    skipped = sum(v for k, v in counters["unimplemented"].items() if "frame skipped" in k or "Skipping the frame" in k)
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "frames_ok": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
            "frames_skipped_to_eager": skipped,
            "break_reasons": sorted({k.split("\n")[0] for k in counters["graph_break"]})}


class Row:
    """One compiled model and how to run one generation of it at a threshold."""

    def __init__(self, name, model, call, *, cached):
        self.name, self.model, self.call, self.cached = name, model, call, cached
        self.comp, self.skip, self.forced = [], [], []
        self.outs0: list[torch.Tensor] = []

    def generate(self, base, steps, threshold, timer, force=None):
        """Euler steps from t=1 to 0; returns (ms per step, skipped steps, outputs)."""
        kw = dict(base)
        x = kw["hidden_states"].clone()
        ts = torch.linspace(1.0, 0.0, steps + 1)
        recs, outs = [], []
        with torch.no_grad(), self.context(steps, threshold, force) as summary:
            for i in range(steps):
                kw["hidden_states"] = x
                kw["timestep"] = torch.full_like(base["timestep"], float(ts[i]))
                t0 = timer.start()
                v = self.call(**kw)[0]
                recs.append(timer.stop(t0))
                self.after_step()
                outs.append(v)
                x = x + (float(ts[i + 1]) - float(ts[i])) * v
        if timer.cuda:
            torch.cuda.synchronize()
        return [timer.ms(r) for r in recs], summary(), outs

    def context(self, steps, threshold, force):
        return _NoCache()

    def after_step(self):
        pass


class _NoCache:
    def __enter__(self):
        return lambda: []

    def __exit__(self, *exc):
        return False


class XditRow(Row):
    def context(self, steps, threshold, force):
        import xdit_compile
        state = xdit_compile.cache_state(self.model, num_steps=steps, threshold=threshold, force=force)

        class _Ctx:
            def __enter__(_):
                state.__enter__()
                return lambda: state.summary()["skipped_steps"]

            def __exit__(_, *exc):
                state.__exit__(*exc)
                return False
        return _Ctx()


class DiffusersRow(Row):
    """Skipped steps are read from the hooks' shared state after each call (should_compute, set by the leader
    block hook every step): patching the decision function would change what dynamo guards on."""

    def context(self, steps, threshold, force):
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
        model = self.model
        hook = model.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
        hook.threshold = threshold
        model._reset_stateful_cache()
        self._skipped = []

        class _Ctx:
            def __enter__(_):
                self._cm = model.cache_context("cond")
                self._cm.__enter__()
                self._hook = hook
                return lambda: [i for i, s in enumerate(self._skipped) if s]

            def __exit__(_, *exc):
                self._cm.__exit__(*exc)
                return False
        return _Ctx()

    def after_step(self):
        self._skipped.append(not self._hook.state_manager.get_state().should_compute)


def _private_forward(model) -> None:
    """Give this model its own copy of FluxTransformer2DModel.forward's code object (and skip diffusers'
    LoRA-scale wrapper, a no-op here): dynamo's "run this frame eagerly" mark is per code object."""
    inner = inspect.unwrap(type(model).forward)
    fn = types.FunctionType(inner.__code__.replace(), inner.__globals__, inner.__name__, inner.__defaults__,
                            inner.__closure__)
    fn.__kwdefaults__ = inner.__kwdefaults__
    model.forward = types.MethodType(fn, model)


def make_rows(cfg, device, dtype, names):
    import xdit_compile
    from diffusers.hooks import FirstBlockCacheConfig
    rows = []
    for name in names:
        model = build(cfg, device, dtype)
        if name == "none":
            rows.append(Row(name, model, torch.compile(model, backend="inductor", fullgraph=True, dynamic=False),
                            cached=False))
        elif name == "xdit":
            xdit_compile.parallelize(model, {"compile": {"lowering": "inductor", "fullgraph": True},
                                             "cache": {"method": "fbcache", "threshold": 0.12}})
            rows.append(XditRow(name, model, model, cached=True))
        elif name == "diffusers":
            _private_forward(model)
            model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
            rows.append(DiffusersRow(name, model, torch.compile(model, backend="inductor", dynamic=False),
                                     cached=True))
        else:
            raise ValueError(f"--rows: unknown row {name!r}; valid: none, xdit, diffusers")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hw", type=int, default=None, help="latent side in patches (default 16 on CPU, 64 on GPU)")
    p.add_argument("--txt", type=int, default=None, help="text tokens (default 32 on CPU, 512 on GPU)")
    p.add_argument("--steps", type=int, default=12, help="steps per timed generation")
    p.add_argument("--warm-steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2, help="timed rounds (each: one generation per threshold)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machine)")
    p.add_argument("--rows", default="none,xdit,diffusers")
    p.add_argument("--out", required=True, help="JSON output path")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(a.threads)
    hw = a.hw or (64 if cuda else 16)
    txt = a.txt or (512 if cuda else 32)
    cfg = FLUX_SMALL
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    names = a.rows.split(",")
    rows = make_rows(cfg, device, dtype, names)
    base = inputs(cfg, hw, hw, txt, device, dtype)
    timer = _Timer(device)
    info, skipped_at = {}, {}
    for r in rows:                                          # warm-up: compile everything, count graphs
        counters.clear()
        t0 = time.perf_counter()
        r.generate(base, a.warm_steps, 0.0, timer)
        r.generate(base, a.warm_steps, HUGE, timer)
        if isinstance(r, XditRow):
            r.generate(base, a.warm_steps, 0.0, timer, force=lambda i: "skip" if i % 2 else "compute")
        info[r.name] = {"warmup_s": time.perf_counter() - t0, **_counts()}
        print(r.name, info[r.name], flush=True)
    counters.clear()
    for _ in range(a.repeat):                               # timed, rows interleaved
        for r in rows:
            ms, sk, outs = r.generate(base, a.steps, 0.0, timer)
            r.comp += ms
            skipped_at.setdefault(r.name, {})[0.0] = sk
            if not r.outs0:
                r.outs0 = outs
            ms, sk, _ = r.generate(base, a.steps, HUGE, timer)
            skipped_at[r.name][HUGE] = sk
            r.skip += [t for i, t in enumerate(ms) if i in sk] if r.cached else []
            if isinstance(r, XditRow):
                ms, sk, _ = r.generate(base, a.steps, 0.0, timer, force=lambda i: "skip" if i % 2 else "compute")
                r.forced += [t for i, t in enumerate(ms) if i in sk]
    timing_graphs = _counts()["graphs"]
    for r in rows:
        info[r.name]["compiled_while_timing"] = timing_graphs if r.name == "diffusers" else 0

    ref = next((r for r in rows if r.name == "none"), None)
    errs = {}
    for r in rows:
        if ref is not None and r is not ref:
            rel = max(((o - b).float().norm() / b.float().norm()).item() for o, b in zip(r.outs0, ref.outs0))
            errs[r.name] = {"rel_err_vs_none": rel,
                            "bitwise": all(torch.equal(o, b) for o, b in zip(r.outs0, ref.outs0))}
    if "xdit" in errs and errs["xdit"]["rel_err_vs_none"] > (1e-5 if dtype == torch.float32 else 1e-2):
        raise AssertionError(f"xdit fbcache at threshold 0 differs from the uncached model: {errs['xdit']}")

    med = (lambda v: statistics.median(v) if v else None)
    f = (lambda v: f"{v:.1f}" if v is not None else "-")
    base_ms = med(ref.comp) if ref is not None else None
    dev = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} thread(s))"
    head = (f"FluxTransformer2DModel ({cfg['num_layers']}+{cfg['num_single_layers']} blocks, "
            f"{cfg['num_attention_heads']} x {cfg['attention_head_dim']} heads), {dtype}, {hw * hw} image + {txt} "
            f"text tokens, {dev}, torch {torch.__version__}, Inductor; {a.repeat} x {a.steps} steps per threshold")
    lines = [head, "",
             "| row | graphs | graph breaks | frames run eager | warm-up s | ms / computed step (thr 0) | "
             "ms / skipped step (thr 1e9) | skipped at thr 0 / 1e9 | computed vs none | rel. err thr 0 vs none |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    out_rows = []
    for r in rows:
        i, c, s = info[r.name], med(r.comp), med(r.skip)
        sk = skipped_at[r.name]
        e = errs.get(r.name)
        err = "-" if e is None else ("0 (bitwise)" if e["bitwise"] else f"{e['rel_err_vs_none']:.1e}")
        g = f"{i['graphs']}" + (f" (+{i['compiled_while_timing']} timing)" if i["compiled_while_timing"] else "")
        lines.append(f"| {r.name} | {g} | {i['graph_breaks']} | {i['frames_skipped_to_eager']} | "
                     f"{i['warmup_s']:.1f} | {f(c)} | {f(s)} | "
                     f"{(f'{len(sk[0.0])} / {len(sk[HUGE])} of {a.steps}') if r.cached else '-'} | "
                     f"{(f'{c / base_ms:.2f}x' if base_ms else '-')} | {err} |")
        out_rows.append({"row": r.name, **i, "ms_computed_step": c, "ms_skipped_step": s,
                         "ms_forced_skip_step": med(r.forced), "computed_ms_all": r.comp, "skipped_ms_all": r.skip,
                         "skipped_steps": {str(k): v for k, v in sk.items()}, "vs_none": e})
    xd = next((r for r in rows if r.name == "xdit"), None)
    if xd is not None and xd.forced:
        lines += ["", f"xdit with a forced pattern (every other step skipped, same graph): "
                      f"{med(xd.forced):.1f} ms / skipped step."]
    print("\n".join(lines), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": head, "device": dev, "config": cfg, "hw": hw, "txt": txt,
                               "steps": a.steps, "repeat": a.repeat, "rows": out_rows,
                               "table": lines}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

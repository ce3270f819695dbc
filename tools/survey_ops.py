"""Survey the dynamo fx graphs of the tiny diffusers DiTs in tests/models.py.

For every model case: capture with ``torch.compile(model, backend=recorder,
dynamic=False)`` (fullgraph=False), call once, then report

* distinct (op, target) pairs with counts (call_function -> qualified name,
  call_method -> method name, call_module -> module type),
* how parameters / buffers enter the graph (placeholders vs get_attr),
* every scaled_dot_product_attention node: q/k/v/attn_mask shapes + kwargs,
* graph count, graph breaks (reason + user location via torch._dynamo.explain).

Usage:  python tools/survey_ops.py [model ...] [--md tools/SURVEY.md]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback
import warnings

import torch
import torch._dynamo
import torch.fx
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from models import MODELS  # noqa: E402

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def qualname(target) -> str:
    try:
        return torch.fx.node._get_qualified_name(target)
    except Exception:
        mod = getattr(target, "__module__", None) or "?"
        return f"{mod}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def node_key(gm: torch.fx.GraphModule, n: torch.fx.Node):
    if n.op == "call_function":
        return ("call_function", qualname(n.target))
    if n.op == "call_method":
        return ("call_method", str(n.target))
    if n.op == "call_module":
        return ("call_module", f"{n.target}:{type(gm.get_submodule(n.target)).__name__}")
    return None


def _shape(v):
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    return repr(v)


def _val(a):
    if isinstance(a, torch.fx.Node):
        ev = a.meta.get("example_value")
        return _shape(ev) if ev is not None else f"<{a.name}>"
    return repr(a)


def classify_placeholder(n: torch.fx.Node) -> str:
    name = n.name
    if "_parameters_" in name:
        return "param"
    if "_buffers_" in name:
        return "buffer"
    return "input"


def survey_one(name: str, explain_breaks: bool = True) -> dict:
    case = MODELS[name]
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = case.build()
    inputs = case.inputs(batch=2)
    t0 = time.time()
    with torch.no_grad():
        ref = model(**inputs)
        cm = torch.compile(model, backend=backend, dynamic=False)
        out = cm(**inputs)
    ok = all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(ref, out) if isinstance(a, torch.Tensor))
    dt = time.time() - t0
    gb = dict(counters["graph_break"])

    res = dict(name=name, cls=case.cls_name, n_graphs=len(graphs), match=ok, time=dt,
               graph_break_counter=gb, ops=collections.Counter(), sdpa=[], params={},
               get_attr=collections.Counter(), breaks=[], nodes_total=0)
    ph = collections.Counter()
    for gi, gm in enumerate(graphs):
        for n in gm.graph.nodes:
            res["nodes_total"] += 1
            if n.op == "placeholder":
                ph[classify_placeholder(n)] += 1
            elif n.op == "get_attr":
                v = getattr(gm, n.target, None)
                kind = type(v).__name__
                if isinstance(v, torch.nn.Parameter):
                    kind = "Parameter"
                elif isinstance(v, torch.Tensor):
                    kind = "Tensor(const)"
                res["get_attr"][kind] += 1
            k = node_key(gm, n)
            if k:
                res["ops"][k] += 1
            if n.op == "call_function" and n.target in SDPA_TARGETS:
                args = list(n.args)
                names = ["q", "k", "v", "attn_mask", "dropout_p", "is_causal"]
                d = {names[i]: _val(a) for i, a in enumerate(args)}
                alias = {"query": "q", "key": "k", "value": "v"}
                for kk, vv in n.kwargs.items():
                    d[alias.get(kk, kk)] = _val(vv)
                d["out"] = _val(n)
                d["graph"] = gi
                res["sdpa"].append(d)
    res["params"] = dict(ph)

    if explain_breaks and (len(graphs) > 1 or gb):
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                ex = torch._dynamo.explain(case.build())(**case.inputs(batch=2))
            res["explain"] = dict(graph_count=ex.graph_count, graph_break_count=ex.graph_break_count)
            for br in ex.break_reasons:
                loc = ""
                if br.user_stack:
                    fr = br.user_stack[-1]
                    loc = f"{os.path.relpath(fr.filename, os.path.dirname(torch.__file__) + '/..')}:{fr.lineno} ({fr.name})"
                res["breaks"].append((br.reason.strip().splitlines()[0][:200], loc))
        except Exception as e:  # pragma: no cover
            res["breaks"].append((f"explain failed: {type(e).__name__}: {e}"[:200], ""))
    torch._dynamo.reset()
    return res


NOTES = """## Notes for the compiler

* Params/buffers: with `torch.compile(nn.Module)` (inline_inbuilt_nn_modules, default) every parameter and
  buffer is a **placeholder** (name contains `_parameters_` / `_buffers_`, e.g.
  `l_self_modules_x_embedder_parameters_weight_`; some (e.g. Flux) get `l_self_dict_modules_..._parameters_...`).
  No `get_attr` nodes, no `call_module` nodes. Placeholder order mixes params and user inputs.
* Canonical targets: `F.linear` -> `torch._C._nn.linear`, `F.gelu` -> `torch._C._nn.gelu`, `F.pad` -> `torch._C._nn.pad`,
  `F.scaled_dot_product_attention` -> `torch._C._nn.scaled_dot_product_attention` (same object as
  `torch.nn.functional.scaled_dot_product_attention`), arithmetic -> `_operator.*`; `torch.functional.einsum/meshgrid`.
  SDPA q/k/v may be passed positionally or as `query=/key=/value=` kwargs (diffusers `dispatch_attention_fn` path:
  Flux, Wan, HunyuanVideo, LTX, QwenImage), always in (B, H, S, D) layout.
* Masks at SDPA: PixArt/LTX/Sana give an additive float mask (B, H, 1, L_txt) on cross-attn; HunyuanVideo/QwenImage
  give a bool key mask (B, 1, 1, S_joint) over the joint sequence; HunyuanVideo token-refiner gives (B, H, L, L) bool.
  Lumina2 uses bool (B,1,1,S) + `scale=`; Lumina2's joint length is max(valid caption len)+img (sequence packing).
* Mochi: per-sample python loop with `torch.nonzero(mask)` inside `MochiAttnProcessor2_0.__call__` ->
  graph breaks (2 per layer at B=2); the joint-attention SDPA + out-proj run **eagerly** (not in any graph);
  the only captured SDPA is the 8-head text attention-pool. 9 graphs for 1 layer.
* Lumina2: `attention_mask.sum(1).tolist()` in the RoPE embedder -> data-dependent graph breaks; 4 graphs.
* HunyuanDiT: text attention pool is a single `torch.nn.functional.multi_head_attention_forward` node.
* Sana self-attention is linear attention (relu + matmul + pad), no SDPA; only cross-attn uses SDPA.
* Latte temporal attention: SDPA batch = B*H*W tokens, sequence = frames.
"""


def _short_model_list(models, all_models):
    if set(models) == set(all_models):
        return "ALL"
    if len(models) > len(all_models) / 2 + 1:
        return "all but " + ", ".join(m for m in all_models if m not in models)
    return ", ".join(models)


def to_markdown(results: list[dict]) -> str:
    names = [r["name"] for r in results]
    L = ["# Dynamo graph op survey (tiny diffusers DiTs)", "",
         f"torch {torch.__version__}; diffusers {__import__('diffusers').__version__}. "
         "Generated by `python tools/survey_ops.py --md tools/SURVEY.md` "
         "(capture: `torch.compile(model, backend=recorder, dynamic=False)`, batch=2, tiny configs from `tests/models.py`).", ""]
    L += ["## Per model summary", "",
          "| model | class | graphs | graph breaks | nodes | placeholders (input/param/buffer) | get_attr | SDPA nodes | compiled==eager |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            L.append(f"| {r['name']} | {MODELS[r['name']].cls_name} | ERROR | | | | | | {r['error'][:80]} |")
            continue
        p = r["params"]
        nb = r.get("explain", {}).get("graph_break_count", sum(r["graph_break_counter"].values()))
        ga = ", ".join(f"{k}:{v}" for k, v in r["get_attr"].items()) or "0"
        L.append(f"| {r['name']} | {r['cls']} | {r['n_graphs']} | {nb} | {r['nodes_total']} | "
                 f"{p.get('input', 0)}/{p.get('param', 0)}/{p.get('buffer', 0)} | {ga} | {len(r['sdpa'])} | {r['match']} |")
    ok = [r for r in results if "error" not in r]
    union = collections.defaultdict(dict)
    for r in ok:
        for (op, tgt), c in r["ops"].items():
            union[(op, tgt)][r["name"]] = c
    okn = [r["name"] for r in ok]
    for op in ("call_function", "call_method", "call_module"):
        keys = sorted(k for k in union if k[0] == op)
        L += ["", f"## Union of `{op}` targets ({len(keys)})", ""]
        if not keys:
            L.append("(none)")
            continue
        L += ["| target | total count | models |", "|---|---|---|"]
        for k in keys:
            d = union[k]
            L.append(f"| `{k[1]}` | {sum(d.values())} | {_short_model_list([m for m in okn if m in d], okn)} |")
    L += ["", "## SDPA calls (q, k, v, attn_mask shapes; B=2)", ""]
    for r in ok:
        L.append(f"### {r['name']}")
        if not r["sdpa"]:
            L.append("- no `scaled_dot_product_attention` node")
        seen = collections.Counter()
        for d in r["sdpa"]:
            key = tuple(sorted((k, v) for k, v in d.items() if k != "graph"))
            seen[key] += 1
        for key, c in seen.items():
            d = dict(key)
            rest = {k: v for k, v in d.items() if k not in ("q", "k", "v", "attn_mask", "out")}
            L.append(f"- x{c}: q {d.get('q')} k {d.get('k')} v {d.get('v')} mask {d.get('attn_mask', 'None')}"
                     + (f" other {rest}" if rest else ""))
        L.append("")
    L += ["## Graph breaks", ""]
    for r in ok:
        if r["graph_break_counter"]:
            for reason, c in r["graph_break_counter"].items():
                L.append(f"- {r['name']}: {c}x `{reason.strip().splitlines()[0]}`")
    L.append("")
    any_b = False
    for r in ok:
        if r["breaks"] or r["n_graphs"] > 1:
            any_b = True
            L.append(f"### {r['name']} ({r['n_graphs']} graphs)")
            for reason, loc in r["breaks"]:
                L.append(f"- `{loc}`: {reason}")
            L.append("")
    if not any_b:
        L.append("None.")
    errs = [r for r in results if "error" in r]
    if errs:
        L += ["", "## Errors", ""] + [f"- {r['name']}: {r['error']}" for r in errs]
    L += ["", NOTES]
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--md", default=None, help="write markdown report here")
    ap.add_argument("--no-explain", action="store_true")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    names = a.models or list(MODELS)
    results = []
    for n in names:
        try:
            r = survey_one(n, explain_breaks=not a.no_explain)
        except Exception as e:
            traceback.print_exc()
            r = dict(name=n, error=f"{type(e).__name__}: {e}")
        results.append(r)
        if "error" in r:
            print(f"== {n}: ERROR {r['error']}", flush=True)
            continue
        print(f"== {n} ({r['cls']}): graphs={r['n_graphs']} breaks={r['graph_break_counter'] or 0} "
              f"match={r['match']} {r['time']:.1f}s placeholders={r['params']} get_attr={dict(r['get_attr'])}", flush=True)
        for (op, tgt), c in sorted(r["ops"].items()):
            print(f"   {op:14s} {tgt}  x{c}")
        for d in r["sdpa"]:
            print(f"   SDPA {d}")
        for b in r["breaks"]:
            print(f"   BREAK {b[1]}: {b[0]}")
    md = to_markdown(results)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    else:
        print(md)


if __name__ == "__main__":
    main()

"""Print the dim classes the analysis gives every node of a tiny model's graph (* = sharded unit).

    python tools/show_dims.py wan [graph index]
"""
import sys; sys.path.insert(0, "tests")
import torch
from models import MODELS
from xdit_compile.passes import token_dims as td
from xdit_compile.passes.shard_sequence import choose_units
name = sys.argv[1]
case = MODELS[name]; m = case.build(); inp = case.inputs()
gms = []
def be(gm, ex): gms.append(gm); return gm.forward
torch.compile(m, backend=be)(**inp)
gm = gms[int(sys.argv[2]) if len(sys.argv) > 2 else 0]
an = td.analyze(gm)
units, best = choose_units(an)
cl = an.classes
print("units", [(u, cl.size[u], cl.kind[u]) for u in units], "conflicts", cl.conflicts[:5])
print("unknown", {n.name: v for n, v in an.unknown.items()})
def fmt(c):
    r = cl.find(c)
    s = "*" if cl.contains(r, units) else ""
    return f"{cl.size[r]}{s}#{r}"
for n in gm.graph.nodes:
    if n.op == "placeholder" and "_parameters_" in n.name: continue
    d = an.dims.get(n)
    if isinstance(d, list): ds = [fmt(c) for c in d]
    elif isinstance(d, tuple): ds = [[fmt(c) for c in x] if x else None for x in d]
    else: ds = d
    t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    print(n.name, t, [str(a)[:30] for a in n.args][:4], ds)

"""Run every tiny model under a plan in N gloo processes and print the error and what was rewritten.

    python tools/try_models.py flux,wan 2 "{'ulysses': 2}" [eager|inductor]   (EXPLAIN=1 prints explain())
    A2A=copy_engine picks compile.all_to_all (with inductor).
"""
import sys, os, time, traceback
sys.path.insert(0, "tests")
import torch
from dist_utils import run_distributed

def _run(rank, world, names, plan_par, lowering):
    import torch, xdit_compile
    from models import MODELS
    torch._dynamo.reset()
    res = {}
    for name in names:
        try:
            case = MODELS[name]
            m = case.build()
            inp = case.inputs()
            with torch.no_grad():
                ref = m(**inp)[0]
            comp = {"lowering": lowering}
            if os.environ.get("A2A"):
                comp["all_to_all"] = os.environ["A2A"]
            plan = xdit_compile.Plan.from_dict({"parallel": plan_par, "compile": comp})
            xdit_compile.parallelize(m, plan)
            with torch.no_grad():
                out = m(**inp)[0]
            err = ((out - ref).norm() / ref.norm()).item()
            rep = m._xdit_compiler.reports
            natt = sum(1 for r in rep for a in r["attention"] if a["became"].startswith(("ulysses","ring","usp")))
            tot = sum(len(r["attention"]) for r in rep)
            res[name] = (err, natt, tot, len(rep), xdit_compile.explain(m) if rank == 0 else "")
        except Exception as e:
            res[name] = ("ERR", traceback.format_exc()[-3000:])
    return res

if __name__ == "__main__":
    names = sys.argv[1].split(",")
    world = int(sys.argv[2]); par = eval(sys.argv[3]); low = sys.argv[4] if len(sys.argv) > 4 else "eager"
    out = run_distributed(_run, world, names, par, low, timeout=600)
    for name in names:
        r = out[0][name]
        if r[0] == "ERR":
            print(name, "ERROR\n", r[1])
        else:
            print(f"{name}: relerr={r[0]:.2e} rewritten={r[1]}/{r[2]} graphs={r[3]}")
            if os.environ.get("EXPLAIN"): print(r[4])

"""Scaling plot for benchmarks/bench.py: one panel per model, speed-up over 1-GPU eager vs number of GPUs, one
line per (method, kind of degrees), and the ideal y = N line.

    python benchmarks/plot.py OUT/rows.jsonl OUT/scaling.png

Needs matplotlib (in the GPU machines' image); without it, prints a message and writes nothing.
"""
from __future__ import annotations

import json
import sys

LABEL = {"eager": "1 GPU eager", "inductor": "1 GPU Inductor", "xdit": "xdit_compile eager",
         "xdit_ind": "xdit_compile Inductor", "xdit_cg": "xdit_compile Inductor+CUDA graphs",
         "xdit_cg_op": "xdit_compile Inductor+CUDA graphs (opaque a2a op)",
         "xdit_cg_ov": "xdit_compile Inductor+CUDA graphs+overlap",
         "xdit_cg_ce": "xdit_compile Inductor+CUDA graphs, copy-engine a2a",
         "xdit_cg_ce_fm": "xdit_compile Inductor+CUDA graphs, copy-engine a2a, fusions",
         "diffusers": "diffusers CP", "diffusers_ind": "diffusers CP compiled", "xfuser": "xDiT",
         "xfuser_ind": "xDiT compiled"}
MODELS = ["flux1024", "flux2048", "wan480", "sd3cfg"]


def kind(deg: str) -> str:
    """'u4' -> 'ulysses', 'r2' -> 'ring', 'u2xr2' -> 'ulysses x ring', 'cfg2xu2' -> 'cfg x ulysses'."""
    if deg == "1":
        return ""
    names = {"u": "ulysses", "r": "ring", "c": "cfg"}
    return " x ".join(names[p[0]] for p in deg.split("x"))


def series(rows):
    """{model: {label: [(n, speed-up)]}} from bench rows (dicts with model, method, n, deg, ms)."""
    base = {r["model"]: r["ms"] for r in rows if r["method"] == "eager" and r["n"] == 1 and r.get("ms")}
    out = {}
    for r in rows:
        if not r.get("ms") or r["model"] not in base:
            continue
        k = kind(r["deg"])
        label = LABEL.get(r["method"], r["method"]) + (f" ({k})" if k else "")
        out.setdefault(r["model"], {}).setdefault(label, []).append((r["n"], base[r["model"]] / r["ms"]))
    # 1-GPU rows of this project start their method's lines: the N=1 xdit point joins each xdit series
    for model, ss in out.items():
        for meth in ("xdit", "xdit_ind", "xdit_cg"):
            one = ss.pop(LABEL[meth], None)
            if one:
                for label, pts in ss.items():
                    if label.startswith(LABEL[meth] + " ("):
                        pts.extend(one)
                if not any(lb.startswith(LABEL[meth] + " (") for lb in ss):
                    ss[LABEL[meth]] = one
        for pts in ss.values():
            pts.sort()
    return out


def plot(rows, png, title=""):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no scaling plot written")
        return None
    data = series(rows)
    models = [m for m in MODELS if m in data] + [m for m in data if m not in MODELS]
    if not models:
        print("no timed rows: no scaling plot written")
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        ns = sorted({n for pts in data[model].values() for n, _ in pts})
        ax.plot(ns, ns, "k:", lw=1, label="ideal (N x)")
        for label, pts in sorted(data[model].items()):
            xs, ys = zip(*pts)
            style = "-o" if "xdit_compile" in label else ("--s" if "diffusers" in label else
                                                         ("-.^" if "xDiT" in label else "x"))
            ax.plot(xs, ys, style, label=label, ms=4)
        ax.set_title(model)
        ax.set_xlabel("GPUs")
        ax.set_xticks(ns)
        ax.set_ylabel("speed-up over 1-GPU eager")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        rows = {}
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[r["key"]] = r
    plot(list(rows.values()), sys.argv[2])

"""RMSNorm + rotary embedding of q (or k) at the real per-rank shapes, one GPU: diffusers' eager code, Inductor
(default and with coordinate-descent tuning) and xdit::norm_rope (runtime/norm_rope.py).

    python3 benchmarks/norm_rope.py --md benchmarks/results/norm_rope.md

Shapes are one rank's under ulysses 4 (before the all-to-all): FLUX single block (q of 1024² / 2048²), FLUX
double block (text then image, each its own norm, then the cat), Wan2.1-14B 480p (norm over the whole token).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F


def flux_single(q, w, cos, sin):
    from diffusers.models.embeddings import apply_rotary_emb
    return apply_rotary_emb(F.rms_norm(q, (q.shape[-1],), w, 1e-6), (cos, sin), sequence_dim=1)


def flux_double(qt, qi, wt, wi, cos, sin):
    from diffusers.models.embeddings import apply_rotary_emb
    q = torch.cat([F.rms_norm(qt, (qt.shape[-1],), wt, 1e-6), F.rms_norm(qi, (qi.shape[-1],), wi, 1e-6)], dim=1)
    return apply_rotary_emb(q, (cos, sin), sequence_dim=1)


def wan(q, w, fcos, fsin, heads):
    q = F.rms_norm(q, (q.shape[-1],), w, 1e-6).unflatten(2, (heads, -1))
    x1, x2 = q.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = fcos[..., 0::2], fsin[..., 1::2]
    out = torch.empty_like(q)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(q)


def cases(dev):
    bf = torch.bfloat16
    r = lambda *s, dt=bf: torch.randn(*s, device=dev, dtype=dt)   # noqa: E731
    out = {}
    for name, s_img, s_txt in (("flux1024", 1024, 128), ("flux2048", 4096, 128)):
        S = s_img + s_txt
        cos, sin = r(S, 128, dt=torch.float32), r(S, 128, dt=torch.float32)
        q = r(1, S, 3072).unflatten(-1, (24, 128))
        w = r(128)
        xd = (torch.ops.xdit.norm_rope, ([q], [w], 1e-6, False, cos[:, 0::2], sin[:, 0::2], cos[:, 1::2], sin[:, 1::2]))
        out[f"{name} single"] = (flux_single, (q, w, cos, sin), xd, q.numel())
        qt, qi = r(1, s_txt, 3072).unflatten(-1, (24, 128)), r(1, s_img, 3072).unflatten(-1, (24, 128))
        wt = r(128)
        xd = (torch.ops.xdit.norm_rope, ([qt, qi], [wt, w], 1e-6, False,
                                         cos[:, 0::2], sin[:, 0::2], cos[:, 1::2], sin[:, 1::2]))
        out[f"{name} double"] = (flux_double, (qt, qi, wt, w, cos, sin), xd, q.numel())
    S = 32760 // 4
    q, w = r(1, S, 5120), r(5120)
    fc, fs = r(1, S, 1, 128, dt=torch.float32), r(1, S, 1, 128, dt=torch.float32)
    xd = (torch.ops.xdit.norm_rope, ([q.unflatten(2, (40, -1))], [w], 1e-6, True,
                                     fc[..., 0::2], fs[..., 1::2], fc[..., 0::2], fs[..., 1::2]))
    out["wan480"] = (lambda q, w, fc, fs: wan(q, w, fc, fs, 40), (q, w, fc, fs), xd, q.numel())
    return out


def time_us(fn, args, iters=50):
    """GPU time per call: iters calls captured in one CUDA graph, replayed (no launch or Python overhead)."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn(*args)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(7):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / iters)
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import xdit_compile.runtime.norm_rope  # noqa: F401  (registers xdit::norm_rope)
    dev = "cuda"
    rows = []
    for name, (fn, args, (op, op_args), numel) in cases(dev).items():
        ref = fn(*args)
        variants = {
            "eager (diffusers)": (fn, args),
            "Inductor": (torch.compile(fn), args),
            "Inductor, coordinate descent": (torch.compile(fn, options={"coordinate_descent_tuning": True}), args),
            "xdit::norm_rope": (op, op_args),
        }
        for vname, (f, fa) in variants.items():
            out = f(*fa)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            mism = (out != ref).float().mean().item()
            us = time_us(f, fa)
            gbs = 2 * numel * 2 / us / 1e3
            rows.append(dict(case=name, variant=vname, us=round(us, 1), gbs=round(gbs), rel_err=err, mismatch=mism))
            print(json.dumps(rows[-1]), flush=True)
        torch._dynamo.reset()
    lines = [f"# RMSNorm + RoPE of q, one rank's shapes under ulysses 4 ({torch.cuda.get_device_name()}, "
             f"torch {torch.__version__})", "",
             "`python3 benchmarks/norm_rope.py`. us per call: 50 calls in one CUDA graph, median of 7 replays; GB/s counts one bf16 read "
             "and one write of q; rel err and the share of elements that differ are against diffusers' eager code.",
             "", "| case | variant | us | GB/s | rel err | elements differing |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['variant']} | {r['us']} | {r['gbs']} | {r['rel_err']:.1e} | {r['mismatch']:.1%} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        open(a.md, "w").write(text)
    if a.json:
        open(a.json, "w").write(json.dumps(rows))


if __name__ == "__main__":
    main()

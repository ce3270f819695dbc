"""Attention kernels that return the log-sum-exp (what each ring step needs), on one GPU (issue 4).

    python benchmarks/lse_kernels.py [--out lse_kernels.md]

For the per-step shapes of a ring step of FLUX.1-dev (24 heads x 128; ring 4 at 1024² and 2048², and
ring 2 x ulysses 2 at 2048²) times torch's flash kernel (`_scaled_dot_product_flash_attention`, what
runtime/_lse.py uses on CUDA) against cuDNN's (`_scaled_dot_product_cudnn_attention`, compute_log_sumexp),
bf16, and checks both against a float32 reference (out and lse) on a cut of the rows. Median of 20 CUDA-event
timings after 3 warm-up calls. Then checks runtime/_lse.attention_with_lse (cuDNN first, flash, then
mem-efficient) against its float32 math path on odd shapes and strided (B, S, H, D) storage, bf16 and fp16.
Last, the LSE merge of two partial outputs at the same shapes: merge_lse's torch ops (what the ring step ran
before session 14) against its one Triton kernel, into the float32 accumulator and (the last ring step) into
bf16; then a whole ring attention's merges, block by block against merge_lse_all's one pass; `--merge-only`
times only the merges.
"""
from __future__ import annotations

import argparse
import statistics

import torch

SHAPES = {  # name -> (B, H, S_q, S_kv, D): one ring step (local queries vs one rank's K/V block)
    "flux1024 ring4": (1, 24, 1152, 1152, 128),
    "flux2048 ring4": (1, 24, 4224, 4224, 128),
    "flux2048 u2xr2": (1, 12, 8448, 8448, 128),
}


def flash(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out, lse


def cudnn(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    return out, (lse[..., 0] if lse.dim() == 4 else lse)


def timed(fn, *args, n=20):
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--merge-only", action="store_true")
    a = ap.parse_args()
    if a.merge_only:
        lines = merge_rows()
        if a.out:
            open(a.out, "w").write("\n".join(lines) + "\n")
        return
    lines = [f"# LSE attention kernels, {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| shape (B, H, Sq, Skv, D) | kernel | ms | TFLOP/s | out rel err | lse max abs err |",
             "|---|---|---|---|---|---|"]
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (b, h, sq, sk, d) in SHAPES.items():
        q = torch.randn(b, h, sq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, h, sk, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, h, sk, d, device="cuda", dtype=torch.bfloat16, generator=g)
        rows = 256   # reference on the first rows only (float32 scores of all rows would be large)
        s = (q[:, :, :rows].float() @ k.float().transpose(-1, -2)) / d ** 0.5
        ref_lse = torch.logsumexp(s, -1)
        ref_out = torch.softmax(s, -1) @ v.float()
        flops = 4 * b * h * sq * sk * d
        for kname, fn in (("flash", flash), ("cudnn", cudnn)):
            try:
                out, lse = fn(q, k, v)
                err = ((out[:, :, :rows].float() - ref_out).norm() / ref_out.norm()).item()
                lerr = (lse[:, :, :rows].float() - ref_lse).abs().max().item()
                ms = timed(fn, q, k, v)
                lines.append(f"| {name} {(b, h, sq, sk, d)} | {kname} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                             f"{err:.2e} | {lerr:.2e} |")
            except Exception as e:  # noqa: BLE001 - a kernel that can't run is a row, not a crash
                lines.append(f"| {name} {(b, h, sq, sk, d)} | {kname} | - | - | - | {type(e).__name__}: "
                             f"{str(e)[:80]} |")
            print(lines[-1], flush=True)
    lines += ["", "attention_with_lse vs float32 math (out rel err, lse max abs err):", ""]
    lines += check_attention_with_lse()
    lines += merge_rows()
    if a.out:
        open(a.out, "w").write("\n".join(lines) + "\n")


def check_attention_with_lse():
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xdit_compile.runtime._lse import _math, attention_with_lse

    torch.manual_seed(0)
    out = []
    for (b, h, sq, sk, d) in [(1, 6, 1152, 1152, 128), (2, 3, 77, 333, 64), (1, 4, 100, 4224, 128),
                              (1, 2, 17, 9, 32), (1, 2, 64, 64, 72), (1, 2, 64, 64, 256)]:
        for dt in (torch.bfloat16, torch.float16):
            q = torch.randn(b, sq, h, d, device="cuda", dtype=dt).transpose(1, 2)   # strided BHSD views
            k = torch.randn(b, h, sk, d, device="cuda", dtype=dt)
            v = torch.randn(b, sk, h, d, device="cuda", dtype=dt).transpose(1, 2)
            o, lse = attention_with_lse(q, k, v)
            ro, rl = _math(q, k, v, None, None)
            e = ((o.float() - ro.float()).norm() / ro.float().norm()).item()
            le = (lse - rl).abs().max().item()
            ok = e < 2e-2 and le < 1e-2 and lse.shape == rl.shape
            out.append(f"- {(b, h, sq, sk, d)} {dt}: {e:.2e} {le:.2e} {'OK' if ok else 'BAD'}")
            print(out[-1], flush=True)
    return out


def merge_rows():
    """merge_lse at one ring step's shapes: torch ops vs the Triton kernel (ms, GB/s of the kernel's one read
    of each input and one write, max abs difference)."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xdit_compile.runtime import _lse

    def torch_merge(a, la, b, lb, dtype):
        lse = torch.logaddexp(la, lb)
        r = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        o = a.float() * torch.exp(la - r).unsqueeze(-1) + b.float() * torch.exp(lb - r).unsqueeze(-1)
        return o.to(dtype), lse

    lines = ["", f"LSE merge of two partial outputs, {torch.cuda.get_device_name()} (accumulator float32, the "
             "new block bf16 in (B, S, H, D) memory as SDPA returns it):", "",
             "| shape (B, H, S, D) | into | torch ops ms | Triton kernel ms | kernel GB/s | max abs diff |",
             "|---|---|---|---|---|---|"]
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (b, h, sq, _, d) in SHAPES.items():
        acc = torch.randn(b, h, sq, d, device="cuda", generator=g)
        new = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        la = torch.randn(b, h, sq, device="cuda", generator=g)
        lb = torch.randn(b, h, sq, device="cuda", generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            t_ms = timed(torch_merge, acc, la, new, lb, dtype)
            k_ms = timed(_lse._merge_triton, acc, la, new, lb, dtype, False)
            ro, _ = torch_merge(acc, la, new, lb, dtype)
            ko, _ = _lse._merge_triton(acc, la, new, lb, dtype, False)
            nbytes = acc.numel() * (4 + 2 + torch.empty((), dtype=dtype).element_size()) + 3 * la.numel() * 4
            lines.append(f"| {name} {(b, h, sq, d)} | {str(dtype)[6:]} | {t_ms:.3f} | {k_ms:.3f} | "
                         f"{nbytes / k_ms / 1e6:.0f} | {(ko.float() - ro.float()).abs().max().item():.1e} |")
            print(lines[-1], flush=True)
    lines += ["", "A whole ring attention's merges: the ring degree K's partial outputs (bf16, (B, S, H, D) memory) "
              "merged block by block into a float32 accumulator (K - 1 merge_lse kernels, the last into bf16: the "
              "ring before session 28) against merge_lse_all's one kernel (each partial read once, bf16 written "
              "once):", "",
              "| shape (B, H, S, D) | K | K - 1 merges ms | one merge_lse_all ms | max abs diff |", "|---|---|---|---|---|"]
    for name, (b, h, sq, _, d) in SHAPES.items():
        k = int(name[-1])          # ring4: 4 blocks, u2xr2: 2
        outs = [torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                for _ in range(k)]
        lses = [torch.randn(b, h, sq, device="cuda", generator=g) for _ in range(k)]

        def blockwise():
            acc = None, None
            for i, (o, lse) in enumerate(zip(outs, lses)):
                acc = _lse.merge_lse(*acc, o, lse, out_dtype=torch.bfloat16 if i == k - 1 else None, inplace=i > 1)
            return acc

        def once():
            return _lse.merge_lse_all(outs, lses, torch.bfloat16)

        diff = (blockwise()[0].float() - once()[0].float()).abs().max().item()
        lines.append(f"| {name} {(b, h, sq, d)} | {k} | {timed(blockwise):.3f} | {timed(once):.3f} | {diff:.1e} |")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()

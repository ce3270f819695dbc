"""One GPU: compile.ce_in_place's producers write what the plain ops compute, where their transfer expects it, and
what that costs beside the own-piece copy it saves.

    python benchmarks/ce_in_place_check.py [--world 4] [--out $OUT/ce_in_place.md]

Under torch's fake process group (one process standing for rank 0 of --world ranks, as profile_step.py
--fake-world), at a FLUX 2048² ulysses rank's shapes (bf16, 24 x 128 heads, 16896 tokens):
- xdit::norm_rope_into (the Triton kernel writing this rank's rows of the (B, L, H, D) buffer) against
  xdit::norm_rope: bitwise;
- xdit::linears_into (FLUX's text and image v projections into those rows) against F.linear and cat;
- xdit::attention_into (flash_attn.cute's kernel writing through the strided view of this rank's heads) against
  flash_cute.attention into a fresh tensor (bitwise) and SDPA (relative error);
- the wait's views hold those values where the transfer's own piece belongs;
- us per call: norm_rope vs norm_rope_into, attention vs attention_into, and the own-piece copies they replace
  (the plain kinds' start under the fake group copies exactly that piece).
The multi-GPU transfers of these kinds are checked by benchmarks/ce_check.py.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gpu_util import timed_us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("fake", rank=0, world_size=args.world, store=FakeStore())
    import xdit_compile  # noqa: F401  (registers the ops)
    from xdit_compile.runtime import ce_a2a, flash_cute
    g, n, ops, bf = dist.group.WORLD.group_name, args.world, torch.ops.xdit, torch.bfloat16
    H, D, L, T = 24, 128, 16896, 512
    S, h = L // n, H // n
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=dev, generator=gen).to(bf)   # noqa: E731
    lines = [f"# compile.ce_in_place producers, one {torch.cuda.get_device_name(0)}, fake world {n}, FLUX 2048² "
             f"shapes (S = {S} tokens per rank, {h} heads per rank)", "", "| check | result |", "|---|---|"]

    # norm_rope (double block: text rows then image rows), per-head weights, cos / sin per token
    txt, img = rnd(1, T // n, H, D), rnd(1, S - T // n, H, D)
    wt, wi = rnd(D), rnd(D)
    freqs = [rnd(S, D // 2).float() for _ in range(4)]
    ref = ops.norm_rope([txt, img], [wt, wi], 1e-6, False, *freqs, False)
    got = ops.norm_rope_into([txt, img], [wt, wi], 1e-6, False, *freqs, False, g, "qi", 0)
    buf = ce_a2a._BUFS[next(k for k in ce_a2a._BUFS if k[1] == "qi")]["buf"]
    lines.append(f"| norm_rope_into == norm_rope (bitwise) | {torch.equal(got, ref)} |")
    lines.append(f"| ... at this rank's rows of the buffer | {got.data_ptr() == buf[:, :S].data_ptr()} |")
    tok = ops.a2a_start(got.transpose(1, 2), g, "qi", 0)
    recv = ops.a2a_wait([tok], [], g, "qi", 0)             # (B, h, L, D): this rank's heads, every rank's rows
    lines.append(f"| the wait's own piece is it (no copy) | {torch.equal(recv[:, :, :S], ref[:, :, :h].transpose(1, 2))} |")

    # v: the text and image projections (bias) one after another, into the vi buffer's rows
    xt_, xi_ = rnd(1, T // n, 3072), rnd(1, S - T // n, 3072)
    wv, bv, wa, ba = rnd(H * D, 3072) * 0.02, rnd(H * D), rnd(H * D, 3072) * 0.02, rnd(H * D)
    vref = torch.cat([F.linear(xt_, wa, ba), F.linear(xi_, wv, bv)], 1).unflatten(-1, (H, D))
    vgot = ops.linears_into([xt_, xi_], [wa, wv], [ba, bv], H, g, "vi", 0)
    lines.append(f"| linears_into == cat of F.linear (bitwise) | {torch.equal(vgot, vref)} |")
    if not torch.equal(vgot, vref):
        lines.append(f"| ... relative error | {((vgot.float() - vref.float()).norm() / vref.float().norm()).item():.2e} |")

    # attention of this rank's heads over all tokens, output into the oi buffer's heads
    q, k, v = (rnd(1, L, h, D).transpose(1, 2) for _ in range(3))      # (B, h, L, D), token-major
    fresh = flash_cute.attention(q, k, v)[0]
    sdpa = F.scaled_dot_product_attention(q, k, v)
    o = ops.attention_into(q, k, v, None, g, 0)
    lines.append(f"| attention_into == flash_cute into a new tensor (bitwise) | {torch.equal(o, fresh)} |")
    err = ((o.float() - sdpa.float()).norm() / sdpa.float().norm()).item()
    lines.append(f"| attention_into against SDPA, relative error | {err:.2e} |")
    lines.append(f"| output strides (B, h, L, D) | {tuple(o.stride())} |")
    tok = ops.a2a_start(o, g, "oi", 0)
    recv = ops.a2a_wait([tok], [], g, "oi", 0)             # (B, H, S', D): this rank's rows, every rank's heads
    lines.append(f"| the wait's own piece is it (no copy) | {torch.equal(recv[:, :h], fresh[:, :, :S])} |")

    # cost: the producers in place against plain + the own piece the plain start copies (GPU time: 10 calls in a
    # CUDA graph per replay, so the ops' Python does not count)
    def graphed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg):
            for _ in range(reps):
                fn()
        return lambda: timed_us(cg.replay, reps=1) / reps

    x_nr = ref.transpose(1, 2)
    t = {
        "norm_rope": graphed(lambda: ops.norm_rope([txt, img], [wt, wi], 1e-6, False, *freqs, False)),
        "norm_rope_into": graphed(lambda: ops.norm_rope_into([txt, img], [wt, wi], 1e-6, False, *freqs, False,
                                                             g, "qi", 0)),
        "q own-piece copy (plain start, fake group)": graphed(lambda: ops.a2a_start(x_nr, g, "q", 1)),
        "v: two F.linear + cat": graphed(lambda: torch.cat([F.linear(xt_, wa, ba), F.linear(xi_, wv, bv)], 1)),
        "linears_into": graphed(lambda: ops.linears_into([xt_, xi_], [wa, wv], [ba, bv], H, g, "vi", 0)),
        "v own-piece copy (plain start, fake group)": graphed(lambda: ops.a2a_start(vref.transpose(1, 2), g, "v", 1)),
        "attention (flash_cute)": graphed(lambda: flash_cute.attention(q, k, v)),
        "attention_into": graphed(lambda: ops.attention_into(q, k, v, None, g, 1)),
        "o own-piece copy (plain start, fake group)": graphed(lambda: ops.a2a_start(fresh, g, "o", 1)),
    }
    t = {name: f() for name, f in t.items()}
    lines += ["", "| kernel | us per call |", "|---|---|"] + [f"| {name} | {us:.1f} |" for name, us in t.items()]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""xdit::norm_rope: RMSNorm then an interleaved rotary embedding of q or k, one read and one write of memory.

Legend: B batch, S tokens (this rank's), H heads, D head dim, P = D / 2 rotation pairs.

    y   = rms_norm(x, weight, eps)              over each head (FLUX) or over the whole token (Wan)
    out = [y_e * ce - y_o * se,  y_o * co + y_e * so]    interleaved: pair i is (y[2i], y[2i+1])

``ce, se, co, so`` are the cosine / sine each half of a pair uses (FLUX: cos[2i], sin[2i], cos[2i+1], sin[2i+1];
Wan: cos[2i], sin[2i+1], cos[2i], sin[2i+1]). Several inputs (FLUX's double blocks: text then image) are
normalised with their own weights and written one after another along S, which is their ``torch.cat``.

Inductor fuses the same graph into one reduction kernel that runs at 0.8-1.3 TB/s on an H100; here one program
owns one token's [H, D] tile: one load, the reduction in registers, one store, at 2.0-2.7 TB/s (one rank's FLUX
2048² q under ulysses 4: 40.3 -> 21.4 us; Wan 480p: 150.7 -> 75.6 us; benchmarks/results/session13/norm_rope.md).

Rounding follows eager: y is rounded to x's dtype after the weight (``rms_norm``'s output; with round_first also
before it, as diffusers' own RMSNorm does), the rotation is computed in float32 and rounded once. One exception:
Wan's rotary has no ``.float()``, so with cos / sin in bf16 (a model cast with ``.to(bf16)``) eager rotates in
bf16 and this op, in float32, differs from it by about one bf16 rounding. Without Triton or off CUDA it is the
same math in torch ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the torch path below
    triton = None


if triton is not None:
    @triton.jit
    def _norm_rope_kernel(x_ptr, w_ptr, ce_ptr, se_ptr, co_ptr, so_ptr, out_ptr,
                          S, H, S_OUT, S_OFF,
                          sxb, sxs, sxh, sfb, sfs, sfp, eps,
                          HB: tl.constexpr, P: tl.constexpr, NORM_ALL: tl.constexpr, ROUND_FIRST: tl.constexpr):
        tok = tl.program_id(0)
        b = tok // S
        s = tok % S
        h = tl.arange(0, HB)
        d = tl.arange(0, 2 * P)
        hm = (h < H)[:, None]
        # the token's [H, D] tile in one contiguous-per-head load, split into the pairs' halves in registers
        x = tl.load(x_ptr + b.to(tl.int64) * sxb + s.to(tl.int64) * sxs + h[:, None] * sxh + d[None, :],
                    mask=hm, other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x, (HB, P, 2)))
        if NORM_ALL:
            r = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (H * 2 * P) + eps)
            w = tl.load(w_ptr + h[:, None] * (2 * P) + d[None, :], mask=hm, other=0.0).to(tl.float32)
            we, wo = tl.split(tl.reshape(w, (HB, P, 2)))
        else:
            r = tl.rsqrt(tl.sum(x * x, axis=1) / (2 * P) + eps)[:, None]
            w = tl.load(w_ptr + d).to(tl.float32)
            we, wo = tl.split(tl.reshape(w, (P, 2)))
            we = we[None, :]
            wo = wo[None, :]
        if ROUND_FIRST:           # diffusers' own RMSNorm rounds x * r before the weight
            xe = (xe * r).to(out_ptr.dtype.element_ty).to(tl.float32)
            xo = (xo * r).to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            xe = xe * r
            xo = xo * r
        ye = (xe * we).to(out_ptr.dtype.element_ty).to(tl.float32)   # the norm's output, rounded
        yo = (xo * wo).to(out_ptr.dtype.element_ty).to(tl.float32)
        p = tl.arange(0, P)
        f = b.to(tl.int64) * sfb + s.to(tl.int64) * sfs + p * sfp
        ce = tl.load(ce_ptr + f).to(tl.float32)[None, :]
        se = tl.load(se_ptr + f).to(tl.float32)[None, :]
        co = tl.load(co_ptr + f).to(tl.float32)[None, :]
        so = tl.load(so_ptr + f).to(tl.float32)[None, :]
        o = tl.reshape(tl.join(ye * ce - yo * se, yo * co + ye * so), (HB, 2 * P))
        o_base = out_ptr + (b.to(tl.int64) * S_OUT + S_OFF + s) * (H * 2 * P)
        tl.store(o_base + h[:, None] * (2 * P) + d[None, :], o.to(out_ptr.dtype.element_ty), mask=hm)


def _freq_view(f: Tensor, B: int, S: int, P: int) -> Tensor:
    """A cos / sin half broadcast to [B, S, P] (a view; stride 0 where it broadcasts)."""
    f = f.reshape(*([1] * max(0, 3 - f.dim())), *f.shape) if f.dim() < 3 else f
    if f.dim() == 4:                  # [B, S, 1, P] (heads broadcast)
        f = f.squeeze(2)
    return f.expand(B, S, P)


def _reference(xs, ws, eps, norm_all, freqs, round_first=False):
    ys = []
    for x, w in zip(xs, ws):
        shape = x.shape
        xf = x.flatten(2) if norm_all else x
        if round_first:
            y = xf * torch.rsqrt(xf.float().pow(2).mean(-1, keepdim=True) + eps)
            y = (y.to(w.dtype) * w).to(x.dtype).view(shape)
        else:
            y = torch.nn.functional.rms_norm(xf, (xf.shape[-1],), w, eps).view(shape)
        ys.append(y)
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
    B, S, H, D = y.shape
    ce, se, co, so = (_freq_view(f, B, S, D // 2).unsqueeze(2).float() for f in freqs)
    ye, yo = y.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([ye * ce - yo * se, yo * co + ye * so], dim=-1).flatten(3).to(y.dtype)


@torch.library.custom_op("xdit::norm_rope", mutates_args=())
def norm_rope(xs: list[Tensor], weights: list[Tensor], eps: float, norm_all: bool,
              ce: Tensor, se: Tensor, co: Tensor, so: Tensor, round_first: bool = False) -> Tensor:
    """xs: [B, S_i, H, D] each (any strides with a unit last stride); weights: [D] (per head) or [H * D]
    (norm_all); ce .. so: broadcastable to [B, sum S_i, P]; round_first: round x * rsqrt(...) to the weight's
    dtype before the weight (diffusers' own RMSNorm). Returns the contiguous [B, sum S_i, H, D]."""
    freqs = (ce, se, co, so)
    x0 = xs[0]
    if triton is None or not x0.is_cuda or any(x.stride(-1) != 1 for x in xs):
        return _reference(xs, weights, eps, norm_all, freqs, round_first)
    return _triton(xs, weights, eps, norm_all, freqs, round_first)


def norm_rope_out(out: Tensor, xs: list[Tensor], weights: list[Tensor], eps: float, norm_all: bool,
                  ce: Tensor, se: Tensor, co: Tensor, so: Tensor, round_first: bool = False) -> Tensor:
    """norm_rope written into ``out``, a [B, sum S_i, H, D] view whose rows are packed ([H, D] contiguous per token,
    tokens one after another) and whose batch stride may be larger (rows of a bigger buffer: ce_in_place.py)."""
    freqs = (ce, se, co, so)
    B, S, H, D = out.shape
    packed = out.stride(3) == 1 and out.stride(2) == D and out.stride(1) == H * D and out.stride(0) % (H * D) == 0
    if triton is None or not out.is_cuda or not packed or any(x.stride(-1) != 1 for x in xs):
        return out.copy_(_reference(xs, weights, eps, norm_all, freqs, round_first))
    return _triton(xs, weights, eps, norm_all, freqs, round_first, out)


def _triton(xs, weights, eps, norm_all, freqs, round_first, out=None):
    """The kernel launch (CUDA; also what tests/test_triton_interpret.py runs on CPU under TRITON_INTERPRET=1).
    out: where to write (norm_rope_out's packed rows), else a new contiguous tensor."""
    x0 = xs[0]
    B, _, H, D = x0.shape
    S_out = sum(x.shape[1] for x in xs)
    if out is None:
        out = torch.empty((B, S_out, H, D), device=x0.device, dtype=x0.dtype)
    s_stride = out.stride(0) // (H * D)     # tokens between two batch rows of out (S_out when it is contiguous)
    fv = [_freq_view(f, B, S_out, D // 2) for f in freqs]
    sfb, sfs, sfp = fv[0].stride()
    if any(f.stride() != fv[0].stride() for f in fv):
        fv = [f.contiguous() for f in fv]
        sfb, sfs, sfp = fv[0].stride()
    HB = triton.next_power_of_2(H)
    nw = 4 if HB * D <= 4096 else 8
    off = 0
    for x, w in zip(xs, weights):
        S = x.shape[1]
        if S:
            fp = [f[:, off:off + S] for f in fv]
            _norm_rope_kernel[(B * S,)](x, w, *fp, out, S, H, s_stride, off,
                                        x.stride(0), x.stride(1), x.stride(2), sfb, sfs, sfp, eps,
                                        HB=HB, P=D // 2, NORM_ALL=norm_all, ROUND_FIRST=round_first,
                                        num_warps=nw)
        off += S
    return out


@norm_rope.register_fake
def _(xs, weights, eps, norm_all, ce, se, co, so, round_first=False):
    B, _, H, D = xs[0].shape
    return xs[0].new_empty((B, sum(x.shape[1] for x in xs), H, D))

"""Local attention that also returns the log-sum-exp (LSE), and the LSE merge used by ring attention.

Shapes (suffix legend):
    B batch, H heads, Sq query tokens, Sk key tokens, D q/k head dim, Dv v head dim.
    q_BHSD (B, H, Sq, D); k_BHSD (B, H, Sk, D); v_BHSD (B, H, Sk, Dv); out_BHSD (B, H, Sq, Dv);
    lse_BHS (B, H, Sq), always float32; bias_BHSS an additive mask broadcastable to (B, H, Sq, Sk).

A query row whose keys are all masked has ``lse = -inf`` and ``out = 0`` here (the aten kernels return
lse = 0 for such rows on CPU, which the LSE merge would count as weight 1). The merge keeps ``-inf`` rows
NaN-free, so a row masked everywhere ends as 0, the same as ``F.scaled_dot_product_attention`` in torch 2.13.
"""

from __future__ import annotations

import importlib.util
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: merge_lse's torch path
    triton = None

__all__ = ["BACKENDS", "as_additive_mask", "attention_with_lse", "check_backend", "merge_lse", "merge_lse_all",
           "resolve_backend"]

BACKENDS = ("auto", "sdpa", "math", "flash_attn", "yunchang", "fa3_cute")

_OPTIONAL_PACKAGES = {"flash_attn": "flash_attn", "yunchang": "yunchang"}


def check_backend(backend: str) -> None:
    """ValueError for an unknown backend or one whose optional package is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; valid backends: {', '.join(BACKENDS)}")
    if backend == "fa3_cute":
        from . import flash_cute
        if not flash_cute.available():
            raise ValueError(
                "attention backend 'fa3_cute' needs flash_attn.cute and nvidia-cutlass-dsl importable and a Hopper "
                "(sm90) GPU (benchmarks/fa_cute_env.sh sets them up); use backend='auto', which picks it where it runs"
            )
        return
    package = _OPTIONAL_PACKAGES.get(backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"attention backend {backend!r} needs the optional package {package!r}, which is not installed; "
            f"install it or use backend='auto'"
        )


def resolve_backend(backend: str, device_type: str) -> str:
    """The plan's attention backend as run: "auto" is "fa3_cute" on CUDA where that kernel works (faster than cuDNN
    at every FLUX / Wan shape measured, benchmarks/attn_kernels.py; ``flash_cute.works`` tries it once), else
    "auto" (SDPA); an explicit backend whose package is missing is a ValueError here, at compile time."""
    if backend == "auto" and device_type == "cuda":
        from . import flash_cute
        return "fa3_cute" if flash_cute.works() else backend
    if backend != "auto":
        check_backend(backend)
    return backend


def as_additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = attend) as an additive bias (0 / -inf); a float mask cast to ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.tensor(float("-inf"), dtype=dtype, device=mask.device))
    return mask.to(dtype)


def attention_with_lse(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k/v with equal head counts; returns ``(out_BHSD, lse_BHS)``.

    ``mask`` is bool (True = attend) or additive, broadcastable to (B, H, Sq, Sk). Every fused kernel is
    tried inside ``try``; any failure falls back to a float32 math implementation.
    """
    check_backend(backend)
    bias = as_additive_mask(mask, q_BHSD.dtype)
    result = None
    if backend in ("flash_attn", "yunchang") and bias is None:
        result = _flash_attn_package(q_BHSD, k_BHSD, v_BHSD, scale)
    elif backend == "fa3_cute" and bias is None and q_BHSD.is_cuda and q_BHSD.dtype in (torch.float16, torch.bfloat16):
        from . import flash_cute
        result = flash_cute.attention(q_BHSD, k_BHSD, v_BHSD, scale, with_lse=True)
    elif backend != "math" and q_BHSD.size(-1) == v_BHSD.size(-1):
        kernel = _aten_cuda if q_BHSD.is_cuda else _aten_cpu
        try:
            result = kernel(q_BHSD, k_BHSD, v_BHSD, bias, scale)
        except RuntimeError:
            result = None
    if result is None:
        return _math(q_BHSD, k_BHSD, v_BHSD, bias, scale)
    out_BHSD, lse_BHS = result
    lse_BHS = lse_BHS.float()
    if bias is not None:
        # Fused kernels disagree on fully masked rows (CPU flash returns lse = 0): make them -inf / 0.
        dead = torch.isneginf(bias).all(dim=-1).expand_as(lse_BHS)
        lse_BHS = lse_BHS.masked_fill(dead, float("-inf"))
        out_BHSD = out_BHSD.masked_fill(dead.unsqueeze(-1), 0.0)
    return out_BHSD, lse_BHS


def merge_lse(
    out_acc: torch.Tensor | None, lse_acc: torch.Tensor | None, out_i: torch.Tensor, lse_i: torch.Tensor,
    out_dtype: torch.dtype | None = None, inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets: ``out = sum_i exp(lse_i - lse) * out_i``.

    The block-by-block merge ring attention used until session 28 (now merge_lse_all, once after the last block);
    kept for merging as blocks arrive without holding them all, and as benchmarks/lse_kernels.py's baseline.

    ``out_acc`` is ``None`` on the first block: then ``(out_i, lse_i)`` come back as they are (the accumulator
    may stay in out_i's dtype until the next merge, which reads it as float32, as it would the upcast copy).
    The result is float32, or ``out_dtype`` (the last block: rounded once, as a float32 accumulator cast at the
    end would be). ``inplace``: the caller owns ``out_acc`` / ``lse_acc`` (made by an earlier merge) and they may
    be overwritten. On CUDA with Triton this is one kernel (one read of each input, one write); the torch ops
    below make ~8 passes over the float32 accumulator.
    """
    if out_acc is None:
        return out_i, lse_i
    dtype = torch.float32 if out_dtype is None else out_dtype
    if triton is not None and out_i.is_cuda and out_i.dim() == 4 and out_acc.shape == out_i.shape:
        return _merge_triton(out_acc, lse_acc, out_i, lse_i, dtype, inplace)
    lse = torch.logaddexp(lse_acc, lse_i)
    # Rows with no visible key yet have lse = -inf; subtracting 0 there keeps both weights 0, not NaN.
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_acc = torch.exp(lse_acc - ref).unsqueeze(-1)
    w_i = torch.exp(lse_i - ref).unsqueeze(-1)
    return (out_acc.float() * w_acc + out_i.float() * w_i).to(dtype), lse


if triton is not None:
    @triton.jit
    def _rows(R, H, S, D, ROWS: tl.constexpr, DB: tl.constexpr):
        """This program's ROWS rows of the (B, H, S) query rows: the flat row, its mask, (b, h, s), the head-dim
        lanes and the (row, lane) mask."""
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rm = r < R
        d = tl.arange(0, DB)
        return r, rm, r // (H * S), (r // S) % H, r % S, d, rm[:, None] & (d < D)[None, :]

    @triton.jit
    def _merge_kernel(a_ptr, la_ptr, b_ptr, lb_ptr, o_ptr, lo_ptr, R, H, S, D,
                      sa0, sa1, sa2, sa3, sla0, sla1, sla2, sb0, sb1, sb2, sb3, slb0, slb1, slb2,
                      ROWS: tl.constexpr, DB: tl.constexpr):
        """ROWS query rows of (B, H, S) per program: out = a * exp(la - lse) + b * exp(lb - lse), lse written
        too; o / lo are contiguous (B, H, S, D) / (B, H, S)."""
        r, rm, bi, hi, si, d, m2 = _rows(R, H, S, D, ROWS, DB)
        la = tl.load(la_ptr + bi * sla0 + hi * sla1 + si * sla2, mask=rm, other=float("-inf")).to(tl.float32)
        lb = tl.load(lb_ptr + bi * slb0 + hi * slb1 + si * slb2, mask=rm, other=float("-inf")).to(tl.float32)
        mx = tl.maximum(la, lb)
        mref = tl.where(mx == float("-inf"), 0.0, mx)
        lse = tl.where(mx == float("-inf"), float("-inf"), mref + tl.log(tl.exp(la - mref) + tl.exp(lb - mref)))
        ref = tl.where(lse == float("-inf"), 0.0, lse)
        wa = tl.exp(la - ref)[:, None]
        wb = tl.exp(lb - ref)[:, None]
        a = tl.load(a_ptr + (bi * sa0 + hi * sa1 + si * sa2)[:, None] + d[None, :] * sa3, mask=m2, other=0.0)
        b = tl.load(b_ptr + (bi * sb0 + hi * sb1 + si * sb2)[:, None] + d[None, :] * sb3, mask=m2, other=0.0)
        o = a.to(tl.float32) * wa + b.to(tl.float32) * wb
        tl.store(o_ptr + r[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=m2)
        tl.store(lo_ptr + r, lse, mask=rm)


def _merge_triton(out_acc, lse_acc, out_i, lse_i, dtype, inplace):
    B, H, S, D = out_i.shape
    own = inplace and out_acc.dtype == dtype and out_acc.is_contiguous()
    out = out_acc if own else torch.empty((B, H, S, D), device=out_i.device, dtype=dtype)
    own_l = inplace and lse_acc.dtype == torch.float32 and lse_acc.is_contiguous()
    lse = lse_acc if own_l else torch.empty((B, H, S), device=out_i.device, dtype=torch.float32)
    lse_acc, lse_i = lse_acc.expand(B, H, S), lse_i.expand(B, H, S)
    R, DB = B * H * S, triton.next_power_of_2(D)
    rows = max(1, 4096 // DB)
    _merge_kernel[(triton.cdiv(R, rows),)](
        out_acc, lse_acc, out_i, lse_i, out, lse, R, H, S, D,
        *out_acc.stride(), *lse_acc.stride(), *out_i.stride(), *lse_i.stride(), ROWS=rows, DB=DB, num_warps=4)
    return out, lse


MERGE_MAX = 8   # partial outputs one merge_lse_all kernel reads (ring degrees above it merge in a torch pass)


def merge_lse_all(outs: list[torch.Tensor], lses: list[torch.Tensor], out_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine K partial attentions over disjoint key sets in one pass: ``lse = log sum_i exp(lse_i)``, ``out =
    sum_i exp(lse_i - lse) * out_i`` summed in float32 and rounded once to ``out_dtype``.

    What ring attention does once, after its last block: merging block by block (merge_lse) writes and reads a
    float32 accumulator K - 1 times; this reads each partial once and writes the output once (FLUX 2048² ring 4:
    ~130 MB per attention instead of ~340). Rows with no visible key (every lse_i = -inf) end as 0 with lse -inf.
    On CUDA with Triton, for K <= MERGE_MAX partials of one shape and strides, it is one kernel."""
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_lse_all: {len(outs)} outputs and {len(lses)} lse tensors; give one lse per output")
    B, H, S, D = outs[0].shape
    lses = [lse.expand(B, H, S) for lse in lses]
    if (triton is not None and outs[0].is_cuda and outs[0].dim() == 4 and len(outs) <= MERGE_MAX
            and all(o.shape == outs[0].shape and o.stride() == outs[0].stride() for o in outs)
            and all(lse.stride() == lses[0].stride() for lse in lses)):
        return _merge_all_triton(outs, lses, out_dtype)
    lse_K = torch.stack([lse.float() for lse in lses])
    lse = torch.logsumexp(lse_K, dim=0)        # -inf where every block is -inf
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.zeros((B, H, S, D), dtype=torch.float32, device=outs[0].device)
    for o, l in zip(outs, lses):
        out += o.float() * torch.exp(l - ref).unsqueeze(-1)
    return out.to(out_dtype), lse


if triton is not None:
    @triton.jit
    def _weight(l_ptr, lo, rm, mx, on: tl.constexpr):
        """exp(lse_i - mx) of one partial's rows, or 0 for a placeholder past K (no code for it: on is constexpr)."""
        if on:
            return tl.exp(tl.load(l_ptr + lo, mask=rm, other=float("-inf")).to(tl.float32) - mx)
        return 0.0

    @triton.jit
    def _lse_max(l_ptr, lo, rm, mx, on: tl.constexpr):
        if on:
            return tl.maximum(mx, tl.load(l_ptr + lo, mask=rm, other=float("-inf")).to(tl.float32))
        return mx

    @triton.jit
    def _add(acc, o_ptr, oo, m2, w, on: tl.constexpr):
        if on:
            return acc + tl.load(o_ptr + oo, mask=m2, other=0.0).to(tl.float32) * w[:, None]
        return acc

    @triton.jit
    def _merge_all_kernel(o0, o1, o2, o3, o4, o5, o6, o7, l0, l1, l2, l3, l4, l5, l6, l7, out_ptr, lse_ptr,
                          R, H, S, D, so0, so1, so2, so3, sl0, sl1, sl2,
                          K: tl.constexpr, ROWS: tl.constexpr, DB: tl.constexpr):
        """ROWS query rows of (B, H, S) per program: the K-way merge of merge_lse_all. Pointers past K are
        placeholders: K is a compile-time constant, so no code reads them (the first version loaded them under
        false masks and ran 0.088 against merge_lse's 0.072 ms for K = 2, session 29's lse_merge.md)."""
        r, rm, bi, hi, si, d, m2 = _rows(R, H, S, D, ROWS, DB)
        lo = bi * sl0 + hi * sl1 + si * sl2
        oo = (bi * so0 + hi * so1 + si * so2)[:, None] + d[None, :] * so3
        ninf = float("-inf")
        mx = tl.load(l0 + lo, mask=rm, other=ninf).to(tl.float32)
        mx = _lse_max(l1, lo, rm, mx, K > 1)
        mx = _lse_max(l2, lo, rm, mx, K > 2)
        mx = _lse_max(l3, lo, rm, mx, K > 3)
        mx = _lse_max(l4, lo, rm, mx, K > 4)
        mx = _lse_max(l5, lo, rm, mx, K > 5)
        mx = _lse_max(l6, lo, rm, mx, K > 6)
        mx = _lse_max(l7, lo, rm, mx, K > 7)
        mref = tl.where(mx == ninf, 0.0, mx)
        w0 = _weight(l0, lo, rm, mref, True)
        w1 = _weight(l1, lo, rm, mref, K > 1)
        w2 = _weight(l2, lo, rm, mref, K > 2)
        w3 = _weight(l3, lo, rm, mref, K > 3)
        w4 = _weight(l4, lo, rm, mref, K > 4)
        w5 = _weight(l5, lo, rm, mref, K > 5)
        w6 = _weight(l6, lo, rm, mref, K > 6)
        w7 = _weight(l7, lo, rm, mref, K > 7)
        tot = w0 + w1 + w2 + w3 + w4 + w5 + w6 + w7
        lse = tl.where(mx == ninf, ninf, mref + tl.log(tot))
        inv = tl.where(mx == ninf, 0.0, 1.0 / tot)        # exp(lse_i - lse) = w_i / tot
        acc = tl.zeros((ROWS, DB), dtype=tl.float32)
        acc = _add(acc, o0, oo, m2, w0 * inv, True)
        acc = _add(acc, o1, oo, m2, w1 * inv, K > 1)
        acc = _add(acc, o2, oo, m2, w2 * inv, K > 2)
        acc = _add(acc, o3, oo, m2, w3 * inv, K > 3)
        acc = _add(acc, o4, oo, m2, w4 * inv, K > 4)
        acc = _add(acc, o5, oo, m2, w5 * inv, K > 5)
        acc = _add(acc, o6, oo, m2, w6 * inv, K > 6)
        acc = _add(acc, o7, oo, m2, w7 * inv, K > 7)
        tl.store(out_ptr + r[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)
        tl.store(lse_ptr + r, lse, mask=rm)


def _merge_all_triton(outs, lses, dtype):
    B, H, S, D = outs[0].shape
    out = torch.empty((B, H, S, D), device=outs[0].device, dtype=dtype)
    lse = torch.empty((B, H, S), device=outs[0].device, dtype=torch.float32)
    k = len(outs)
    os_ = list(outs) + [outs[0]] * (MERGE_MAX - k)   # placeholders past K: never read
    ls_ = list(lses) + [lses[0]] * (MERGE_MAX - k)
    R, DB = B * H * S, triton.next_power_of_2(D)
    rows = max(1, 4096 // DB)
    _merge_all_kernel[(triton.cdiv(R, rows),)](*os_, *ls_, out, lse, R, H, S, D, *outs[0].stride(),
                                               *lses[0].stride(), K=k, ROWS=rows, DB=DB, num_warps=4)
    return out, lse


def _math(q_BHSD, k_BHSD, v_BHSD, bias, scale):
    scale = 1.0 / math.sqrt(q_BHSD.size(-1)) if scale is None else scale
    scores = torch.matmul(q_BHSD.float(), k_BHSD.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse_BHS = torch.logsumexp(scores, dim=-1)
    ref = torch.where(torch.isneginf(lse_BHS), torch.zeros_like(lse_BHS), lse_BHS)
    probs = torch.exp(scores - ref.unsqueeze(-1))
    out_BHSD = torch.matmul(probs, v_BHSD.float()).to(q_BHSD.dtype)
    return out_BHSD, lse_BHS


def _aten_cpu(q_BHSD, k_BHSD, v_BHSD, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_BHSD, k_BHSD, v_BHSD, attn_mask=bias, scale=scale
    )
    return out, lse


def _aten_cuda(q_BHSD, k_BHSD, v_BHSD, bias, scale):
    sq = q_BHSD.size(-2)
    if bias is None and q_BHSD.dtype in (torch.float16, torch.bfloat16):
        # cuDNN first: 1.8x the flash kernel at Flux's ring-step shapes on H100, same out and lse
        # (benchmarks/results/lse_kernels.md); flash where cuDNN refuses the shape.
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q_BHSD, k_BHSD, v_BHSD, None, True, 0.0, False, False, scale=scale)[:2]
            return out, _lse_BHS(lse, sq)
        except RuntimeError:
            pass
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q_BHSD, k_BHSD, v_BHSD, scale=scale)[:2]
            return out, lse
        except RuntimeError:  # e.g. a head dim flash does not support
            pass
    # cuDNN is not used for float32: it returned NaN without raising (torch 2.11, H100).
    # The mem-efficient kernel wants the bias materialised with its last dim 16-aligned in memory, as
    # F.scaled_dot_product_attention prepares it.
    if bias is not None:
        b, h, _, _ = q_BHSD.shape
        sk = k_BHSD.size(-2)
        pad = (-sk) % 16
        bias = bias.expand(b, h, sq, sk)
        bias = torch.nn.functional.pad(bias, (0, pad))[..., :sk] if pad else bias.contiguous()
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q_BHSD, k_BHSD, v_BHSD, bias, True, scale=scale
    )[:2]
    return out, _lse_BHS(lse, sq)


def _lse_BHS(lse, sq):
    # Mem-efficient pads Sq to a multiple of 32 (and other kernels have returned (B, H, Sq, 1)).
    if lse.dim() == 4:
        lse = lse[..., 0]
    return lse[..., :sq]


def _flash_attn_package(q_BHSD, k_BHSD, v_BHSD, scale):
    """flash-attn's kernel (B, S, H, D layout); ``None`` where it cannot run (CPU, float32)."""
    if not q_BHSD.is_cuda or q_BHSD.dtype not in (torch.float16, torch.bfloat16):
        return None
    from flash_attn import flash_attn_func  # import-guarded by check_backend

    out, lse, _ = flash_attn_func(
        q_BHSD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2),
        softmax_scale=scale, return_attn_probs=True,
    )
    return out.transpose(1, 2), lse

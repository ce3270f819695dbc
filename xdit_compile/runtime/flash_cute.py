"""flash_attn.cute's Hopper forward kernel (the FlashAttention-3 design, written in the CuTe DSL) on (B, H, S, D).

Optional: used only where ``flash_attn.cute`` and ``cutlass`` (nvidia-cutlass-dsl) import and the GPU is sm90
(``available()``). The kernel reads q/k/v through their strides (only the last dim must be contiguous), so the
(B, H, S, D) tensors the Ulysses all-to-all delivers go in as they are; the output has q's layout, as SDPA's
kernels give it (``_out_like``), and the log-sum-exp (B, H, S) float32 comes with it when asked for (ring steps merge on it).

The first call of a (dtype, head dims, GQA ratio, lse) combination compiles the kernel (seconds); later calls,
and CUDA-graph replays, launch it on the current stream.

``xdit::fa3_attention(q, k, v, scale)`` is the graph op the attention_kernel pass puts in place of SDPA when the
plan's attention backend resolves to "fa3_cute": the kernel on a CUDA tensor where ``available()``, elsewhere
(CPU, another GPU) ``F.scaled_dot_product_attention`` with the same arguments.

Measured (one H200, ``benchmarks/attn_kernels.py``, ``benchmarks/results/session17/``): against cuDNN, which SDPA
runs there, 3-8% faster at FLUX 1024² shapes, 4-12% at 2048², 11-18% at Wan 480p's; same error against cuDNN as
torch's FlashAttention-2 kernel (3e-3 relative); bitwise the same when replayed in a CUDA graph.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

__all__ = ["available", "attention", "fa3_attention", "works"]

_compiled: dict[tuple, object] = {}
# The kernel's tiling: (m_block, n_block, K/V pipeline stages, threads, intra-warpgroup overlap). flash_attn.cute's
# choice for non-causal sm90; benchmarks/fa_cute_tiles.py times the others.
CONFIG = (128, 192, 2, 384, True)


@functools.lru_cache(maxsize=None)
def _modules():
    """(cute, from_dlpack, cuda driver bindings, torch dtype -> cutlass dtype, kernel class), or None."""
    try:
        import cuda.bindings.driver as cuda
        import cutlass
        import cutlass.cute as cute
        from cutlass.cute.runtime import from_dlpack
        from flash_attn.cute.flash_fwd import FlashAttentionForwardSm90
    except Exception:       # not installed, or a broken install: the caller keeps its SDPA path
        return None
    dtypes = {torch.float16: cutlass.Float16, torch.bfloat16: cutlass.BFloat16}
    return cute, from_dlpack, cuda, dtypes, FlashAttentionForwardSm90


def available(device: torch.device | None = None) -> bool:
    """True where the kernel can run: the packages import and the GPU is Hopper (sm90)."""
    if not torch.cuda.is_available() or _modules() is None:
        return False
    index = torch.cuda.current_device() if device is None else torch.device(device).index
    return _sm90(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.lru_cache(maxsize=None)
def works(index: int | None = None) -> bool:
    """available(), and one small call of the kernel on this GPU matches SDPA (what "auto" asks before it picks the
    kernel: a flash_attn.cute / nvidia-cutlass-dsl pair of mismatched versions imports but fails to compile). The
    call uses the (bf16, head dim 128) kernel most models then reuse. A failure warns with its reason."""
    if not available(index):
        return False
    try:
        dev = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        q, k, v = (torch.randn(1, 2, 256, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        out = attention(q, k, v)[0].float()
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
        err = ((out - ref).norm() / ref.norm()).item()
        if err < 2e-2:
            return True
        reason = f"its output differs from SDPA's by {err:.1e}"
    except Exception as e:  # noqa: BLE001  (any failure means: keep SDPA)
        reason = f"{type(e).__name__}: {e}"
    warnings.warn(f"flash_attn.cute's kernel imports but does not work here ({reason}); attention backend "
                  "'auto' keeps SDPA", RuntimeWarning, stacklevel=2)
    return False


def _out_like(q_BHSD: torch.Tensor, dv: int) -> torch.Tensor:
    """The output in q's layout, as SDPA's kernels give it: (B, S, H, Dv) in memory (returned as its (B, H, S, Dv)
    view) when q is such a view, as diffusers' attention passes it (then the caller's transpose back and flatten
    are free), else (B, H, S, Dv) contiguous (the Ulysses buffers' layout)."""
    B, H, S, _ = q_BHSD.shape
    if H > 1 and S > 1 and q_BHSD.stride(1) < q_BHSD.stride(2):
        return q_BHSD.new_empty((B, S, H, dv)).transpose(1, 2)
    return q_BHSD.new_empty((B, H, S, dv))


def attention(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, scale: float | None = None,
              with_lse: bool = False, config: tuple | None = None,
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Non-causal attention, no mask: ``(out_BHSD, lse_BHS float32 or None)``, out in q's layout (``_out_like``).
    k/v may have fewer heads (GQA) when q's head count is a multiple of theirs. ``config``: a tiling in CONFIG's
    form (default CONFIG). ``out``: a (B, H, S, Dv) tensor to write instead (any strides, the last one 1, 16-byte
    aligned: ce_in_place.py writes into a receive buffer)."""
    mods = _modules()
    if mods is None:
        raise RuntimeError("flash_attn.cute is not importable: install flash-attn's cute package and "
                           "nvidia-cutlass-dsl, or use attention backend 'auto'")
    cute, from_dlpack, cuda, dtypes, Sm90 = mods
    B, H, S, D = q_BHSD.shape
    Hk, Dv = k_BHSD.size(1), v_BHSD.size(-1)
    if q_BHSD.dtype not in dtypes or not (q_BHSD.dtype == k_BHSD.dtype == v_BHSD.dtype):
        raise ValueError(f"flash_cute attention takes float16/bfloat16 q/k/v of one dtype, got "
                         f"{q_BHSD.dtype}/{k_BHSD.dtype}/{v_BHSD.dtype}")
    if H % Hk or D % 8 or Dv % 8 or max(D, Dv) > 256:
        raise ValueError(f"flash_cute attention: q heads {H} must be a multiple of k/v heads {Hk}, head dims "
                         f"{D}/{Dv} multiples of 8 and <= 256")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BHSD, k_BHSD, v_BHSD))
    if out is None:
        out = _out_like(q_BHSD, Dv)
    elif out.shape != (B, H, S, Dv) or out.stride(-1) != 1 or out.dtype != q.dtype:
        raise ValueError(f"flash_cute attention: out must be {(B, H, S, Dv)} {q.dtype} with a unit last stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device) if with_lse else None
    # The kernel's layout is (B, S, H, D): transposed views, the strides say where the data is.
    tq, tk, tv, to = (from_dlpack(t.transpose(1, 2).detach(), assumed_align=16).mark_layout_dynamic(leading_dim=3)
                      for t in (q, k, v, out))
    tl = from_dlpack(lse, assumed_align=4).mark_layout_dynamic(leading_dim=2) if with_lse else None
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    stream = cuda.CUstream(torch.cuda.current_stream(q.device).cuda_stream)
    m_block, n_block, stages, threads, overlap = CONFIG if config is None else config
    key = (q.dtype, D, Dv, H // Hk, with_lse, q.device.index, m_block, n_block, stages, threads, overlap)
    fn = _compiled.get(key)
    if fn is None:
        kernel = Sm90(dtypes[q.dtype], D, Dv, H // Hk, is_causal=False, is_local=False, pack_gqa=H != Hk,
                      m_block_size=m_block, n_block_size=n_block, num_stages=stages, num_threads=threads,
                      Q_in_regs=False, intra_wg_overlap=overlap)
        fn = _compiled[key] = cute.compile(kernel, tq, tk, tv, to, tl, scale, stream,
                                           None, None, None, None, None, None, None, None, None)
    fn(tq, tk, tv, to, tl, scale, stream, None, None, None, None, None, None, None, None, None)
    return out, lse


@torch.library.custom_op("xdit::fa3_attention", mutates_args=())
def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """SDPA without mask, dropout or causality (q/k/v (B, H, S, D), equal head counts): the kernel where it runs."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and available(q.device):
        return attention(q, k, v, scale)[0]
    out = _out_like(q, v.size(-1))      # the layout the fake promises
    return out.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))


@fa3_attention.register_fake
def _(q, k, v, scale=None):
    return _out_like(q, v.shape[-1])

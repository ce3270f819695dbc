"""Sequence-parallel attention as ``torch.library`` custom ops: Ulysses, ring and USP (Ulysses x ring).

Each op takes SDPA-style local shards and returns, for the local queries, what
``F.scaled_dot_product_attention`` over the whole sequence would. The ops have fake implementations, so a
graph calling ``torch.ops.xdit.*`` traces and compiles with Inductor (as opaque calls); the collectives run
eagerly inside them. Process groups are passed by name (``ProcessGroup.group_name``).

    torch.ops.xdit.ulysses_attention(q, k, v, attn_mask, scale, enable_gqa, group_name, seq_sizes, backend)
    torch.ops.xdit.ring_attention(q, k, v, attn_mask, scale, enable_gqa, group_name, seq_sizes, backend)
    torch.ops.xdit.usp_attention(q, k, v, attn_mask, scale, enable_gqa, ulysses_group, ring_group,
                                 seq_sizes, backend)

Legend (shape suffixes):
    B batch; Hq query heads; Hkv key/value heads; Hp heads padded to a multiple of the Ulysses degree;
    h heads per rank after the Ulysses all-to-all; N ranks in the group;
    S this rank's tokens (seq_sizes[rank]); Lg tokens of the Ulysses group; L tokens of all ranks;
    D q/k head dim; Dv v head dim; Q, K a mask's query and key dims.
    q_BHSD (B, Hq, S, D); k_BHSD (B, Hkv, S, D); v_BHSD (B, Hkv, S, Dv); out_BHSD (B, Hq, S, Dv);
    mask_BHQK (Bm, Hm, Q, K) with Bm in {1, B}, Hm in {1, Hq}.

Sequence layout: rank i holds ``seq_sizes[i]`` consecutive tokens of the (possibly permuted) sequence, in
group rank order; sizes may be uneven but not 0. q and k/v share the layout (self-attention only). For USP
the sp rank is ``ring_rank * ulysses_size + ulysses_rank`` and ``seq_sizes`` is over sp ranks.

Masks (bool, True = attend, or additive) of up to 4 dims, SDPA broadcasting. Every rank must pass the same
kind of mask; its token dims may be:
    key dim   1 (broadcast), S (this rank's keys, sharded like k) or L (all keys, in layout order);
    query dim 1 (broadcast), S (this rank's queries) or L (all queries; the op takes its rows).
A mask with both dims sharded (Q = K = S) is rejected: a rank would hold only the diagonal block. Pass a 2-D
mask with the key dim whole (e.g. (B, 1, S, L) or the unsharded (B, 1, L, L)). Ulysses needs every query row,
so a query-sharded mask is all-gathered (if some rank holds one token, where Q = 1 is ambiguous, the group
agrees by a one-element all-reduce; if every rank holds one token, Q = 1 means broadcast).

Limits: forward only (no autograd formula is registered); no causal masks, no dropout. A query row that sees
no key gives 0 from the ring (as CPU SDPA does); the Ulysses path gives whatever the local SDPA kernel gives
(CUDA SDPA in bf16 returned non-zero garbage for such rows).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._lse import as_additive_mask, attention_with_lse, check_backend, merge_lse_all

__all__ = [
    "comm_bytes",
    "ring_attention",
    "ulysses_attention",
    "usp_attention",
]


# --- the ops --------------------------------------------------------------------------------------------


@torch.library.custom_op("xdit::ulysses_attention", mutates_args=())
def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    scale: Optional[float],
    enable_gqa: bool,
    group_name: str,
    seq_sizes: Sequence[int],
    backend: str,
) -> Tensor:
    """All-to-all heads <-> sequence, attention over the whole sequence on h = Hp / N heads, all-to-all back."""
    _check_qkv(q, k, v, enable_gqa, backend)
    pg = _resolve(group_name)
    rank, sizes = _check_layout(q, pg, seq_sizes, "group_name")
    total = sum(sizes)
    mask = _prepare_mask(attn_mask, q, sizes[rank], total)
    q_BHSD, k_BHSD, v_BHSD, mask, gqa = _ulysses_in(q, k, v, mask, pg, rank, sizes, enable_gqa, total, 0)
    out_BHSD = _local_attention(q_BHSD, k_BHSD, v_BHSD, mask, scale, gqa, backend)
    return _ulysses_out(out_BHSD, pg, rank, sizes, q.size(1))


@torch.library.custom_op("xdit::ring_attention", mutates_args=())
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    scale: Optional[float],
    enable_gqa: bool,
    group_name: str,
    seq_sizes: Sequence[int],
    backend: str,
    transfer: str = "nccl",
) -> Tensor:
    """K/V blocks travel around the ring; per-block attention with LSE, merged exactly. transfer "copy_engine":
    k/v copied by the copy engines into every peer's buffer (runtime/ce_ring.py; equal shards, no mask)."""
    _check_qkv(q, k, v, enable_gqa, backend)
    pg = _resolve(group_name)
    rank, sizes = _check_layout(q, pg, seq_sizes, "group_name")
    if transfer == "copy_engine":
        if attn_mask is not None or len(set(sizes)) != 1:
            raise ValueError(f"ring_attention transfer 'copy_engine' takes equal shards and no mask (got seq_sizes "
                             f"{sizes}, mask {'given' if attn_mask is not None else 'none'}); use transfer 'nccl'")
        from .ce_ring import ring_ce
        return ring_ce(q, k, v, scale, group_name, backend).contiguous()
    if transfer != "nccl":
        raise ValueError(f"ring_attention: transfer {transfer!r} is not 'nccl' or 'copy_engine'")
    mask = _prepare_mask(attn_mask, q, sizes[rank], sum(sizes))
    return _ring(q, k, v, mask, scale, pg, rank, sizes, enable_gqa, backend).contiguous()


@torch.library.custom_op("xdit::usp_attention", mutates_args=())
def usp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    scale: Optional[float],
    enable_gqa: bool,
    ulysses_group: str,
    ring_group: str,
    seq_sizes: Sequence[int],
    backend: str,
) -> Tensor:
    """Ulysses all-to-all inside ``ulysses_group``, then ring attention over ``ring_group``."""
    _check_qkv(q, k, v, enable_gqa, backend)
    upg, rpg = _resolve(ulysses_group), _resolve(ring_group)
    num_u, num_r = upg.size(), rpg.size()
    sizes = _check_sizes(seq_sizes, num_u * num_r, "ulysses_group x ring_group")
    u_rank, r_rank = upg.rank(), rpg.rank()
    sp_rank = r_rank * num_u + u_rank
    if q.size(2) != sizes[sp_rank]:
        raise ValueError(
            f"q has {q.size(2)} tokens on sp rank {sp_rank} (ring {r_rank}, ulysses {u_rank}) but "
            f"seq_sizes[{sp_rank}] = {sizes[sp_rank]}"
        )
    group_sizes = sizes[r_rank * num_u : (r_rank + 1) * num_u]
    ring_sizes = [sum(sizes[j * num_u : (j + 1) * num_u]) for j in range(num_r)]
    total = sum(sizes)
    mask = _prepare_mask(attn_mask, q, sizes[sp_rank], total)
    q_BHSD, k_BHSD, v_BHSD, mask, gqa = _ulysses_in(
        q, k, v, mask, upg, u_rank, group_sizes, enable_gqa, total, sum(ring_sizes[:r_rank])
    )
    out_BHSD = _ring(q_BHSD, k_BHSD, v_BHSD, mask, scale, rpg, r_rank, ring_sizes, gqa, backend)
    return _ulysses_out(out_BHSD, upg, u_rank, group_sizes, q.size(1))


def _fake(q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.size(-1)))


for _op in (ulysses_attention, ring_attention, usp_attention):
    _op.register_fake(_fake)


# --- validation -----------------------------------------------------------------------------------------


def _resolve(group_name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(group_name)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool, backend: str) -> None:
    check_backend(backend)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, s, d = q.shape
    if k.shape[:3] != v.shape[:3] or k.size(0) != b or k.size(2) != s or k.size(3) != d:
        raise ValueError(
            f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}: sequence-parallel "
            f"attention is self-attention (q and k/v sharded alike)"
        )
    hkv = k.size(1)
    if hq != hkv and not (enable_gqa and hq % hkv == 0):
        raise ValueError(f"{hq} query heads and {hkv} key/value heads need enable_gqa=True and Hq % Hkv == 0")


def _check_sizes(seq_sizes: Sequence[int], num_ranks: int, what: str) -> list[int]:
    sizes = [int(s) for s in seq_sizes]
    if len(sizes) != num_ranks:
        raise ValueError(f"seq_sizes has {len(sizes)} entries but {what} has {num_ranks} ranks")
    if any(s < 1 for s in sizes):
        raise ValueError(f"seq_sizes must all be >= 1, got {sizes}")
    return sizes


def _check_layout(q: Tensor, pg: dist.ProcessGroup, seq_sizes: Sequence[int], what: str) -> tuple[int, list[int]]:
    sizes = _check_sizes(seq_sizes, pg.size(), what)
    rank = pg.rank()
    if q.size(2) != sizes[rank]:
        raise ValueError(f"q has {q.size(2)} tokens on rank {rank} but seq_sizes[{rank}] = {sizes[rank]}")
    return rank, sizes


def _prepare_mask(mask: Optional[Tensor], q: Tensor, local: int, total: int) -> Optional[Tensor]:
    """4-D mask with the key dim in {local, total} (a broadcast key dim is expanded to ``local``)."""
    if mask is None:
        return None
    if mask.dim() > 4:
        raise ValueError(f"attn_mask has {mask.dim()} dims; at most 4 (B, H, Q, K) are supported")
    mask_BHQK = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    bm, hm, qm, km = mask_BHQK.shape
    if bm not in (1, q.size(0)) or hm not in (1, q.size(1)):
        raise ValueError(f"attn_mask {tuple(mask.shape)} does not broadcast to batch {q.size(0)} x heads {q.size(1)}")
    if qm not in (1, local, total) or km not in (1, local, total):
        raise ValueError(
            f"attn_mask {tuple(mask.shape)}: its query and key dims must each be 1, this rank's {local} tokens "
            f"or all {total} tokens"
        )
    if qm == local and local not in (1, total) and km in (1, local):
        raise ValueError(
            f"attn_mask {tuple(mask.shape)} is sharded along both query and key dims, so this rank holds only "
            f"the diagonal block; pass the key dim whole ({total} tokens)"
        )
    if km == 1:
        # A broadcast key dim and a 1-token shard look alike; expanding makes every rank treat it as sharded.
        mask_BHQK = mask_BHQK.expand(bm, hm, qm, local)
    return mask_BHQK


# --- Ulysses --------------------------------------------------------------------------------------------


def _ulysses_in(q, k, v, mask, pg, rank, sizes, enable_gqa, total, group_offset):
    """Sequence-sharded (B, H, S, D) -> head-sharded (B, h, Lg, D), and the mask to match.

    Returns q, k, v, the mask (query dim 1 or Lg; key dim Lg or ``total``) and whether k/v still hold
    fewer heads than q (GQA left for the local kernel).
    """
    n = len(sizes)
    hq, hkv = q.size(1), k.size(1)
    gqa = hq != hkv and hq % n == 0 and hkv % n == 0  # whole kv groups per rank: send kv heads unrepeated
    if hq != hkv and not gqa:
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    hp = -(-hq // n) * n
    if hp != hq:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, hp - hq)) for x in (q, k, v))
    q_BHSD, k_BHSD, v_BHSD = _a2a_heads_to_seq([q, k, v], pg, sizes)
    if mask is not None:
        mask = _ulysses_mask(mask, pg, rank, sizes, hq, hp, total, group_offset)
    return q_BHSD, k_BHSD, v_BHSD, mask, gqa


def _ulysses_mask(mask_BHQK, pg, rank, sizes, hq, hp, total, group_offset):
    n, local, group_len = len(sizes), sizes[rank], sum(sizes)
    qm, km = mask_BHQK.size(2), mask_BHQK.size(3)
    rows_sharded = n > 1 and qm == local and local not in (1, total)
    if n > 1 and km == total and qm != total and min(sizes) == 1:
        # A 1-token rank cannot tell a sharded query dim (Q = 1) from a broadcast one: ask the group.
        flag = torch.tensor([float(rows_sharded)], device=mask_BHQK.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        rows_sharded = bool(flag.item())
    if qm == total and total != group_len:  # USP: the rows of this Ulysses group's queries
        mask_BHQK = mask_BHQK[:, :, group_offset : group_offset + group_len]
    # Gathers come before the head split: the other ranks' pieces must cover this rank's heads.
    if km == local and local != total and n > 1:
        mask_BHQK = _all_gather_dim(mask_BHQK, pg, sizes, dim=3)
    elif rows_sharded:
        mask_BHQK = _all_gather_dim(mask_BHQK, pg, sizes, dim=2)
    if mask_BHQK.size(1) == hq and hq > 1:
        h = hp // n
        if hp != hq:
            fill = True if mask_BHQK.dtype == torch.bool else 0.0  # padded heads are dropped; keep them finite
            pad = mask_BHQK.new_full((mask_BHQK.size(0), hp - hq, *mask_BHQK.shape[2:]), fill)
            mask_BHQK = torch.cat([mask_BHQK, pad], dim=1)
        mask_BHQK = mask_BHQK[:, rank * h : (rank + 1) * h]
    return mask_BHQK


def _ulysses_out(out_BHSD, pg, rank, sizes, num_heads):
    """Head-sharded (B, h, Lg, Dv) -> sequence-sharded (B, Hq, S, Dv), padded heads dropped."""
    n = len(sizes)
    if n > 1:
        b, h, _, dv = out_BHSD.shape
        send = torch.cat([part.reshape(-1) for part in out_BHSD.split(sizes, dim=2)])
        recv = send.new_empty(n * b * h * sizes[rank] * dv)
        dist.all_to_all_single(
            recv, send, [b * h * sizes[rank] * dv] * n, [b * h * s * dv for s in sizes], group=pg
        )
        out_BHSD = recv.view(n, b, h, sizes[rank], dv).transpose(0, 1).reshape(b, n * h, sizes[rank], dv)
    return out_BHSD[:, :num_heads].contiguous()


def _a2a_heads_to_seq(tensors: list[Tensor], pg, sizes: list[int]) -> list[Tensor]:
    """(B, Hx, S, Dx) each, Hx % N == 0 -> (B, Hx / N, Lg, Dx): one all-to-all for all of them."""
    n = len(sizes)
    if n == 1:
        return tensors
    b = tensors[0].size(0)
    # Row j of each (N, -1) view is what goes to rank j: its head chunk, this rank's tokens.
    chunks = [x.reshape(b, n, x.size(1) // n, x.size(2), x.size(3)).transpose(0, 1).reshape(n, -1) for x in tensors]
    send = torch.cat(chunks, dim=1).reshape(-1)
    per_token = [b * (x.size(1) // n) * x.size(3) for x in tensors]  # elements per token, per tensor
    recv_splits = [s * sum(per_token) for s in sizes]
    recv = send.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv, send, recv_splits, [send.numel() // n] * n, group=pg)
    outs: list[list[Tensor]] = [[] for _ in tensors]
    for s, piece in zip(sizes, recv.split(recv_splits)):
        for i, part in enumerate(piece.split([s * e for e in per_token])):
            x = tensors[i]
            outs[i].append(part.view(b, x.size(1) // n, s, x.size(3)))
    return [torch.cat(parts, dim=2) for parts in outs]


def _all_gather_dim(x: Tensor, pg, sizes: list[int], dim: int) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (uneven sizes: padded to the max for all_gather)."""
    longest = max(sizes)
    pad = longest - x.size(dim)
    if pad:
        pad_shape = list(x.shape)
        pad_shape[dim] = pad
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    x = x.contiguous()
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x, group=pg)
    return torch.cat([buf.narrow(dim, 0, s) for buf, s in zip(bufs, sizes)], dim=dim)


def _local_attention(q_BHSD, k_BHSD, v_BHSD, mask, scale, gqa, backend):
    if backend in ("auto", "sdpa"):
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q_BHSD.dtype)
        return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask, scale=scale, enable_gqa=gqa)
    k_BHSD, v_BHSD = _repeat_kv(q_BHSD, k_BHSD, v_BHSD)
    return attention_with_lse(q_BHSD, k_BHSD, v_BHSD, mask, scale, backend)[0]


def _repeat_kv(q_BHSD, k_BHSD, v_BHSD):
    rep = q_BHSD.size(1) // k_BHSD.size(1)
    if rep == 1:
        return k_BHSD, v_BHSD
    return k_BHSD.repeat_interleave(rep, dim=1), v_BHSD.repeat_interleave(rep, dim=1)


# --- ring -----------------------------------------------------------------------------------------------


def _ring(q_BHSD, k_BHSD, v_BHSD, mask, scale, pg, rank, sizes, enable_gqa, backend):
    """Attention of the local queries over every rank's k/v, which pass around the ring once."""
    n, local, total = len(sizes), sizes[rank], sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(n)]
    bias = None
    if mask is not None:
        if mask.size(3) == local and local != total:
            mask = _all_gather_dim(mask, pg, sizes, dim=3)
        if mask.size(2) == total and total != local:
            mask = mask[:, :, offsets[rank] : offsets[rank] + local]
        bias = as_additive_mask(mask, q_BHSD.dtype)
    # k and v travel as two buffers of one P2P batch (no concatenation copy), padded to the longest shard so
    # every step sends the same shapes.
    pad = max(sizes) - local
    kv = [F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous() for t in (k_BHSD, v_BHSD)]
    send_to = dist.get_global_rank(pg, (rank + 1) % n)
    recv_from = dist.get_global_rank(pg, (rank - 1) % n)
    outs, lses = [], []
    for step in range(n):
        reqs, incoming = [], None
        if step < n - 1:  # start the next transfer before computing on the current block
            incoming = [torch.empty_like(t) for t in kv]
            reqs = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, kv[0], send_to, pg), dist.P2POp(dist.irecv, incoming[0], recv_from, pg),
                 dist.P2POp(dist.isend, kv[1], send_to, pg), dist.P2POp(dist.irecv, incoming[1], recv_from, pg)]
            )
        src = (rank - step) % n
        k_blk, v_blk = kv[0][:, :, : sizes[src]], kv[1][:, :, : sizes[src]]
        if enable_gqa:
            k_blk, v_blk = _repeat_kv(q_BHSD, k_blk, v_blk)
        m_blk = None if bias is None else bias[..., offsets[src] : offsets[src] + sizes[src]]
        out_i, lse_i = attention_with_lse(q_BHSD, k_blk, v_blk, m_blk, scale, backend)
        outs.append(out_i)
        lses.append(lse_i)
        for req in reqs:
            req.wait()
        if incoming is not None:
            kv = incoming
    # every block's partial merged once (one read of each, one write in q's dtype), not block by block through a
    # float32 accumulator
    return merge_lse_all(outs, lses, q_BHSD.dtype)[0]


# --- communication volume -------------------------------------------------------------------------------


def comm_bytes(
    op_name: str,
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    dtype_size: int,
    seq_sizes: Sequence[int],
    group_size: int,
    *,
    v_head_dim: Optional[int] = None,
    enable_gqa: bool = False,
    ring_size: int = 1,
) -> list[int]:
    """Bytes each rank sends to other ranks for one call, as a list in rank order (sp rank order for USP).

    ``q_shape`` / ``k_shape`` give B, heads and head dim (their token dim is ignored; ``seq_sizes`` rules);
    ``v_head_dim`` defaults to k's. For ``usp_attention``, ``group_size`` is the Ulysses degree and
    ``ring_size`` the ring degree. Mask gathers (small for key-padding masks) are not counted.
    """
    b, hq, _, d = q_shape
    hkv = k_shape[1]
    dv = d if v_head_dim is None else v_head_dim
    sizes = [int(s) for s in seq_sizes]
    name = op_name.removeprefix("xdit::")
    if name == "ulysses_attention":
        elements = _ulysses_elements(b, hq, hkv, d, dv, sizes, enable_gqa)
    elif name == "ring_attention":
        elements = [_ring_elements(b, hkv, d, dv, sizes)] * len(sizes)
    elif name == "usp_attention":
        if len(sizes) != group_size * ring_size:
            raise ValueError(f"seq_sizes has {len(sizes)} entries, expected {group_size} x {ring_size}")
        ring_sizes = [sum(sizes[j * group_size : (j + 1) * group_size]) for j in range(ring_size)]
        hp = -(-hq // group_size) * group_size
        kv_direct = enable_gqa and hq != hkv and hq % group_size == 0 and hkv % group_size == 0
        ring = _ring_elements(b, (hkv if kv_direct else hp) // group_size, d, dv, ring_sizes)
        elements = []
        for j in range(ring_size):
            group = sizes[j * group_size : (j + 1) * group_size]
            elements += [u + ring for u in _ulysses_elements(b, hq, hkv, d, dv, group, enable_gqa)]
    else:
        raise ValueError(f"unknown op {op_name!r}; valid: ulysses_attention, ring_attention, usp_attention")
    return [e * dtype_size for e in elements]


def _ulysses_elements(b, hq, hkv, d, dv, sizes, enable_gqa) -> list[int]:
    n = len(sizes)
    hp = -(-hq // n) * n
    kv_direct = enable_gqa and hq != hkv and hq % n == 0 and hkv % n == 0
    h, hk = hp // n, (hkv if kv_direct else hp) // n
    total = sum(sizes)
    per_rank = []
    for s in sizes:
        scatter = (n - 1) * b * s * (h * d + hk * (d + dv))
        gather_back = b * h * dv * (total - s)
        per_rank.append(scatter + gather_back)
    return per_rank


def _ring_elements(b, hkv, d, dv, sizes) -> int:
    return (len(sizes) - 1) * b * hkv * max(sizes) * (d + dv)

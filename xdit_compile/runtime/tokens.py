"""Token-dim collectives used by the sharding pass: gather a sharded dim, all-reduce partial sums.

Both are `torch.library` custom ops with fake implementations, so graphs that call them can be run eagerly
or handed to Inductor (which treats them as opaque calls). Process groups travel by name.

    all_gather_cat(x, dim, group, sizes)   every rank's x (x.shape[dim] == sizes[rank]) concatenated in rank
                                           order along dim; uneven sizes are padded on the wire
    all_reduce_sum(x, group)               sum over the group (functional: returns a new tensor)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group


def _pg(name: str):
    return _resolve_process_group(name)


@torch.library.custom_op("xdit::all_gather_cat", mutates_args=())
def all_gather_cat(x: torch.Tensor, dim: int, group: str, sizes: list[int]) -> torch.Tensor:
    pg = _pg(group)
    n = max(sizes)
    x = x.contiguous()
    if x.shape[dim] < n:
        pad_shape = list(x.shape)
        pad_shape[dim] = n - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x, group=pg)
    return torch.cat([b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)], dim=dim)


@all_gather_cat.register_fake
def _(x, dim, group, sizes):
    shape = list(x.shape)
    shape[dim] = sum(sizes)
    return x.new_empty(shape)


@torch.library.custom_op("xdit::all_reduce_sum", mutates_args=())
def all_reduce_sum(x: torch.Tensor, group: str) -> torch.Tensor:
    y = x.contiguous().clone()
    dist.all_reduce(y, group=_pg(group))
    return y


@all_reduce_sum.register_fake
def _(x, group):
    return torch.empty_like(x)


def take(x: torch.Tensor, dim: int, index: tuple[int, ...]) -> torch.Tensor:
    """x restricted to `index` along dim (a narrow when the index is a contiguous run)."""
    if len(index) and list(index) == list(range(index[0], index[0] + len(index))):
        return x.narrow(dim, index[0], len(index))
    if not index:
        return x.narrow(dim, 0, 0)
    return torch.index_select(x, dim, torch.tensor(index, dtype=torch.long, device=x.device))


def gather(x: torch.Tensor, dim: int, group: str, sizes: list[int], perm: tuple[int, ...] | None) -> torch.Tensor:
    """Full tensor along dim from every rank's local part: all-gather, then a static reorder."""
    y = torch.ops.xdit.all_gather_cat(x, dim, group, sizes)
    if perm is not None:
        y = take(y, dim, perm)
    return y


def all_gather_stack(x: torch.Tensor, group: str, world: int) -> torch.Tensor:
    """(world, *x.shape): every rank's x, in group rank order (same shape on every rank)."""
    return torch.ops.xdit.all_gather_cat(x.unsqueeze(0), 0, group, [1] * world)


def gather_objects(obj, group: str | None = None) -> list:
    """Every rank's picklable object, in rank order (between our own processes only)."""
    pg = _pg(group) if group else None
    out = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, obj, group=pg)
    return out

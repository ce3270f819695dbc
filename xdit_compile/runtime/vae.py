"""Patch-parallel VAE decode (the DistVAE idea): each rank decodes a horizontal slab of the latent.

The latent (replicated on every rank of ``group``) is split along its height, unevenly when the height does
not divide, and each rank runs the unmodified diffusers decoder on its slab. For the duration of the decode,
hooks on the decoder's modules make the slab computation equal to the unsplit one:

    conv with kernel > 1 along H   runs on the slab with its own padding; a forward hook then exchanges
                                   halo rows with the neighbours (P2P) and recomputes the few output rows
                                   next to each neighbour from [halo, own edge rows]. The global top/bottom
                                   keep the conv's own padding; W, time and Wan's frame cache are untouched
                                   (the cache's rows travel with the halo). No padded copy of the slab.
    nn.GroupNorm                   statistics per (batch, group) combined over the ranks (one all_gather of
                                   count/mean/M2 per norm, Chan's parallel variance), then one normalisation
    attention over H*W pixels      (diffusers ``Attention`` in the mid-block, ``WanAttentionBlock``) its input
                                   is gathered along H before it and its output sliced back after it: a
                                   single low-resolution layer, so every rank attends over the full image
    the decoded image              gathered along H on every rank at the end

Nearest upsampling, 1x1 convs, per-pixel norms (``WanRMS_norm`` normalises over channels only), activations
and Wan's temporal feature cache need nothing: they are local to a pixel or a column of rows.

    images = parallel_decode(vae, latents, group)          # one call; every rank gets the full images
    with enable_parallel_decode(vae, group):               # or patch vae.decode (e.g. inside a pipeline)
        images = pipe(...).images
    disable_parallel_decode(vae)                           # what enable_parallel_decode installed

Inference only: gradients do not cross ranks. Tiling is switched off during a parallel decode (the slabs are
the tiling). Shapes: H is dim -2 of (B, C, H, W) images and (B, C, T, H, W) videos.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderKLWan
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

__all__ = ["ParallelDecode", "disable_parallel_decode", "enable_parallel_decode", "parallel_decode", "split_rows"]

# The submodules a decode runs, per supported VAE class (subclasses included).
DECODE_MODULES: dict[type[nn.Module], tuple[str, ...]] = {
    AutoencoderKL: ("post_quant_conv", "decoder"),
    AutoencoderKLWan: ("post_quant_conv", "decoder"),
}
# Modules that mix all H*W pixels: run on the gathered full-height input.
GATHERED_MODULES: tuple[type[nn.Module], ...] = (Attention, WanAttentionBlock)

_STATE_ATTR = "_xdit_parallel_decode"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def split_rows(height: int, num_ranks: int) -> list[int]:
    """Latent rows per rank: as even as possible, the first ``height % num_ranks`` ranks one more."""
    if height < num_ranks:
        raise ValueError(
            f"latent height {height} is smaller than the {num_ranks} ranks of the VAE group: every rank needs at "
            f"least one latent row; decode on a group of no more than {height} or with a taller latent"
        )
    base, extra = divmod(height, num_ranks)
    return [base + (r < extra) for r in range(num_ranks)]


@dataclass(frozen=True)
class _Slab:
    """Where this rank's rows lie; per decode call, passed to every hook."""

    group: dist.ProcessGroup
    rank: int
    rows: tuple[int, ...]  # latent rows per rank
    prev: int | None  # global rank of the neighbour above, None at the global top
    next: int | None  # global rank of the neighbour below, None at the global bottom

    @classmethod
    def create(cls, group: dist.ProcessGroup, height: int) -> _Slab:
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        return cls(
            group=group, rank=rank, rows=tuple(split_rows(height, n)),
            prev=dist.get_global_rank(group, rank - 1) if rank > 0 else None,
            next=dist.get_global_rank(group, rank + 1) if rank < n - 1 else None,
        )

    @property
    def offset(self) -> int:
        return sum(self.rows[: self.rank])

    def sizes(self, local_rows: int) -> list[int]:
        """Every rank's rows at the resolution where this rank has ``local_rows`` (decoders only upsample)."""
        scale, rest = divmod(local_rows, self.rows[self.rank])
        if rest or not scale:
            raise RuntimeError(
                f"rank {self.rank}: {local_rows} rows is not a whole multiple of its {self.rows[self.rank]} latent "
                "rows; patch-parallel decode supports decoders that only upsample by integer factors"
            )
        return [r * scale for r in self.rows]


# --- collectives (the only torch.distributed calls) -------------------------------------------------------


def _exchange_halos(
    first: torch.Tensor, last: torch.Tensor, slab: _Slab
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send this slab's ``first`` rows up and ``last`` rows down; return the rows just above this slab (the
    neighbour above's last rows) and just below it, None at the global top/bottom."""
    top = torch.empty_like(first) if slab.prev is not None else None
    bottom = torch.empty_like(last) if slab.next is not None else None
    ops = []
    if top is not None:
        ops += [dist.P2POp(dist.isend, first.contiguous(), slab.prev, slab.group),
                dist.P2POp(dist.irecv, top, slab.prev, slab.group)]
    if bottom is not None:
        ops += [dist.P2POp(dist.isend, last.contiguous(), slab.next, slab.group),
                dist.P2POp(dist.irecv, bottom, slab.next, slab.group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return top, bottom


def _gather_rows(x: torch.Tensor, slab: _Slab) -> torch.Tensor:
    """Every rank's slab concatenated along H in rank order (uneven slabs are padded on the wire)."""
    h = x.dim() - 2
    sizes = slab.sizes(x.shape[h])
    x = x.contiguous()
    if x.shape[h] < max(sizes):
        x = F.pad(x, (0, 0, 0, max(sizes) - x.shape[h]))
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x, group=slab.group)
    return torch.cat([b.narrow(h, 0, s) for b, s in zip(bufs, sizes)], dim=h)


def _global_group_stats(x: torch.Tensor, num_groups: int, slab: _Slab) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per (batch, group) over all ranks' slabs, float32, shape (B * G,)."""
    x_BGL = x.reshape(x.shape[0], num_groups, -1)
    if x.dtype in _LOW_PRECISION:  # float32 statistics from quarter-size upcast chunks: below the peak that
        # the norm's own output sets, where a whole float32 copy (2x the input's bytes) would raise it
        var, mean = (torch.cat(t, dim=1) for t in zip(*(
            torch.var_mean(chunk.float(), dim=-1, correction=0) for chunk in x_BGL.chunk(4, dim=1))))
    else:
        var, mean = torch.var_mean(x_BGL, dim=-1, correction=0)
    count = torch.full_like(mean, x_BGL.shape[-1])
    local = torch.stack([count, mean, var * count]).to(torch.float64)  # (3, B, G): n, mean, M2
    parts = [torch.empty_like(local) for _ in slab.rows]
    dist.all_gather(parts, local, group=slab.group)
    n_R, mean_R, m2_R = torch.stack(parts).unbind(1)
    total = n_R.sum(0)
    mean = (n_R * mean_R).sum(0) / total
    var = (m2_R + n_R * (mean_R - mean) ** 2).sum(0) / total
    return mean.flatten().float(), var.flatten().float()


# --- what the hooks do ------------------------------------------------------------------------------------


def _group_norm_forward(norm: nn.GroupNorm, slab: _Slab, x: torch.Tensor) -> torch.Tensor:
    mean, var = _global_group_stats(x, norm.num_groups, slab)
    b = x.shape[0]
    y = F.batch_norm(x.reshape(1, b * norm.num_groups, -1), mean, var, None, None, False, 0.0, norm.eps)
    y = y.reshape(x.shape)
    if not norm.affine:
        return y
    affine_shape = (1, -1) + (1,) * (x.dim() - 2)
    w, bias = norm.weight.view(affine_shape), norm.bias.view(affine_shape)
    if torch.is_grad_enabled():
        return y * w + bias
    return y.mul_(w).add_(bias)  # one full-size tensor, as the native kernel


def _conv_post_hook(module, args, kwargs, out, *, halo: int, slab: _Slab, who: str):
    """The conv already ran on the slab with its own padding, which is right except in the ``halo`` output
    rows next to a neighbour. Recompute those from [neighbour's halo rows, own first 2*halo rows] (and the
    mirror at the bottom): no slab-sized padded copy, so peak memory is the serial decode's over N."""
    x = args[0]
    h = x.dim() - 2
    rows = x.shape[h]
    if min(slab.sizes(rows)) < halo:
        raise ValueError(
            f"{who} needs {halo} halo rows but a rank holds only {min(slab.sizes(rows))} rows at this "
            "resolution; decode with fewer ranks or a taller latent"
        )
    # WanCausalConv3d(x, cache_x): the cached frames are rows of this slab too (used only when it pads time).
    # Their edge rows travel with x's in one message, concatenated along time.
    cache = args[1] if len(args) > 1 else kwargs.get("cache_x")
    parts = [cache, x] if (isinstance(module, WanCausalConv3d) and module._padding[4] > 0
                           and isinstance(cache, torch.Tensor)) else [x]

    def rows_of(start: int, num: int) -> torch.Tensor:
        pieces = [t.narrow(h, start, num) for t in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def conv(piece: torch.Tensor) -> torch.Tensor:  # the module's own forward (no hooks) on a few rows
        if len(parts) == 1:
            return module.forward(piece)
        c, p = piece.split([parts[0].shape[2], x.shape[2]], dim=2)
        return module.forward(p, c)

    top, bottom = _exchange_halos(rows_of(0, halo), rows_of(rows - halo, halo), slab)
    if rows < 2 * halo:  # a slab this thin is cheap to redo whole
        full = conv(torch.cat([t for t in (top, rows_of(0, rows), bottom) if t is not None], dim=h))
        return full.narrow(h, halo if top is not None else 0, rows)
    if top is not None:
        fixed = conv(torch.cat([top, rows_of(0, 2 * halo)], dim=h))
        out.narrow(h, 0, halo).copy_(fixed.narrow(h, halo, halo))
    if bottom is not None:
        fixed = conv(torch.cat([rows_of(rows - 2 * halo, 2 * halo), bottom], dim=h))
        out.narrow(h, rows - halo, halo).copy_(fixed.narrow(h, halo, halo))
    return out


def _gather_pre_hook(module, args, kwargs, *, slab: _Slab):
    x = args[0] if args else kwargs["hidden_states"]
    if x.dim() not in (4, 5):
        raise NotImplementedError(f"{type(module).__name__} input {tuple(x.shape)}: expected (B, C, [T,] H, W)")
    full = _gather_rows(x, slab)
    if args:
        return (full, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": full}


def _slice_post_hook(module, args, output, *, slab: _Slab):
    if not isinstance(output, torch.Tensor):
        raise NotImplementedError(f"{type(module).__name__} returned {type(output).__name__}; expected a tensor")
    h = output.dim() - 2
    scale = output.shape[h] // sum(slab.rows)
    return output.narrow(h, slab.offset * scale, slab.rows[slab.rank] * scale).contiguous()


# --- installing the hooks for one decode ------------------------------------------------------------------


def _decode_roots(vae: nn.Module) -> list[nn.Module]:
    for cls in type(vae).__mro__:
        if cls in DECODE_MODULES:
            return [m for m in (getattr(vae, name, None) for name in DECODE_MODULES[cls]) if m is not None]
    raise TypeError(
        f"patch-parallel decode does not support {type(vae).__name__}; supported: "
        f"{', '.join(c.__name__ for c in DECODE_MODULES)} (and subclasses)"
    )


def _h_padding(conv: nn.Module) -> int:
    if isinstance(conv, WanCausalConv3d):  # pads by hand in forward: (w, w, h, h, 2t, 0); self.padding is 0
        assert conv._padding[2] == conv._padding[3]
        return conv._padding[2]
    if isinstance(conv.padding, str):
        raise NotImplementedError(f"padding={conv.padding!r} (give it as numbers)")
    return conv.padding[-2]


def _patch_conv(name: str, conv: nn.Module, slab: _Slab) -> Callable[[], None] | None:
    k, s, d = conv.kernel_size[-2], conv.stride[-2], conv.dilation[-2]
    p = _h_padding(conv)
    if k == 1 and p == 0:
        return None
    if s != 1 or 2 * p != d * (k - 1):
        raise NotImplementedError(
            f"{name} ({type(conv).__name__}, kernel {k}, stride {s}, dilation {d}, padding {p}): patch-parallel "
            "decode supports only stride-1, size-preserving convs along H"
        )
    handle = conv.register_forward_hook(
        functools.partial(_conv_post_hook, halo=p, slab=slab, who=name), with_kwargs=True
    )
    return handle.remove


def _patch_group_norm(norm: nn.GroupNorm, slab: _Slab) -> Callable[[], None]:
    assert "forward" not in norm.__dict__, "GroupNorm forward already patched"
    norm.forward = functools.partial(_group_norm_forward, norm, slab)
    return lambda: norm.__dict__.pop("forward")


def _patch_gathered(module: nn.Module, slab: _Slab) -> Callable[[], None]:
    handles = [
        module.register_forward_pre_hook(functools.partial(_gather_pre_hook, slab=slab), with_kwargs=True),
        module.register_forward_hook(functools.partial(_slice_post_hook, slab=slab)),
    ]
    return lambda: [h.remove() for h in handles]


@contextlib.contextmanager
def _slab_hooks(vae: nn.Module, slab: _Slab) -> Iterator[None]:
    named = [(n, m) for root in _decode_roots(vae) for n, m in root.named_modules(prefix=type(root).__name__)]
    inside_gathered = {id(sub) for _, m in named if isinstance(m, GATHERED_MODULES) for sub in m.modules()}
    undo: list[Callable[[], None]] = []
    try:
        for name, m in named:
            if isinstance(m, GATHERED_MODULES):
                undo.append(_patch_gathered(m, slab))
            elif id(m) in inside_gathered:
                continue  # runs on the full gathered input: nothing to do
            elif isinstance(m, nn.GroupNorm):
                undo.append(_patch_group_norm(m, slab))
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                undo.append(_patch_conv(name, m, slab))
            elif isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                raise NotImplementedError(f"{name}: transposed convs are not supported by patch-parallel decode")
        saved_tiling = getattr(vae, "use_tiling", False)
        if saved_tiling:
            vae.use_tiling = False
            undo.append(lambda: setattr(vae, "use_tiling", saved_tiling))
        yield
    finally:
        for fn in reversed(undo):
            if fn is not None:
                fn()


# --- public API -------------------------------------------------------------------------------------------


def parallel_decode(vae: nn.Module, latents: torch.Tensor, group: dist.ProcessGroup | None = None,
                    **decode_kwargs: Any) -> torch.Tensor:
    """``vae.decode(latents).sample`` computed patch-parallel over ``group`` (default: the world).

    ``latents`` (B, C, H, W) or (B, C, T, H, W) must be the same on every rank of the group; every rank gets
    the full decoded images. Needs H >= the group size (each rank decodes at least one latent row).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("parallel_decode needs torch.distributed initialised (run under torchrun)")
    _decode_roots(vae)  # unsupported class: TypeError before anything else
    group = group if group is not None else dist.group.WORLD
    state: ParallelDecode | None = vae.__dict__.get(_STATE_ATTR)
    decode = state.original_decode if state is not None else vae.decode
    slab = _Slab.create(group, latents.shape[-2])
    if len(slab.rows) == 1:
        return decode(latents, return_dict=False, **decode_kwargs)[0]
    local = latents.narrow(-2, slab.offset, slab.rows[slab.rank])
    with _slab_hooks(vae, slab):
        out = decode(local, return_dict=False, **decode_kwargs)[0]
    return _gather_rows(out, slab)


class ParallelDecode:
    """What :func:`enable_parallel_decode` installed on a VAE; a context manager that removes it on exit."""

    def __init__(self, vae: nn.Module, group: dist.ProcessGroup | None) -> None:
        self.vae = vae
        self.group = group
        self._had_instance_decode = "decode" in vae.__dict__
        self.original_decode = vae.decode

    def _decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        sample = parallel_decode(self.vae, z, self.group, **kwargs)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def remove(self) -> None:
        if self.vae.__dict__.get(_STATE_ATTR) is not self:
            return
        if self._had_instance_decode:
            self.vae.decode = self.original_decode
        else:
            del self.vae.__dict__["decode"]
        del self.vae.__dict__[_STATE_ATTR]

    def __enter__(self) -> nn.Module:
        return self.vae

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enable_parallel_decode(vae: nn.Module, group: dist.ProcessGroup | None = None) -> ParallelDecode:
    """Make ``vae.decode`` patch-parallel over ``group`` until :func:`disable_parallel_decode` (or the
    returned handle's ``remove()`` / the end of its ``with`` block). Enabling again with the same group is a
    no-op; with another group, a ``ValueError``."""
    _decode_roots(vae)
    state: ParallelDecode | None = vae.__dict__.get(_STATE_ATTR)
    if state is not None:
        if state.group is not group:
            raise ValueError("parallel decode is already enabled on this VAE with another group; disable it first")
        return state
    state = ParallelDecode(vae, group)
    vae.__dict__[_STATE_ATTR] = state  # plain attributes: not submodules, not in the state dict
    vae.__dict__["decode"] = state._decode
    return state


def disable_parallel_decode(vae: nn.Module) -> bool:
    """Undo :func:`enable_parallel_decode`; returns whether it was enabled."""
    state: ParallelDecode | None = vae.__dict__.get(_STATE_ATTR)
    if state is None:
        return False
    state.remove()
    return True

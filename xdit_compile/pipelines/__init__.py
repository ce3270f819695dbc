"""diffusers pipelines: CFG over the cfg axis, prompts over the data axis, patch-parallel VAE decode.

parallelize(pipeline, plan) compiles `pipeline.transformer` (sequence parallelism, and for pipelines that
batch [uncond, cond] into one call, the split_cfg pass) and then, per the plan:

- cfg=2 on a pipeline that calls the transformer twice per step (TWO_CALL below: data, not code): the two
  calls run at the same time on the two halves of the ranks (`AlternatingCFG`);
- data>1: `pipeline(...)` splits its per-image arguments over the data groups and gathers the images, in
  order, on every rank (`DataParallelCall`);
- vae.parallel: the VAE decodes row slabs on all ranks (runtime/vae.py);
- pipefusion>1: each `pipeline(...)` call starts with `pipefusion.warmup_steps` full steps again.
"""
from __future__ import annotations

import torch

from ..runtime import tokens

def _true_cfg(default):
    return lambda kw: kw.get("true_cfg_scale", default) > 1 and (
        kw.get("negative_prompt") is not None or kw.get("negative_prompt_embeds") is not None)


def _guidance(default):
    return lambda kw: kw.get("guidance_scale", default) > 1


# Pipelines whose CFG is two transformer calls per step (cond, then uncond), not one batched call, and how
# a call's keyword arguments say that CFG is on (their defaults as in diffusers).
TWO_CALL = {
    "WanPipeline": _guidance(5.0), "WanImageToVideoPipeline": _guidance(5.0),
    "SkyReelsV2Pipeline": _guidance(6.0),
    "FluxPipeline": _true_cfg(1.0), "HunyuanVideoPipeline": _true_cfg(1.0),
    "QwenImagePipeline": _true_cfg(4.0), "QwenImageEditPipeline": _true_cfg(4.0),
}


def _sample(out):
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def _wrap_like(out_or_kwargs, x, return_dict):
    if not return_dict:
        return (x,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    return Transformer2DModelOutput(sample=x)


class AlternatingCFG:
    """Call 2k (cond) runs on cfg rank 0, call 2k+1 (uncond) on cfg rank 1, at the same time.

    The rank that skips a call returns a placeholder at once and goes on to the next call; after the
    second call of a pair both results are exchanged and the placeholder is filled in place, before the
    pipeline reads either (it combines them only after both calls)."""

    def __init__(self, forward, dims):
        self.forward, self.dims = forward, dims
        self.rank, self.group = dims.axis_rank("cfg"), dims.group_name("cfg")
        self.calls = 0
        self.first = None
        self.active = True

    def reset(self, active: bool = True):
        """At the start of each pipeline call: pairs restart; inactive (CFG off) = plain calls everywhere."""
        self.calls, self.first, self.active = 0, None, active

    def check_paired(self):
        if self.active and self.calls % 2:
            raise RuntimeError(f"cfg=2: the pipeline made {self.calls} transformer calls, not cond/uncond pairs; "
                               "its results are not valid. Is CFG on for this call?")

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.forward(*args, **kwargs)
        phase = self.calls % 2
        self.calls += 1
        return_dict = kwargs.get("return_dict", True)
        if phase == 0:
            if self.rank == 0:
                self.first = self.forward(*args, **kwargs)
            else:
                hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                self.first = _wrap_like(None, torch.empty_like(hs), return_dict)
            return self.first
        if self.rank == 1:
            out = self.forward(*args, **kwargs)
            mine = _sample(out)
            if _sample(self.first).shape != mine.shape or _sample(self.first).dtype != mine.dtype:
                raise RuntimeError("cfg=2 with two transformer calls per step needs the transformer output to "
                                   f"have the shape of hidden_states; got {tuple(mine.shape)} vs "
                                   f"{tuple(_sample(self.first).shape)}")
        else:
            out, mine = None, _sample(self.first)
        both = tokens.all_gather_stack(mine.contiguous(), self.group, 2)
        if self.rank == 1:
            _sample(self.first).copy_(both[0])
            return out
        return _wrap_like(None, both[1].clone(), return_dict)


# per-image arguments split over the data axis (lists, or tensors along dim 0)
_PER_IMAGE = ("prompt", "negative_prompt", "generator", "prompt_embeds", "negative_prompt_embeds",
              "prompt_attention_mask", "negative_prompt_attention_mask", "pooled_prompt_embeds",
              "negative_pooled_prompt_embeds", "latents", "class_labels")


class DataParallelCall:
    """pipeline(...) with its per-image arguments split over the data groups; images gathered in order."""

    def __init__(self, call, dims):
        self.call, self.dims = call, dims

    def __call__(self, pipe, *args, **kwargs):
        n, r = self.dims.axis_size("data"), self.dims.axis_rank("data")
        if args:
            raise TypeError("with parallel.data > 1, pass the pipeline's arguments by keyword")
        lengths = {k: len(v) for k, v in kwargs.items() if k in _PER_IMAGE and isinstance(v, (list, torch.Tensor))}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError("parallel.data > 1 splits the images of one call: give `prompt` (or class labels / "
                             f"embeddings) and `generator` as lists with one entry per image; got lengths {lengths}")
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise ValueError("parallel.data > 1 needs num_images_per_prompt=1 (repeat the prompt instead)")
        total = next(iter(lengths.values()))
        if total < n:
            raise ValueError(f"parallel.data={n} needs at least {n} images per call, got {total}")
        base, extra = divmod(total, n)
        start = r * base + min(r, extra)
        stop = start + base + (1 if r < extra else 0)
        mine = {k: (v[start:stop] if k in lengths else v) for k, v in kwargs.items()}
        out = self.call(pipe, **mine)
        field = "images" if hasattr(out, "images") else ("frames" if hasattr(out, "frames") else None)
        images = getattr(out, field) if field else out[0]
        parts = tokens.gather_objects(images, self.dims.group_name("data"))
        merged = []
        for p in parts:
            merged.extend(list(p))
        if isinstance(images, torch.Tensor):
            merged = torch.stack(merged)
        elif hasattr(images, "shape"):          # numpy
            import numpy as np
            merged = np.stack(merged)
        if field:
            setattr(out, field, merged)
            return out
        return (merged,)


def parallelize_pipeline(pipe, plan):
    from ..api import parallelize
    transformer = pipe.transformer
    parallelize(transformer, plan)
    compiler = transformer._xdit_compiler
    dims = compiler.dims
    cfg = None
    if dims.axis_size("cfg") > 1 and type(pipe).__name__ in TWO_CALL:
        compiler.cfg_external = True
        cfg = transformer._xdit_cfg = AlternatingCFG(transformer.forward, dims)
        transformer.forward = cfg
    if plan.vae.parallel and getattr(pipe, "vae", None) is not None:
        from ..runtime.vae import enable_parallel_decode
        enable_parallel_decode(pipe.vae, dims.get_group("replica") if dims.world_size > 1 else None)
    data = dims.axis_size("data") > 1
    pipefusion = dims.axis_size("pipefusion") > 1
    cache = compiler.cache if plan.cache.method != "none" else None
    if cfg is not None or data or pipefusion or cache is not None:
        cls = type(pipe)
        call = DataParallelCall(cls.__call__, dims) if data else cls.__call__
        cfg_on = TWO_CALL.get(cls.__name__)

        def __call__(self, *a, **k):
            if pipefusion and cfg is None and cfg_on is not None and cfg_on(k):
                raise ValueError(
                    f"{cls.__name__} with classifier-free guidance on calls the transformer twice per step (cond "
                    "and uncond), which would share one set of PipeFusion K/V buffers: set parallel.cfg = 2 "
                    "(each half of the ranks runs one of the two calls, with its own buffers), or call it with "
                    "guidance off")
            if pipefusion:      # a new denoising loop: warm-up steps again
                for r in compiler.pipefusion_runners:
                    r.reset()
            if cfg is not None:
                cfg.reset(active=cfg_on(k))
            if cache is not None:
                # One cache state per generation, so nothing leaks between calls; a state the caller entered
                # (xdit_compile.cache_state(...) as a context) is used as it is.
                own = cache.current is cache.default
                state = cache.new_state(num_steps=k.get("num_inference_steps")) if own else cache.current
                if cfg is None and cfg_on is not None and cfg_on(k):
                    state.branches = 2     # cond and uncond calls alternate on every rank: separate residuals
                if own:
                    with state:
                        out = call(self, *a, **k)
                else:
                    out = call(self, *a, **k)
                self._xdit_cache_state = state
            else:
                out = call(self, *a, **k)
            if cfg is not None:
                cfg.check_paired()
            return out
        pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
    return pipe

"""`xdit-compile run plan.toml`: load the plan's model, parallelize it, generate, write images + timings."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .digits import DigitsPipeline

BUILTINS = ("builtin:digits",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(model: str | None, dtype: str = "float32", device=None):
    """builtin:NAME, a local diffusers pipeline folder (model_index.json), or a hub id."""
    if not model:
        raise ValueError("the plan has no `model`; set model = \"builtin:digits\" or a diffusers folder")
    dt = _DTYPES[dtype]
    if model.startswith("builtin:"):
        if model != "builtin:digits":
            raise ValueError(f"unknown built-in model {model!r}; built-in models: {', '.join(BUILTINS)}")
        from ..builtin.digits import load_transformer
        pipe = DigitsPipeline(load_transformer(dt))
    else:
        from diffusers import DiffusionPipeline
        path = Path(model)
        if model.startswith((".", "/", "~")) or path.exists():
            if not (path.expanduser() / "model_index.json").is_file():
                raise ValueError(f"model path {model!r} is not a diffusers pipeline folder (no model_index.json)")
            pipe = DiffusionPipeline.from_pretrained(str(path.expanduser()), torch_dtype=dt)
        else:
            try:
                pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dt)
            except Exception as e:  # offline machines, typos
                raise ValueError(f"could not load model {model!r} (not a local folder; hub load failed: "
                                 f"{str(e).splitlines()[0][:200]})") from e
    if device is not None:
        if isinstance(pipe, DigitsPipeline):
            pipe.transformer.to(device)
        else:
            pipe = pipe.to(device)
    return pipe


class _Timer:
    """Wall time of each call of a callable (synchronising CUDA)."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)
        return out


def per_step_times(times: list, alternating_cfg=None) -> list:
    """Transformer call times -> one time per step. With cfg = 2 on a two-call pipeline (AlternatingCFG) a
    rank computes one call of each cond/uncond pair and returns a placeholder for the other at once; the
    pair, exchange included, is the step."""
    if alternating_cfg is not None and alternating_cfg.active and len(times) % 2 == 0:
        return [a + b for a, b in zip(times[0::2], times[1::2])]
    return list(times)


def build(plan, dims):
    """Load the plan's pipeline on this rank's device and parallelize it (compiled on the first call)."""
    import xdit_compile

    pipe = load_pipeline(plan.model, plan.dtype, dims.device)
    xdit_compile.parallelize(pipe, plan)
    return pipe


def generate(pipe, *, prompts, seed, num_inference_steps, guidance_scale, height=0, width=0,
             negative_prompt="", on_step=None):
    """One pipeline call, the same on every rank: image i uses ``Generator().manual_seed(seed + i)``.

    ``on_step(step, total)`` runs after each denoising step (1-based); raising in it stops the call.
    Returns the images (every rank: all of them, in order).
    """
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    kwargs = dict(prompt=list(prompts), generator=gens, num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, output_type="pt")
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    if isinstance(pipe, DigitsPipeline):
        pipe.progress = on_step
    else:
        if negative_prompt:
            kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
        if on_step is not None:
            def callback(p, i, t, kw):
                on_step(i + 1, num_inference_steps)
                return kw
            kwargs["callback_on_step_end"] = callback
    out = pipe(**kwargs)
    return out.images if hasattr(out, "images") else out[0]


def run(plan, *, progress: bool = True) -> dict:
    """Generate the plan's images. Returns {"images": tensor (rank 0: all images), "timing": {...}}."""
    from ..mesh import ParallelDims

    r = plan.run
    if plan.parallel.cfg > 1 and r.guidance_scale <= 1.0:
        raise ValueError(f"parallel.cfg={plan.parallel.cfg} splits classifier-free guidance, but "
                         f"run.guidance_scale={r.guidance_scale} turns it off; set guidance_scale > 1 or cfg = 1")
    dims = ParallelDims.from_plan(plan.parallel)
    t_start = time.perf_counter()
    pipe = build(plan, dims)
    tf = _Timer(pipe.transformer.forward)
    pipe.transformer.forward = tf
    vae_timer = None
    if getattr(pipe, "vae", None) is not None:
        vae_timer = _Timer(pipe.vae.decode)
        pipe.vae.decode = vae_timer
    prompts = r.prompts()
    bar = None
    if progress and dims.rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=r.num_inference_steps, desc=f"xdit run ({dims.world_size} procs)", unit="step")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=dims.rank != 0)
    t0 = time.perf_counter()
    images = generate(pipe, prompts=prompts, seed=r.seed, num_inference_steps=r.num_inference_steps,
                      guidance_scale=r.guidance_scale, height=r.height, width=r.width,
                      negative_prompt=r.negative_prompt,
                      on_step=(lambda i, n: bar.update(1)) if bar and isinstance(pipe, DigitsPipeline) else None)
    total = time.perf_counter() - t0
    if bar:
        bar.close()
    steps = per_step_times(tf.times, getattr(pipe.transformer, "_xdit_cfg", None))
    state = getattr(pipe, "_xdit_cache_state", None)
    cache = state.summary() if state is not None else None
    if state is not None and dims.rank == 0:
        print(state.format_summary())
    timing = {
        "transformer_ms_per_step_median": 1000 * sorted(steps)[len(steps) // 2] if steps else 0.0,
        "transformer_ms_first_call": 1000 * steps[0] if steps else 0.0,
        "transformer_calls": len(tf.times),
        "vae_ms": 1000 * sum(vae_timer.times) if vae_timer else 0.0,
        "total_s": total,
        "setup_s": t0 - t_start,
    }
    if cache is not None:
        timing["cache"] = {k: cache[k] for k in ("steps", "computed", "skipped", "skipped_steps")}
    if dims.rank == 0:
        _write(images, prompts, Path(r.output), timing, plan, dims)
    return {"images": images, "timing": timing}


def png_bytes(image) -> bytes:
    """One (C, H, W) image in [0, 1] as the PNG bytes ``_write`` saves."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(_u8(image)).save(buf, format="PNG")
    return buf.getvalue()


def _write(images, prompts, out: Path, timing, plan, dims):
    from PIL import Image
    out.mkdir(parents=True, exist_ok=True)
    imgs = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    imgs = imgs.float().clamp(0, 1)
    if imgs.dim() == 5:           # video frames (B, C, F, H, W): a GIF per video
        for i, v in enumerate(imgs):
            frames = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype("uint8").squeeze())
                      for f in v.permute(1, 0, 2, 3)]
            frames[0].save(out / f"video_{i:03d}.gif", save_all=True, append_images=frames[1:], duration=125)
    else:
        for i, im in enumerate(imgs):
            Image.fromarray(_u8(im)).save(out / f"image_{i:03d}.png")
        cols = min(len(imgs), 10)
        rows = (len(imgs) + cols - 1) // cols
        c, h, w = imgs.shape[1:]
        grid = torch.zeros(c, rows * h, cols * w)
        for i, im in enumerate(imgs):
            grid[:, (i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
        scale = max(1, 128 // max(h, 1))
        Image.fromarray(_u8(grid)).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(out / "grid.png")
    p = plan.parallel
    lines = ["| what | value |", "| --- | --- |",
             f"| plan | data={p.data} cfg={p.cfg} pipefusion={p.pipefusion} ring={p.ring} ulysses={p.ulysses} ({dims.world_size} procs, "
             f"{plan.compile.lowering}) |",
             f"| transformer ms/step (median) | {timing['transformer_ms_per_step_median']:.1f} |",
             f"| transformer first call ms (compile) | {timing['transformer_ms_first_call']:.1f} |",
             f"| VAE decode ms | {timing['vae_ms']:.1f} |",
             f"| total s | {timing['total_s']:.2f} |"]
    if "cache" in timing:
        c = timing["cache"]
        lines.append(f"| cache ({plan.cache.method}, threshold {plan.cache.threshold:g}) | {c['computed']} of "
                     f"{c['steps']} transformer calls computed, {c['skipped']} skipped |")
    (out / "timing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {len(imgs)} images to {out}/")


def _u8(im):
    a = (im.float().clamp(0, 1) * 255).round().to(torch.uint8)
    a = a.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a

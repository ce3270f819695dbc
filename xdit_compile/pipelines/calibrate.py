"""`xdit-compile calibrate plan.toml`: fit TeaCache's rescaling polynomial on the plan's model.

TeaCache decides from the relative L1 change of block 0's modulated input, but what matters is how much
the model's *output* changes. The polynomial maps one to the other. Calibration runs the plan's generation
with every step computed (mode "compute", identity coefficients), records per call x = the input change the
graph measured and y = the output change rel_L1(out_t, out_{t-1}) (per CFG branch), and fits
``numpy.polyfit(x, y, degree)``. The coefficients (highest degree first) go into the plan's [cache] section.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch


def calibrate(plan, *, degree: int = 4, progress: bool = False) -> dict:
    """Fit the coefficients on ``plan``'s model and [run] inputs. Returns {"coefficients", "points", "r2"}."""
    import xdit_compile
    from ..mesh import ParallelDims
    from ..plan import Plan
    from .run import load_pipeline

    d = plan.to_dict()
    d["cache"] = {**d.get("cache", {}), "method": "teacache", "threshold": 0.0, "coefficients": [1.0, 0.0]}
    plan = Plan.from_dict(d)
    dims = ParallelDims.from_plan(plan.parallel)
    pipe = load_pipeline(plan.model, plan.dtype, dims.device)
    xdit_compile.parallelize(pipe, plan)
    if getattr(pipe.transformer, "_xdit_cfg", None) is not None:
        raise ValueError("calibrate with parallel.cfg = 1 for this pipeline (its cond and uncond calls run on "
                         "different ranks under cfg = 2); give the processes to ulysses or ring instead")
    outputs: list[torch.Tensor] = []
    forward = pipe.transformer.forward

    def recording(*a, **k):
        out = forward(*a, **k)
        sample = out[0] if isinstance(out, tuple) else out.sample
        outputs.append(sample.detach().float().clone())
        return out

    pipe.transformer.forward = recording
    r = plan.run
    prompts = r.prompts()
    kwargs = dict(prompt=prompts, generator=[torch.Generator().manual_seed(r.seed + i) for i in range(len(prompts))],
                  num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale, output_type="pt")
    if r.height:
        kwargs["height"] = r.height
    if r.width:
        kwargs["width"] = r.width
    ctl = pipe.transformer._xdit_compiler.cache
    state = ctl.new_state(num_steps=r.num_inference_steps, force=lambda step: "compute")
    with state:                 # the pipeline uses the caller's state instead of opening its own
        pipe(**kwargs)
    xs, ys = [], []
    branches = max(state.branches, 1)
    for (graph, branch), slot in sorted(state.slots.items()):
        stats = [float(s) for s in slot.stat]
        outs = outputs[branch::branches]
        for t in range(1, min(len(stats), len(outs))):
            prev = outs[t - 1]
            xs.append(stats[t])
            ys.append(float((outs[t] - prev).abs().mean() / prev.abs().mean()))
    if len(xs) <= degree:
        raise ValueError(f"calibration needs more than {degree} steps; raise run.num_inference_steps")
    coeffs = np.polyfit(np.array(xs), np.array(ys), degree)
    pred = np.polyval(coeffs, np.array(xs))
    ss = float(((np.array(ys) - np.mean(ys)) ** 2).sum()) or 1.0
    r2 = 1.0 - float(((np.array(ys) - pred) ** 2).sum()) / ss
    return {"coefficients": [float(c) for c in coeffs], "points": list(zip(xs, ys)), "r2": r2}


def write_coefficients(path: str | Path, coefficients: list[float], out: str | Path | None = None) -> Path:
    """Set [cache] coefficients (and method = "teacache" if the plan has no method) in a TOML plan file."""
    path, out = Path(path), Path(out or path)
    if path.suffix.lower() != ".toml":
        raise ValueError(f"calibrate writes TOML plans; {path} is not one (paste the printed coefficients)")
    text = path.read_text(encoding="utf-8")
    line = "coefficients = [" + ", ".join(f"{c:.9g}" for c in coefficients) + "]"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"^\s*\[cache\]\s*(#.*)?$", ln)), None)
    if start is None:
        lines += ["", "[cache]", 'method = "teacache"', line]
    else:
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
        body = [ln for ln in lines[start + 1:end] if not re.match(r"^\s*coefficients\s*=", ln)]
        if not any(re.match(r"^\s*method\s*=", ln) for ln in body):
            body.insert(0, 'method = "teacache"')
        trailing = []
        while body and not body[-1].strip():
            trailing.append(body.pop())
        lines[start + 1:end] = body + [line] + trailing
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out

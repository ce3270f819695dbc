"""CPU cost of one call of a parallelized model, apart from its kernels: dynamo's guard checks.

FLUX.1-dev's block counts (19 double, 38 single: 1,160 parameter tensors) at tiny widths on CPU, world size 1,
Inductor. Guards are evaluated in C++ inside dynamo's frame wrapper, so that frame's own time (cProfile tottime)
is their cost; `--no-guards` compiles with torch.compiler.skip_all_guards_unsafe to show the floor (not what
parallelize does: dropping the module guards would skip the recompile when layers are swapped, e.g. LoRA).

    python benchmarks/call_overhead.py [--no-guards]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-guards", action="store_true")
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()

    import torch
    from diffusers import FluxTransformer2DModel

    import xdit_compile as xc
    from xdit_compile import api

    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=19, num_single_layers=38,
                               attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                               pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    s, t = 64, 16
    inputs = dict(hidden_states=torch.randn(1, s, 16), encoder_hidden_states=torch.randn(1, t, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(s, 3),
                  txt_ids=torch.zeros(t, 3), guidance=torch.tensor([3.5]), return_dict=False)
    if args.no_guards:
        compile_ = torch.compile

        def no_guards(*a, **kw):
            return compile_(*a, **{**kw, "options": {**(kw.get("options") or {}),
                                                     "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}})
        api.torch.compile = no_guards
    xc.parallelize(m, {"compile": {"lowering": "inductor"}})
    with torch.no_grad():
        for _ in range(3):
            m(**inputs)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            m(**inputs)
        per_call = (time.perf_counter() - t0) / args.calls * 1e3
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            m(**inputs)
        prof.disable()
    frame = sum(tt for (path, _, fn), (_, _, tt, _, _) in pstats.Stats(prof).stats.items()
                if fn == "compile_wrapper" and path.endswith("eval_frame.py"))
    params = sum(1 for _ in m.parameters())
    print(f"{params} parameter tensors; {per_call:.1f} ms per call (tiny widths: mostly Python and CPU kernels); "
          f"dynamo's frame (guard checks) {frame / args.calls * 1e3:.2f} ms per call"
          + (" with every guard skipped" if args.no_guards else ""))


if __name__ == "__main__":
    main()

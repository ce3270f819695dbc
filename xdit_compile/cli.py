"""xdit-compile command line.

    xdit-compile explain PLAN --model NAME_OR_FOLDER [--height H --width W] [--nproc N] [--dtype D]
    xdit-compile run PLAN [--nproc N] [--prompt P --steps S --seed X --output DIR]
    xdit-compile serve PLAN [--nproc N] [--host 127.0.0.1 --port 8000]   (see xdit_compile/serve/)

Runs one model under a plan and reports what the compiler did: on rank 0 it prints
``xdit_compile.explain(model)``, the relative error of the parallel output against the one-process
reference, and forward times. Runs under ``torchrun`` (one process per rank); ``--nproc N`` relaunches
itself through ``torch.distributed.run`` with N local processes (standalone rendezvous on localhost).

Mistakes (a bad plan, an unknown model, sizes the model can't take, degrees that don't fit the processes)
print one ``xdit-compile: error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake of the caller: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdit-compile", description="Sequence-parallel diffusers transformers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    e = sub.add_parser(
        "explain", help="parallelize a model with a plan, run it once, print what the compiler did",
        description="Build the model (same seed on every rank), compute the one-process reference, "
                    "parallelize it with the plan, run a forward and print explain(), the relative error "
                    "and forward times on rank 0. Run it under torchrun, or pass --nproc.")
    e.add_argument("plan", help="plan file (.toml, .yaml)")
    e.add_argument("--model", help="builtin model (flux-tiny, wan-tiny, pixart-tiny, flux-dev) or a local "
                                   "diffusers folder; default: the plan's 'model'")
    e.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    e.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    e.add_argument("--nproc", type=int, help="start this many local processes (torch.distributed.run)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    r = sub.add_parser(
        "run", help="generate with the plan's model (builtin:digits, a diffusers folder or hub id)",
        description="Load the plan's model, parallelize it with the plan, generate the [run] images and write "
                    "PNGs (GIFs for video), a grid and a timing table to run.output. Run it under torchrun, "
                    "or pass --nproc.")
    r.add_argument("plan", help="plan file (.toml, .yaml)")
    r.add_argument("--nproc", type=int, help="start this many local processes (torch.distributed.run)")
    r.add_argument("--prompt", help="overrides run.prompt")
    r.add_argument("--steps", type=int, help="overrides run.num_inference_steps")
    r.add_argument("--seed", type=int, help="overrides run.seed")
    r.add_argument("--output", help="overrides run.output")
    s = sub.add_parser(
        "serve", help="serve the plan's model over HTTP (OpenAI images API, jobs, health, metrics)",
        description="Start the worker ranks and an HTTP front for the plan's model. Limits come from the "
                    "plan's [serve] section; an API key, if any, from the environment variable it names.")
    s.add_argument("plan", help="plan file (.toml, .yaml)")
    s.add_argument("--nproc", type=int, help="worker ranks (default: the plan's world size)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                                                       "needs an API key)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    c = sub.add_parser(
        "calibrate", help="fit TeaCache's rescaling polynomial on the plan's model and write it into the plan",
        description="Run the plan's [run] generation with every step computed, fit the polynomial that maps "
                    "block 0's modulated-input change to the output change, and write [cache] coefficients "
                    "(and method = \"teacache\" if unset) into the plan file (or --write-to).")
    c.add_argument("plan", help="plan file (.toml)")
    c.add_argument("--nproc", type=int, help="start this many local processes (torch.distributed.run)")
    c.add_argument("--degree", type=int, default=4, help="polynomial degree (default 4, as TeaCache)")
    c.add_argument("--write-to", help="write the updated plan here instead of over PLAN")
    return p


def _serve_command(args) -> int:
    from .plan import load_plan
    from .serve import check_host, serve
    with _usage():
        plan = load_plan(args.plan)
        reason = plan.unsupported_reason()
        if reason:
            raise UsageError(reason)
        if not plan.model:
            raise UsageError(f"{args.plan} has no 'model'; set model = \"builtin:digits\" or a diffusers folder")
        nproc = plan.parallel.world_size if args.nproc is None else args.nproc
        if nproc < 1:
            raise UsageError(f"--nproc must be >= 1, got {nproc}")
        plan.check_world_size(nproc)
        if plan.parallel.cfg > 1 and plan.run.guidance_scale <= 1:
            raise UsageError(f"parallel.cfg={plan.parallel.cfg} splits classifier-free guidance, but "
                             f"run.guidance_scale={plan.run.guidance_scale} (the default) turns it off; set it > 1")
        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port must be 0..65535, got {args.port}")
        check_host(args.host, os.environ.get(plan.serve.api_key_env) or None, plan.serve.api_key_env)
    return serve(plan, nproc, args.host, args.port)


def _run_command(args, argv) -> int:
    from .plan import Plan, load_plan
    with _usage():
        plan = load_plan(args.plan)
        over = {k: v for k, v in (("prompt", args.prompt), ("num_inference_steps", args.steps),
                                  ("seed", args.seed), ("output", args.output)) if v is not None}
        if over:
            d = plan.to_dict()
            d["run"] = {**d.get("run", {}), **over}
            plan = Plan.from_dict(d)
        reason = plan.unsupported_reason()
        if reason:
            raise UsageError(reason)
        if not plan.model:
            raise UsageError(f"{args.plan} has no 'model'; set model = \"builtin:digits\" or a diffusers folder")
        if plan.parallel.cfg > 1 and plan.run.guidance_scale <= 1:
            raise UsageError(f"parallel.cfg={plan.parallel.cfg} splits classifier-free guidance, but "
                             f"run.guidance_scale={plan.run.guidance_scale} turns it off; set it > 1 or cfg = 1")
    need = plan.parallel.world_size
    if not _under_torchrun():
        if args.nproc is None and need > 1:
            raise UsageError(f"the plan needs {need} processes: pass --nproc {need}, "
                             f"or run under torchrun --nproc_per_node={need}")
        if args.nproc is not None and args.nproc != need:
            with _usage():
                plan.check_world_size(args.nproc)
        if args.nproc is not None and args.nproc > 1:
            return _relaunch(args.nproc, argv)
    from .pipelines.run import run
    with _usage():
        run(plan)
    return 0


def _calibrate_command(args, argv) -> int:
    from .plan import load_plan
    with _usage():
        plan = load_plan(args.plan)
        if not plan.model:
            raise UsageError(f"{args.plan} has no 'model'; set model = \"builtin:digits\" or a diffusers folder")
        if not str(args.plan).lower().endswith(".toml"):
            raise UsageError("calibrate writes TOML plans; use a .toml plan file")
        if args.degree < 1:
            raise UsageError(f"--degree must be >= 1, got {args.degree}")
    need = plan.parallel.world_size
    if not _under_torchrun():
        if args.nproc is None and need > 1:
            raise UsageError(f"the plan needs {need} processes: pass --nproc {need}")
        if args.nproc is not None and args.nproc != need:
            with _usage():
                plan.check_world_size(args.nproc)
        if args.nproc is not None and args.nproc > 1:
            return _relaunch(args.nproc, argv)
    from .pipelines.calibrate import calibrate, write_coefficients
    with _usage():
        fit = calibrate(plan, degree=args.degree)
    if _rank() == 0:
        out = write_coefficients(args.plan, fit["coefficients"], args.write_to)
        print(f"TeaCache coefficients from {len(fit['points'])} steps (R^2 {fit['r2']:.3f}): "
              f"{[round(c, 6) for c in fit['coefficients']]}; written to {out} [cache]")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run_command(args, argv)
        if args.command == "serve":
            return _serve_command(args)
        if args.command == "calibrate":
            return _calibrate_command(args, argv)
        return _explain(args, argv)
    except UsageError as e:
        if _rank() == 0:  # every rank finds the same mistake; one line is enough
            print(f"xdit-compile: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE


class _usage:
    """Turn the plan's and registry's ValueError / FileNotFoundError into a one-line UsageError."""

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if typ is not None and issubclass(typ, (ValueError, FileNotFoundError)):
            raise UsageError(" ".join(str(e).split()) or typ.__name__) from None
        return False


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _resolve(args):
    """(plan, spec, height, width): everything checkable without processes, checked before launching."""
    from . import models_registry
    from .plan import load_plan

    plan = load_plan(args.plan)
    name = args.model or plan.model
    if not name:
        raise UsageError(f"no model: pass --model ({', '.join(models_registry.names())} or a local diffusers "
                         f"folder) or set 'model' in {args.plan}")
    spec = models_registry.resolve(name)
    height, width = spec.check_size(args.height, args.width)
    reason = plan.unsupported_reason()
    if reason:
        raise UsageError(reason)
    return plan, spec, height, width


def _explain(args, argv) -> int:
    with _usage():
        plan, spec, height, width = _resolve(args)
    need = plan.parallel.world_size
    if not _under_torchrun():
        if args.nproc is None and need > 1:
            raise UsageError(f"the plan needs {need} processes: pass --nproc {need}, "
                             f"or run under torchrun --nproc_per_node={need}")
        if args.nproc is not None and args.nproc < 1:
            raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc is not None and args.nproc != need:
            with _usage():
                plan.check_world_size(args.nproc)  # the schema's message: degrees vs processes
        if args.nproc is not None and args.nproc > 1:
            return _relaunch(args.nproc, argv)
    elif args.nproc is not None and args.nproc != int(os.environ["WORLD_SIZE"]):
        raise UsageError(f"--nproc {args.nproc} but torchrun started {os.environ['WORLD_SIZE']} processes; "
                         f"drop --nproc under torchrun")
    return _run(plan, spec, height, width, args.dtype)


def _relaunch(nproc: int, argv: list[str]) -> int:
    """Run this command again in ``nproc`` local processes (minus --nproc) via torch.distributed.run."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    env = dict(os.environ)
    # torchrun would set 1 thread per process anyway, with a banner; share the cores out quietly instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "xdit_compile.cli", *rest]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


def _run(plan, spec, height, width, dtype_name) -> int:
    import torch
    import torch.distributed as dist
    from torch.utils._pytree import tree_leaves

    import xdit_compile
    from .mesh import ParallelDims

    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001  (quieter logs are a nicety)
        pass
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))

    with _usage():  # inits torch.distributed; degrees that don't fit: the same error on every rank
        dims = ParallelDims.from_plan(plan.parallel)
    device, rank, world = dims.device, dist.get_rank(), dist.get_world_size()
    cuda = device.type == "cuda"
    dtype = getattr(torch, dtype_name) if dtype_name else (torch.bfloat16 if cuda else torch.float32)

    from . import models_registry

    model, spec = models_registry.load(spec.path or spec.name, seed=0, device=device, dtype=dtype)
    if spec.path is None and world > 1:  # random weights: seeded alike, broadcast to be sure
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
    inputs = spec.inputs(height=height, width=width, device=device, dtype=dtype)

    def forward():
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs)
        if cuda:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    ref, _ = forward()
    ref, t_ref = forward()
    ref = [t.detach().float() for t in tree_leaves(ref) if isinstance(t, torch.Tensor)]

    xdit_compile.parallelize(model, plan)
    out, t_first = forward()
    out, t_par = forward()
    out = [t.detach().float() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]

    num = sum(float((o - r).norm()) ** 2 for o, r in zip(out, ref)) ** 0.5
    den = sum(float(r.norm()) ** 2 for r in ref) ** 0.5
    err = torch.tensor([num / den if den else num], dtype=torch.float64, device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    err = float(err.item())

    if rank == 0:
        p = plan.parallel
        degrees = ", ".join(f"{a}={getattr(p, a)}" for a in p.AXES if getattr(p, a) > 1) or "no parallelism"
        nparams = sum(t.numel() for t in model.parameters())
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
        print(f"model: {spec.name} ({spec.cls_name}, {nparams / 1e6:.2f}M parameters, {str(dtype)[6:]}) "
              f"at {height}x{width}: {shapes}")
        print(f"plan: {degrees}; {world} process(es) on {device.type}; attention {plan.attention.backend}, "
              f"lowering {plan.compile.lowering}")
        print(xdit_compile.explain(model))
        print(f"max relative error vs 1-process reference: {err:.3e} (over {world} rank(s))")
        print(f"forward: {t_par * 1e3:.1f} ms parallel ({t_first:.2f} s first call, with compile), "
              f"{t_ref * 1e3:.1f} ms 1-process reference")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

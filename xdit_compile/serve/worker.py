"""One worker rank of `xdit-compile serve`: ``python -m xdit_compile.serve.worker`` (started by the supervisor).

Talks to the front over an inherited socket (fd ``XDIT_SERVE_FD``), one JSON object per line, no pickle:

    front -> rank   {"type": "init", "rank", "world_size", "master_port"}  (a spare becomes a rank)
                    {"type": "job", "id": ID, "request": {...canonical GenerationRequest...}}
                    {"type": "cancel", "id": ID}
    rank -> front   {"type": "spare"} once the imports are done (the process waits for "init")
                    {"type": "ready"} once the pipeline is built; {"type": "hb"} every HEARTBEAT_S (a thread)
                    {"type": "step", "id", "step", "total"}  (rank 0, after each denoising step)
                    {"type": "done", "id", "ok": true, "images": [base64 PNG, ...] (rank 0 only)}
                    {"type": "done", "id", "ok": false, "error": {"type", "message"}}

Idle ranks wait on their own socket (a local queue), never inside a collective, so an idle server outlives
any collective timeout. With a job in hand, the ranks agree on it with a broadcast of its JSON bytes
(a length, then the bytes as a uint8 tensor) and check it against their own copy. After each step they
all-reduce a cancel flag, so a cancel stops every rank at the same step.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback

HEARTBEAT_S = 0.5


class Cancelled(Exception):
    pass


class Channel:
    """Line-delimited JSON over the inherited socket; a reader thread fills ``jobs`` and ``cancelled``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.lock = sock, threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.cancelled: set[str] = set()
        threading.Thread(target=self._read, daemon=True, name="xdit-serve-reader").start()

    def send(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        with self.lock:
            self.sock.sendall(data)

    def _read(self) -> None:
        buf = self.sock.makefile("rb")
        for line in buf:
            msg = json.loads(line)
            if msg.get("type") == "cancel":
                self.cancelled.add(str(msg.get("id")))
            else:
                self.jobs.put((msg, line))
        os._exit(0)  # the front is gone: nothing left to serve


def _heartbeat(chan: Channel) -> None:
    while True:
        chan.send({"type": "hb", "t": time.time()})
        time.sleep(HEARTBEAT_S)


def _agree(job_bytes: bytes, world: int, rank: int, device) -> bytes:
    """Rank 0's job bytes on every rank: tensor broadcasts of the length and the bytes (no pickle).
    ``device``: where the default group's collectives run (cuda for NCCL, cpu for gloo)."""
    import torch
    import torch.distributed as dist
    if world == 1:
        return job_bytes
    n = torch.tensor([len(job_bytes)], dtype=torch.int64, device=device)
    dist.broadcast(n, src=0)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=device)
    if rank == 0:
        buf.copy_(torch.frombuffer(bytearray(job_bytes), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy().tobytes())


def _fault(rank: int, step: int) -> None:
    """Test hook, off unless XDIT_SERVE_FAULT_FILE is set: a file {"rank": r, "step": s} raises once there."""
    path = os.environ.get("XDIT_SERVE_FAULT_FILE")
    if not path:
        return
    try:
        with open(path) as f:
            want = json.load(f)
    except (OSError, ValueError):  # no fault asked for, or the rank it names just took it
        return
    if want.get("rank") == rank and want.get("step") == step:
        os.remove(path)
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")


def serve_jobs(chan: Channel, plan, dims, pipe) -> None:
    import torch
    import torch.distributed as dist

    from ..pipelines.run import generate, png_bytes
    from .schema import GenerationRequest, Limits

    limits, rank, world = Limits.from_plan(plan), dims.rank, dims.world_size
    while True:
        msg, raw = chan.jobs.get()
        job_id = str(msg.get("id"))
        try:
            mine = json.dumps(msg.get("request"), sort_keys=True, separators=(",", ":")).encode()
            agreed = _agree(mine, world, rank, dims.device)
            if agreed != mine:
                raise RuntimeError(f"rank {rank} was sent a different request than rank 0")
            req = GenerationRequest.from_json(agreed, limits)

            def on_step(i, total):
                _fault(rank, i)
                stop = torch.tensor([1 if job_id in chan.cancelled else 0], dtype=torch.int32, device=dims.device)
                if world > 1:
                    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                if stop.item():
                    raise Cancelled(f"cancelled after step {i}")
                if rank == 0:
                    chan.send({"type": "step", "id": job_id, "step": i, "total": total})

            images = generate(pipe, prompts=[req.prompt] * req.n, seed=req.seed,
                              num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                              height=req.height, width=req.width, on_step=on_step)
            done = {"type": "done", "id": job_id, "ok": True}
            if rank == 0:
                imgs = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
                done["images"] = [base64.b64encode(png_bytes(im)).decode() for im in imgs]
            chan.send(done)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the front, named
            chan.send({"type": "done", "id": job_id, "ok": False,
                       "error": {"type": type(e).__name__, "message": str(e)[:500],
                                 "cancelled": isinstance(e, Cancelled)}})
            if not isinstance(e, Cancelled):
                traceback.print_exc()
        finally:
            chan.cancelled.discard(job_id)


def _warm_up(pipe, plan) -> None:
    """One 1-step image at the default size, so the first request does not pay the first compile."""
    from ..pipelines.run import generate
    from .schema import Limits

    limits = Limits.from_plan(plan)
    w, h = limits.default_size
    generate(pipe, prompts=[limits.labels[0] if limits.labels else "warm-up"], seed=0, num_inference_steps=1,
             guidance_scale=limits.default_guidance, height=h, width=w)


def main() -> None:
    sock = socket.socket(fileno=int(os.environ["XDIT_SERVE_FD"]))
    chan = Channel(sock)
    threading.Thread(target=_heartbeat, args=(chan,), daemon=True, name="xdit-serve-heartbeat").start()

    import torch

    from ..mesh import ParallelDims
    from ..pipelines.run import build
    from ..plan import Plan

    import diffusers
    import torch._dynamo  # noqa: F401 (imported ahead of need, like the pipeline classes below)
    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    plan = Plan.from_dict(json.loads(os.environ["XDIT_SERVE_PLAN"]))
    if plan.model == "builtin:digits":
        from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler  # noqa: F401
    else:  # the pipeline loader; its model classes load with the weights
        from diffusers import DiffusionPipeline  # noqa: F401
    # A spare until the supervisor gives this process a rank: the imports above are done ahead of need.
    chan.send({"type": "spare"})
    init, _ = chan.jobs.get()
    assert init.get("type") == "init", init
    os.environ.update(RANK=str(init["rank"]), LOCAL_RANK=str(init["rank"]), WORLD_SIZE=str(init["world_size"]),
                      LOCAL_WORLD_SIZE=str(init["world_size"]), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(init["master_port"]))
    t0 = time.perf_counter()
    dims = ParallelDims.from_plan(plan.parallel)
    t1 = time.perf_counter()
    pipe = build(plan, dims)
    t2 = time.perf_counter()
    _warm_up(pipe, plan)
    t3 = time.perf_counter()
    print(f"xdit-compile serve: rank {dims.rank} (pid {os.getpid()}) ready: process group {t1 - t0:.1f} s, "
          f"model {t2 - t1:.1f} s, warm-up {t3 - t2:.1f} s", file=sys.stderr, flush=True)
    chan.send({"type": "ready", "rank": dims.rank, "pid": os.getpid()})
    serve_jobs(chan, plan, dims, pipe)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)

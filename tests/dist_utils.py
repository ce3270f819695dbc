"""Run a function in N processes with a gloo process group, from plain pytest, on CPU.

    from dist_utils import run_distributed

    def _check(rank, world_size, x):          # top level in the test module, so workers can import it
        ...
        return something_picklable

    def test_it():
        results = run_distributed(_check, 4, 3.0)   # [rank 0's return, rank 1's, ...]

Workers are kept alive across tests, one pool per world size, so ``import torch``, the test module's
imports and process-group init are paid once per world size, not once per test (the suite runs on 2 cores).
Each worker is a torchrun look-alike: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set, the default
gloo group already initialised, one intra-op thread, Inductor compiling in-process.

Failures: if any rank raises, ``run_distributed`` raises ``DistributedError`` with that rank's traceback.
Ranks that do not answer within ``timeout`` (or within a short grace period after another rank raised,
since they are usually stuck in a collective waiting for it) are killed with their pool, and the next
call starts a fresh pool. A test that expects an error on every rank is cheaper written as ``fn`` catching
it and returning the message: a raise restarts the pool.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

__all__ = ["DistributedError", "run_distributed", "shutdown_pools"]

DEFAULT_TIMEOUT_S = 240.0
ERROR_GRACE_S = 5.0
"""After one rank raised, how long the others get to finish before they are presumed stuck."""

_WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TORCHINDUCTOR_COMPILE_THREADS": "1",  # no compile subprocess pool per worker on a 2-core machine
    "XDIT_TIMEOUT_S": "300",
}


class DistributedError(RuntimeError):
    """One or more ranks raised (``errors``: rank -> formatted traceback) or did not finish in time."""

    def __init__(self, message: str, errors: dict[int, str]) -> None:
        super().__init__(message)
        self.errors = errors


# --- worker side --------------------------------------------------------------------------------------


def _worker_main(rank: int, world_size: int, port: int, conn: Connection) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # The parent holds the TCPStore server (it bound port 0, so there is no race for a free port).
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300)
    )
    conn.send_bytes(pickle.dumps(("ready", None)))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            break
        if not message:
            break
        try:
            sys_path, task = pickle.loads(message)
            sys.path[:] = sys_path  # test modules collected after this pool started must be importable
            fn, args = pickle.loads(task)
            if "torch._dynamo" in sys.modules:
                torch._dynamo.reset()  # each task starts from a clean compile state
            reply = ("ok", fn(rank, world_size, *args))
            payload = pickle.dumps(reply)
        except BaseException:  # noqa: BLE001 - everything goes back to the test, with its traceback
            payload = pickle.dumps(("error", traceback.format_exc()))
        conn.send_bytes(payload)
    dist.destroy_process_group()


# --- parent side --------------------------------------------------------------------------------------


_CTX: list = []


def _context():
    """A fork server that has imported torch and diffusers once (tests/_worker_preload.py): a worker forked
    from it starts in well under a second instead of paying the imports. It starts at the first pool, with
    _WORKER_ENV in its environment (set before torch loads there), and lives until the test session ends."""
    if not _CTX:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["_worker_preload"])
        _CTX.append(ctx)
    return _CTX[0]


class _Pool:
    def __init__(self, world_size: int) -> None:
        import datetime

        import torch.distributed as dist

        self.world_size = world_size
        self.store = dist.TCPStore(
            "127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=60),
        )
        ctx = _context()
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        saved = {k: os.environ.get(k) for k in _WORKER_ENV}
        os.environ.update(_WORKER_ENV)  # spawn copies the environment at start(): set before torch loads
        try:
            for rank in range(world_size):
                parent_conn, child_conn = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main, args=(rank, world_size, self.store.port, child_conn),
                    name=f"dist-worker-{world_size}-{rank}",
                )
                proc.start()
                child_conn.close()
                self.conns.append(parent_conn)
                self.procs.append(proc)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _collect(self, timeout: float, what: str) -> tuple[dict[int, Any], dict[int, str], list[int]]:
        """Replies by rank; errors by rank; ranks that did not answer (the pool must then be dropped)."""
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        pending = dict(enumerate(self.conns))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending.values()), timeout=remaining):
                rank = next(r for r, c in pending.items() if c is conn)
                del pending[rank]
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    self.procs[rank].join(timeout=1)
                    status, value = "error", f"rank {rank} died during {what} (exit code {self.procs[rank].exitcode})"
                if status == "error":
                    errors[rank] = value
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
                else:
                    results[rank] = value
        return results, errors, sorted(pending)

    def start(self, timeout: float) -> None:
        _, errors, missing = self._collect(timeout, "process-group init")
        if errors or missing:
            self.close()
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise DistributedError(
                f"starting {self.world_size} gloo workers failed; ranks {missing} did not start\n{detail}", errors
            )

    def run(self, name: str, task: bytes, timeout: float) -> list[Any]:
        message = pickle.dumps((list(sys.path), task))
        for conn in self.conns:
            conn.send_bytes(message)
        results, errors, missing = self._collect(timeout, name)
        if errors or missing:
            # A raise may leave the other ranks in a collective, or the ranks' collective sequences out of
            # step: never reuse such a pool.
            self.close()
            raise DistributedError(_failure_message(name, self.world_size, timeout, errors, missing), errors)
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []


def _failure_message(name: str, world_size: int, timeout: float, errors: dict[int, str], missing: list[int]) -> str:
    lines = [f"{name} failed in {world_size} processes"]
    if errors:
        lines[0] += f": ranks {sorted(errors)} raised"
    if missing:
        why = "after another rank raised" if errors else f"within {timeout:.0f} s"
        lines.append(f"ranks {missing} did not finish {why} and were killed")
    shown: dict[str, list[int]] = {}
    for rank, tb in sorted(errors.items()):
        shown.setdefault(tb, []).append(rank)
    for tb, ranks in shown.items():  # identical tracebacks (the usual case) are printed once
        lines.append(f"--- rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} ---\n{tb.rstrip()}")
    return "\n".join(lines)


_POOLS: dict[int, _Pool] = {}


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results.

    ``fn`` must be a top-level function of an importable module; ``args`` and the results must pickle.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    task = pickle.dumps((fn, args))  # fails here, before any worker is involved, if fn or args don't pickle
    pool = _POOLS.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _Pool(world_size)
        try:
            pool.start(timeout)
        except BaseException:
            pool.close()
            raise
        _POOLS[world_size] = pool
    try:
        return pool.run(getattr(fn, "__qualname__", repr(fn)), task, timeout)
    except BaseException:  # a failed or interrupted run leaves the workers in an unknown state
        _POOLS.pop(world_size, None)
        pool.close()
        raise


def each_case(run_case: Callable[[Any], Any], cases: dict) -> dict:
    """In a worker: ``run_case`` on every case, an error caught per case as {"error": traceback} (a raise
    would restart the pool and lose the other cases' results)."""
    results = {}
    for key, case in cases.items():
        try:
            results[key] = run_case(case)
        except Exception:  # noqa: BLE001 - reported by the test of this case
            results[key] = {"error": traceback.format_exc()}
    return results


@atexit.register
def shutdown_pools() -> None:
    """Stop every worker (also registered to run at exit)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.close()

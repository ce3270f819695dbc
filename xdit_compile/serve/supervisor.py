"""The worker group of `xdit-compile serve`, watched from the front's event loop.

``WorkerGroup`` starts N ``python -m xdit_compile.serve.worker`` processes (RANK/WORLD_SIZE/MASTER_* set as
torchrun would, one socketpair each for control), reads their heartbeats, steps and results, and runs one
job at a time on all of them. A rank that exits (exit code or signal), stops sending heartbeats (SIGSTOP,
a hang), or fails while the others stay stuck in a collective takes the group down: the running job fails
with 503 naming the rank, every process of the group is killed and a fresh group is started (new port, new
process group). Nothing here blocks: processes are polled, sockets are asyncio streams.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .schema import ApiError

ERROR_GRACE_S = 2.0
"""After one rank reported an error, how long the others get to report before they count as stuck."""
EXIT_WINDOW_S = 0.3
"""After a rank reported an error: how long to look for a peer's exit that explains it."""
FIRST_HEARTBEAT_S = 120.0
"""Heartbeat timeout of a rank that is still starting (imports, model load, first compile)."""


def _log(msg: str) -> None:
    print(f"xdit-compile serve: {msg}", file=sys.stderr, flush=True)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Running:
    """The job on the ranks: per-rank reports, and two futures (the client's answer, the group's state)."""

    job_id: str
    on_step: object
    reports: dict = field(default_factory=dict)
    judged: bool = False
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    settled: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _Proc:
    """One worker process: a spare (imports done, no rank yet) until the group gives it a rank."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen, self.writer = popen, None
        self.rank: int | None = None
        self.gen = 0
        self.imported = asyncio.get_running_loop().create_future()
        self.started = time.monotonic()
        self.last_heartbeat: float | None = None

    def send(self, msg: dict) -> None:
        self.writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")


class WorkerGroup:
    def __init__(self, plan_dict: dict, nproc: int, *, heartbeat_timeout_s: float, env: dict | None = None) -> None:
        self.plan_dict, self.nproc = plan_dict, nproc
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.env = dict(os.environ if env is None else env)
        self.procs: list[_Proc] = []
        self.spares: list[_Proc] = []
        self.ready_ranks: set[int] = set()
        self.started_at = 0.0
        self.generation = 0
        self.restarts = 0
        self.dispatched = 0
        self.state = "stopped"      # starting | ready | restarting | stopped
        self.down_reason = "not started"
        self.ready_event = asyncio.Event()
        self.running: _Running | None = None
        self._failures_in_a_row = 0
        self._watch_task: asyncio.Task | None = None
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._watch_task = asyncio.create_task(self._watch())
        asyncio.create_task(self._form_group())

    def _top_up_spares(self) -> None:
        """Keep one group's worth of processes importing ahead of need, so a restart skips the imports."""
        self.spares = [p for p in self.spares if p.popen.poll() is None]
        while len(self.spares) < self.nproc and not self._closing:
            self.spares.append(self._start_process())

    def _start_process(self) -> _Proc:
        mine, theirs = socket.socketpair()
        env = {**self.env, "XDIT_SERVE_FD": str(theirs.fileno()), "XDIT_SERVE_PLAN": json.dumps(self.plan_dict)}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.nproc)))
        popen = subprocess.Popen([sys.executable, "-m", "xdit_compile.serve.worker"], env=env,
                                 pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        proc = _Proc(popen)

        async def read():  # the writer exists before `imported` resolves, so before anything is sent
            reader, proc.writer = await asyncio.open_connection(sock=mine, limit=64 * 1024 * 1024)
            await self._read(proc, reader)
        asyncio.create_task(read())
        return proc

    async def _form_group(self) -> None:
        """Give ranks to N spares once their imports are done; the ranks answer 'ready' when warmed up.
        New spares start only when the group is ready (on a small machine they would slow its start)."""
        self.generation += 1
        gen, port = self.generation, _free_port()
        self.state, self.ready_ranks = "starting", set()
        self.ready_event.clear()
        self.started_at = time.monotonic()
        procs: list[_Proc] = []
        self._top_up_spares()  # the first group, or spares not yet replaced: start them all now
        while len(procs) < self.nproc:
            self.spares = [p for p in self.spares if p.popen.poll() is None]
            if not self.spares:  # a spare died while importing: replace it
                self.spares.append(self._start_process())
            spare = self.spares.pop(0)
            try:
                await asyncio.wait_for(asyncio.shield(spare.imported), FIRST_HEARTBEAT_S)
            except asyncio.TimeoutError:
                await self._kill([spare])
                continue
            if spare.popen.poll() is None and spare.imported.result():
                procs.append(spare)
        if self._closing or gen != self.generation:
            return
        for rank, proc in enumerate(procs):
            proc.rank, proc.gen = rank, gen
            proc.last_heartbeat = time.monotonic()
            proc.send({"type": "init", "rank": rank, "world_size": self.nproc, "master_port": port})
        self.procs = procs
        _log(f"worker group {gen}: ranks 0..{self.nproc - 1} are pids {[p.popen.pid for p in procs]} (port {port})")

    async def close(self) -> None:
        self._closing = True
        if self._watch_task:
            self._watch_task.cancel()
        await self._kill(self.procs + self.spares)
        self.procs, self.spares = [], []
        self.state = "stopped"

    @staticmethod
    async def _kill(procs: list[_Proc]) -> None:
        for p in procs:
            if p.writer is not None:
                p.writer.close()
            if p.popen.poll() is None:
                p.popen.kill()  # SIGKILL also ends a SIGSTOPped process
        deadline = time.monotonic() + 10
        while any(p.popen.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _fail(self, reason: str) -> None:
        """A rank is down: fail the running job (503), kill the group, start a fresh one."""
        if self.state == "restarting" or self._closing:
            return
        _log(f"{reason}; restarting the worker group")
        self.state, self.down_reason = "restarting", reason
        self.ready_event.clear()
        run, self.running = self.running, None
        if run is not None:
            if not run.result.done():
                run.result.set_exception(ApiError(503, f"{reason}; the request was not completed",
                                                  code="worker_down"))
            if not run.settled.done():
                run.settled.set_result(None)
        procs, self.procs = self.procs, []
        await self._kill(procs)
        self.restarts += 1
        self._failures_in_a_row += 1
        if self._failures_in_a_row > 2:  # a group that cannot start (bad model, broken GPU): back off
            await asyncio.sleep(min(30.0, 2.0 ** (self._failures_in_a_row - 2)))
        if not self._closing:
            await self._form_group()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            for spare in self.spares:
                if spare.popen.poll() is not None and not spare.imported.done():
                    spare.imported.set_result(False)
            if self.state not in ("starting", "ready") or not self.procs:
                continue
            now = time.monotonic()
            for p in self.procs:
                code = p.popen.poll()
                if code is not None:
                    await self._fail(f"worker rank {p.rank} (pid {p.popen.pid}) {_describe_exit(code)}")
                    break
                # Starting ranks load C extensions and compile, which can hold the GIL for seconds.
                limit = self.heartbeat_timeout_s if self.state == "ready" else FIRST_HEARTBEAT_S
                if now - p.last_heartbeat > limit:
                    await self._fail(f"worker rank {p.rank} (pid {p.popen.pid}) sent no heartbeat for "
                                     f"{now - p.last_heartbeat:.1f} s (stopped or hung)")
                    break
            run = self.running
            if run is not None and run.reports and len(run.reports) < self.nproc:
                first = min(t for t, _ in run.reports.values())
                if now - first > ERROR_GRACE_S and any(not m.get("ok") for _, m in run.reports.values()):
                    missing = sorted(set(range(self.nproc)) - set(run.reports))
                    await self._fail(f"worker rank(s) {missing} did not finish after another rank failed")

    # --- messages from the ranks -------------------------------------------------------------------------

    async def _read(self, proc: _Proc, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, asyncio.LimitOverrunError, ValueError):
                line = b""
            if not line:
                if not proc.imported.done():
                    proc.imported.set_result(False)
                return  # EOF: the process is gone; _watch sees its exit code
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            kind = msg.get("type")
            if kind == "hb":
                proc.last_heartbeat = time.monotonic()
            elif kind == "spare":
                proc.imported.set_result(True)
            elif proc.rank is not None and proc.gen == self.generation:
                self._on_message(proc.rank, msg)

    def _on_message(self, rank: int, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ready":
            self.ready_ranks.add(rank)
            if len(self.ready_ranks) == self.nproc and self.state == "starting":
                self.state, self.down_reason = "ready", None
                self._failures_in_a_row = 0
                self.ready_event.set()
                self._top_up_spares()  # after, not during, the group's start: they share the cores
                _log(f"worker group {self.generation} ready ({time.monotonic() - self.started_at:.1f} s after "
                     f"it was formed)")
        elif kind in ("step", "done"):
            run = self.running
            if run is None or msg.get("id") != run.job_id:
                return
            if kind == "step":
                run.on_step(int(msg["step"]), int(msg["total"]))
            else:
                run.reports[rank] = (time.monotonic(), msg)
                self._on_done(run, rank, msg)

    def _on_done(self, run: _Running, rank: int, msg: dict) -> None:
        if not msg.get("ok") and not run.judged:
            run.judged = True
            asyncio.create_task(self._judge_error(run, rank, msg.get("error") or {}))
        if len(run.reports) == self.nproc:
            if not run.result.done() and all(m.get("ok") for _, m in run.reports.values()):
                run.result.set_result(run.reports[0][1].get("images") or [])
            if not run.settled.done():
                run.settled.set_result(None)
            if self.running is run:
                self.running = None

    async def _judge_error(self, run: _Running, rank: int, err: dict) -> None:
        """A rank failed. A peer that died makes the others fail too (a closed connection inside a collective),
        so wait a moment for an exit code before blaming the rank that spoke first."""
        if not err.get("cancelled"):
            await asyncio.sleep(EXIT_WINDOW_S)
            for p in self.procs:
                code = p.popen.poll()
                if code is not None and self.running is run:
                    await self._fail(f"worker rank {p.rank} (pid {p.popen.pid}) {_describe_exit(code)}")
        if run.result.done():
            return
        if err.get("cancelled"):
            run.result.set_exception(ApiError(499, "cancelled", code="cancelled"))
        else:
            run.result.set_exception(ApiError(500, f"worker rank {rank} raised {err.get('type')}: "
                                                   f"{err.get('message')}", code="worker_error"))

    # --- jobs ----------------------------------------------------------------------------------------------

    @property
    def spares_ready(self) -> int:
        """Spare processes with their imports done: a restart can use them at once."""
        return sum(1 for p in self.spares if p.imported.done() and p.imported.result() and p.popen.poll() is None)

    @property
    def workers_up(self) -> int:
        now = time.monotonic()
        return sum(1 for p in self.procs if p.popen.poll() is None and p.rank in self.ready_ranks
                   and now - p.last_heartbeat <= self.heartbeat_timeout_s)

    def _send_all(self, msg: dict) -> None:
        for p in self.procs:
            p.send(msg)

    async def run(self, job_id: str, request: dict, on_step) -> tuple[asyncio.Future, asyncio.Future]:
        """Send a job to every rank (the group must be ready): (result future, settled future)."""
        assert self.state == "ready" and self.running is None
        run = _Running(job_id=job_id, on_step=on_step)
        self.running = run
        self.dispatched += 1
        self._send_all({"type": "job", "id": job_id, "request": request})
        return run.result, run.settled

    def cancel(self, job_id: str) -> None:
        if self.running is not None and self.running.job_id == job_id:
            self._send_all({"type": "cancel", "id": job_id})

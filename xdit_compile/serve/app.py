"""The HTTP front of `xdit-compile serve`: routes, the bounded queue, jobs, auth and metrics.

Every generation is a ``Job`` (the OpenAI endpoint waits for its own job; the job API returns its id at
once). Jobs wait in a bounded deque (full: 429 + Retry-After); one dispatcher task hands them to the
``WorkerGroup`` one at a time. Nothing here waits on the ranks except through futures, so health probes,
metrics and new requests are answered while the ranks work.

    POST   /v1/images/generations      OpenAI images API (response_format b64_json), waits for the images
    POST   /v1/jobs                    same body; 202 {"id", "status": "queued", ...}
    GET    /v1/jobs/{id}               status and progress {"step", "total"}
    GET    /v1/jobs/{id}/result        the images, in the OpenAI response shape (also in output_dir/{id}/)
    GET    /v1/jobs/{id}/events        server-sent events: one "step" per denoising step, then
                                       "completed" (or "failed" / "cancelled")
    POST   /v1/jobs/{id}/cancel        (or DELETE /v1/jobs/{id}) cancel a queued or running job
    GET    /health/live, /health/ready, /metrics
"""
from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .http import EventStream, HttpError, Request, Response
from .metrics import Metrics
from .schema import MAX_BODY_BYTES, ApiError, GenerationRequest, Limits, parse_request
from .supervisor import WorkerGroup

KEEP_JOBS = 1024
"""Finished jobs remembered for status and result queries (their files stay in output_dir)."""
_JOB_PATH = re.compile(r"^/v1/jobs/([0-9a-f]{32})(/result|/events|/cancel)?$")


@dataclass
class Job:
    id: str
    request: GenerationRequest
    created: float = field(default_factory=time.monotonic)
    created_unix: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"          # queued | running | succeeded | failed | cancelled
    step: int = 0
    error: ApiError | None = None
    images: list[str] | None = None
    started: float | None = None
    finished: float | None = None
    cancel_reason: ApiError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: list[asyncio.Queue] = field(default_factory=list)

    def publish(self, name: str, data: dict) -> None:
        for q in self.listeners:
            q.put_nowait((name, data))

    def describe(self) -> dict:
        d = {"id": self.id, "object": "image.generation.job", "status": self.status, "created": self.created_unix,
             "progress": {"step": self.step, "total": self.request.num_inference_steps}}
        if self.error is not None:
            d["error"] = {**self.error.body()["error"], "status": self.error.status}
        return d


class Server:
    def __init__(self, plan, nproc: int, *, api_key: str | None, env: dict | None = None) -> None:
        self.plan, self.limits, self.api_key = plan, Limits.from_plan(plan), api_key
        self.serve = plan.serve
        self.output_dir = Path(self.serve.output_dir)
        self.group = WorkerGroup(plan.to_dict(), nproc, heartbeat_timeout_s=self.serve.heartbeat_timeout_s, env=env)
        self.queue: collections.deque[Job] = collections.deque()
        self.queue_event = asyncio.Event()
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.metrics = Metrics()
        self.mean_job_s = 1.0

    async def start(self) -> None:
        await self.group.start()
        asyncio.create_task(self._dispatch())
        asyncio.create_task(self._deadlines())

    # --- HTTP ----------------------------------------------------------------------------------------------

    async def handle(self, req: Request):
        route = _route_name(req.path)
        try:
            resp = await self._route(req)
        except ApiError as e:
            resp = Response.json(e.status, e.body(), e.headers)
        except HttpError as e:
            self.metrics.count(route, e.status)
            raise
        self.metrics.count(route, resp.status if isinstance(resp, Response) else 200)
        return resp

    @staticmethod
    def error_body(e: HttpError) -> bytes:
        return json.dumps(ApiError(e.status, e.message, param=e.param).body()).encode()

    async def _route(self, req: Request):
        path, method = req.path, req.method
        if path == "/health/live":
            return Response.json(200, {"status": "live"})
        if path == "/health/ready":
            return self._ready()
        self._authorize(req)
        if path == "/metrics":
            text = self.metrics.render(queue_depth=len(self.queue), workers_up=self.group.workers_up,
                                       workers=self.group.nproc, restarts=self.group.restarts,
                                       dispatched=self.group.dispatched)
            return Response(200, text.encode(), "text/plain; version=0.0.4")
        if path in ("/v1/images/generations", "/v1/jobs"):
            if method != "POST":
                raise ApiError(405, f"{path} takes POST", code="method_not_allowed")
            job = await self._submit(req)
            if path == "/v1/jobs":
                return Response.json(202, job.describe())
            return await self._wait_images(job)
        m = _JOB_PATH.match(path)
        if not m:
            raise ApiError(404, "no such endpoint", code="not_found")
        job = self.jobs.get(m.group(1))
        if job is None:
            raise ApiError(404, "no such job (ids are made by the server; old jobs are forgotten)",
                           param="id", code="job_not_found")
        what = m.group(2)
        if (what == "/cancel" and method == "POST") or (what is None and method == "DELETE"):
            self._cancel(job, ApiError(499, "cancelled by the client", code="cancelled"))
            return Response.json(200, job.describe())
        if method != "GET":
            raise ApiError(405, f"{path} takes GET", code="method_not_allowed")
        if what is None:
            return Response.json(200, job.describe())
        if what == "/events":
            return EventStream(self._events(job))
        if job.status != "succeeded":
            if job.error is not None:
                raise job.error
            raise ApiError(409, f"job {job.id} is {job.status}; the result is not ready", code="not_ready")
        return Response.json(200, {"created": job.created_unix, "data": [{"b64_json": b} for b in job.images]})

    def _authorize(self, req: Request) -> None:
        if not self.api_key:
            return
        given = req.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Digests first: compare_digest is constant-time in the content, not in a length difference.
        ok = hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(),
                                 hashlib.sha256(self.api_key.encode()).digest()) and scheme.lower() == "bearer"
        if not ok:
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _ready(self) -> Response:
        g = self.group
        body = {"status": "ready" if g.state == "ready" else "unavailable", "workers": g.nproc,
                "workers_up": g.workers_up, "group": g.state, "restarts": g.restarts, "spares_ready": g.spares_ready,
                "queue_depth": len(self.queue)}
        running = [j for j in self.jobs.values() if j.status == "running"]
        if running:
            body["running"] = {"step": running[0].step, "total": running[0].request.num_inference_steps}
        if g.state != "ready":
            body["reason"] = g.down_reason
            return Response.json(503, body, {"Retry-After": "1"})
        return Response.json(200, body)

    # --- jobs ------------------------------------------------------------------------------------------

    async def _submit(self, req: Request) -> Job:
        body = await req.read_body(MAX_BODY_BYTES)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON", param="body", code="invalid_json") from None
        request = parse_request(data, self.limits, default_seed=random.randrange(2 ** 31))
        if len(self.queue) >= self.serve.max_queue:
            wait = max(1, min(60, round(self.mean_job_s * len(self.queue))))
            raise ApiError(429, f"the queue is full ({self.serve.max_queue} requests waiting); retry later",
                           code="queue_full", headers={"Retry-After": str(wait)})
        job = Job(id=uuid.uuid4().hex, request=request)
        self.jobs[job.id] = job
        while len(self.jobs) > KEEP_JOBS:
            old = next(iter(self.jobs.values()))
            if old.status in ("queued", "running"):
                break
            self.jobs.popitem(last=False)
        self.queue.append(job)
        self.queue_event.set()
        return job

    async def _wait_images(self, job: Job) -> Response:
        await job.done.wait()
        if job.error is not None:
            raise job.error
        timing = {"X-Request-Id": job.id, "X-Queue-Wait-S": f"{job.started - job.created:.4f}",
                  "X-Generation-S": f"{job.finished - job.started:.4f}"}
        return Response.json(200, {"created": job.created_unix, "data": [{"b64_json": b} for b in job.images]},
                             timing)

    def _cancel(self, job: Job, reason: ApiError) -> None:
        if job.status == "queued":
            self.queue.remove(job)
            self._finish(job, "failed" if reason.status == 504 else "cancelled", error=reason)
        elif job.status == "running":
            job.cancel_reason = job.cancel_reason or reason
            self.group.cancel(job.id)

    def _finish(self, job: Job, status: str, *, error: ApiError | None = None, images=None) -> None:
        job.status, job.error, job.images = status, error, images
        job.finished = time.monotonic()
        self.metrics.latency.observe(job.finished - job.created)
        event = {"succeeded": "completed"}.get(status, status)
        data = job.describe()
        job.publish(event, data)
        job.done.set()

    async def _events(self, job: Job):
        q: asyncio.Queue = asyncio.Queue()
        job.listeners.append(q)
        try:
            for i in range(1, job.step + 1):
                yield "step", {"id": job.id, "step": i, "total": job.request.num_inference_steps}
            if job.done.is_set():
                yield {"succeeded": "completed"}.get(job.status, job.status), job.describe()
                return
            while True:
                name, data = await q.get()
                yield name, data
                if name != "step":
                    return
        finally:
            job.listeners.remove(q)

    async def _deadlines(self) -> None:
        timeout = self.serve.request_timeout_s
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for job in [j for j in self.jobs.values() if j.status in ("queued", "running")]:
                if now - job.created > timeout:
                    self._cancel(job, ApiError(504, f"the request took longer than serve.request_timeout_s="
                                                    f"{timeout:g} s and was cancelled", code="timeout"))

    async def _dispatch(self) -> None:
        while True:
            try:
                await self._dispatch_one()
            except Exception as e:  # noqa: BLE001 - the dispatcher must outlive any one job
                print(f"xdit-compile serve: dispatcher error {type(e).__name__}: {e}", flush=True)

    async def _dispatch_one(self) -> None:
        while not self.queue:
            self.queue_event.clear()
            await self.queue_event.wait()
        await self.group.ready_event.wait()
        if not self.queue:
            return
        job = self.queue.popleft()
        job.status, job.started = "running", time.monotonic()
        self.metrics.queue_wait.observe(job.started - job.created)
        last = [job.started]

        def on_step(step, total, job=job, last=last):
            now = time.monotonic()
            self.metrics.step_latency.observe(now - last[0])
            last[0] = now
            job.step = step
            job.publish("step", {"id": job.id, "step": step, "total": total})

        result, settled = await self.group.run(job.id, json.loads(job.request.to_json()), on_step)
        try:
            images = await result
        except ApiError as e:
            if e.code == "cancelled":
                reason = job.cancel_reason or e
                self._finish(job, "failed" if reason.status == 504 else "cancelled", error=reason)
            else:
                self._finish(job, "failed", error=e)
        else:
            await asyncio.to_thread(self._save, job.id, images)
            self._finish(job, "succeeded", images=images)
            self.mean_job_s = 0.8 * self.mean_job_s + 0.2 * (time.monotonic() - job.started)
        await settled

    def _save(self, job_id: str, images: list[str]) -> None:
        folder = self.output_dir / job_id  # a server-made hex id: no client text in any path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for i, b in enumerate(images):
                (folder / f"image_{i:03d}.png").write_bytes(base64.b64decode(b))
        except OSError as e:  # a full disk must not fail the request: the images go back in the answer
            print(f"xdit-compile serve: could not write {folder}: {e}", flush=True)


def _route_name(path: str) -> str:
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}"
    return path if path in ("/health/live", "/health/ready", "/metrics", "/v1/images/generations",
                            "/v1/jobs") else "other"

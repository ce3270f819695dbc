"""`xdit-compile serve` end to end: a real server process, real worker ranks (gloo, 2 processes, cfg = 2),
the built-in digits model, real HTTP over loopback. One server for the module; the restart tests restart
its worker group (that is what they are about) and check it serves correctly afterwards.

Run alone: PYTHONPATH=. python -m pytest -q -s tests/test_serve.py   (-s shows the measured numbers)
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
STEPS = 4
PROMPT, SEED = "3", 5
COLLECTIVE_TIMEOUT_S = 20
"""The ranks' collective timeout (gloo here, NCCL's watchdog on GPUs): an idle server must outlive it."""

PLAN = f"""
model = "builtin:digits"
[parallel]
cfg = 2
[run]
prompt = "{PROMPT}"
num_inference_steps = {STEPS}
guidance_scale = 4.0
seed = {SEED}
num_images = 1
height = 16
width = 16
output = "{{out}}"
[serve]
max_queue = 64
max_steps = 400
max_images_per_request = 4
heartbeat_timeout_s = 4.0
output_dir = "{{serve_out}}"
"""


# --- the server ---------------------------------------------------------------------------------------------


class Server:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.plan = tmp / "plan.toml"
        self.plan.write_text(PLAN.format(out=tmp / "run_out", serve_out=tmp / "serve_out"))
        self.log = tmp / "server.log"
        self.guard_log = tmp / "pickle_guard.log"
        self.fault_file = tmp / "fault.json"
        env = {**os.environ, "XDIT_API_KEY": KEY, "XDIT_PICKLE_GUARD_LOG": str(self.guard_log),
               "XDIT_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S),
               "XDIT_SERVE_FAULT_FILE": str(self.fault_file),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "serve_guard"),
                                              os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xdit_compile.cli", "serve", str(self.plan), "--nproc", "2", "--port", "0"],
            stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=env, cwd=tmp)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://([\d.]+):(\d+)", line)
        assert m, f"no address in {line!r}; log:\n{self.log.read_text()}"
        self.host, self.port = m.group(1), int(m.group(2))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def request(self, method, path, body=None, *, key=KEY, headers=None, timeout=120):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            raw = r.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode()
            return r.status, payload, dict(r.getheaders())
        finally:
            conn.close()

    def wait_ready(self, timeout=600) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.request("GET", "/health/ready", key=None, timeout=5)[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout} s; log:\n{self.log.read_text()[-3000:]}")

    def rank_pids(self) -> list[int]:
        groups = re.findall(r"worker group \d+: ranks 0\.\.\d+ are pids \[([\d, ]+)\]", self.log.read_text())
        return [int(p) for p in groups[-1].split(",")]

    def children(self) -> dict[int, str]:
        """Child processes of the server: pid -> state letter (R, S, Z, T...)."""
        out = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    out[int(d.name)] = fields[0]
        return out

    def generate(self, **extra):
        body = {"prompt": PROMPT, "size": "16x16", "seed": SEED, "num_inference_steps": STEPS, **extra}
        return self.request("POST", "/v1/images/generations", body)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        kids = list(srv.children())
        srv.stop()
        time.sleep(0.5)
        left = [p for p in kids if Path(f"/proc/{p}").exists()]
        assert not left, f"worker processes outlived the server: {left}"


@pytest.fixture(scope="module")
def baseline(server):
    """PNG bytes of `xdit-compile run` with the server's plan (prompt "3", seed 5, 1 image, 4 steps)."""
    r = subprocess.run([sys.executable, "-m", "xdit_compile.cli", "run", str(server.plan), "--nproc", "2"],
                       capture_output=True, text=True, timeout=600, cwd=server.tmp,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    out = server.tmp / "run_out"
    return [(out / "image_000.png").read_bytes()]


def _pngs(payload) -> list[bytes]:
    return [base64.b64decode(d["b64_json"]) for d in payload["data"]]


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# --- reference images from the offline code path (the functions `xdit-compile run` calls) -------------------


def _offline_pngs(rank, world_size, plan_path, jobs):
    from xdit_compile.mesh import ParallelDims
    from xdit_compile.pipelines.run import build, generate, png_bytes
    from xdit_compile.plan import load_plan

    plan = load_plan(plan_path)
    pipe = build(plan, ParallelDims.from_plan(plan.parallel))
    out = []
    for prompt, seed in jobs:
        images = generate(pipe, prompts=[prompt], seed=seed, num_inference_steps=STEPS, guidance_scale=4.0,
                          height=16, width=16)
        out.append(png_bytes(images[0]))
    return out


# --- 1. the openai client ---------------------------------------------------------------------------------


def test_openai_client_matches_xdit_compile_run(server, baseline):
    import openai

    client = openai.OpenAI(base_url=f"http://{server.host}:{server.port}/v1", api_key=KEY, max_retries=0)
    res = client.images.generate(prompt=PROMPT, n=1, size="16x16", response_format="b64_json",
                                 extra_body={"seed": SEED, "num_inference_steps": STEPS, "guidance_scale": 4.0})
    got = [base64.b64decode(d.b64_json) for d in res.data]
    assert got == baseline  # byte for byte: same pixels, same PNG encoder
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt=PROMPT, n=99, response_format="b64_json")
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://{server.host}:{server.port}/v1", api_key="wrong",
                      max_retries=0).images.generate(prompt=PROMPT, response_format="b64_json")


def test_idle_server_outlives_the_collective_timeout(server, baseline):
    server.generate()
    time.sleep(COLLECTIVE_TIMEOUT_S + 2)  # idle ranks wait on their sockets, in no collective
    status, res, _ = server.generate()
    assert status == 200 and _pngs(res) == baseline
    assert server.request("GET", "/health/ready", key=None)[1]["restarts"] == 0


# --- 2. concurrency ---------------------------------------------------------------------------------------------


def test_32_clients_x_4_requests(server):
    jobs = [(str(k % 10), 1000 + k) for k in range(128)]
    from dist_utils import run_distributed
    refs = run_distributed(_offline_pngs, 2, str(server.plan), jobs, timeout=600)[0]

    results: dict[int, tuple] = {}

    def client(c):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=300)  # keep-alive, 4 requests
        for i in range(4):
            k = c * 4 + i
            body = json.dumps({"prompt": jobs[k][0], "seed": jobs[k][1], "num_inference_steps": STEPS,
                               "size": "16x16"})
            t0 = time.monotonic()
            conn.request("POST", "/v1/images/generations", body=body,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            r = conn.getresponse()
            payload = json.loads(r.read())
            results[k] = (r.status, payload, time.monotonic() - t0, float(r.getheader("X-Queue-Wait-S") or -1))
        conn.close()

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(client, range(32)))
    assert sorted(results) == list(range(128))
    bad = {k: v[1] for k, v in results.items() if v[0] != 200}
    assert not bad, bad
    wrong = [k for k in range(128) if _pngs(results[k][1]) != [refs[k]]]
    assert not wrong, f"images differ from their seed's offline output: {wrong}"
    lat = [v[2] for v in results.values()]
    wait = [v[3] for v in results.values()]
    print(f"\n128 requests from 32 clients: latency p50 {_pct(lat, 50) * 1e3:.0f} ms, p99 {_pct(lat, 99) * 1e3:.0f} ms;"
          f" queue wait p50 {_pct(wait, 50) * 1e3:.0f} ms, p99 {_pct(wait, 99) * 1e3:.0f} ms")


# --- 3 and 7. liveness during a generation, cancelling ------------------------------------------------------


def _job(server, steps, **extra):
    status, job, _ = server.request("POST", "/v1/jobs", {"prompt": PROMPT, "seed": SEED,
                                                         "num_inference_steps": steps, **extra})
    assert status == 202, job
    return job["id"]


def _status(server, job_id):
    status, job, _ = server.request("GET", f"/v1/jobs/{job_id}")
    assert status == 200, job
    return job


def _wait_running(server, job_id, min_step=1, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = _status(server, job_id)
        if job["status"] != "queued" and job["progress"]["step"] >= min_step:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not start")


def test_liveness_probes_during_generation_and_cancel_running(server):
    job_id = _job(server, 400)
    _wait_running(server, job_id)
    times = []
    for _ in range(100):
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        conn.request("GET", "/health/live")
        assert conn.getresponse().status == 200
        conn.close()
        times.append(time.monotonic() - t0)
    job = _status(server, job_id)
    assert job["status"] == "running", job  # the probes ran during the generation
    print(f"\n100 /health/live probes during a generation: p50 {_pct(times, 50) * 1e3:.1f} ms, "
          f"p99 {_pct(times, 99) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms")
    assert _pct(times, 99) < 0.050

    # cancel it: work stops within one step plus 1 s
    a = _status(server, job_id)["progress"]["step"]
    time.sleep(0.3)
    b = _status(server, job_id)["progress"]["step"]
    step_s = 0.3 / max(1, b - a)
    t0 = time.monotonic()
    status, job, _ = server.request("POST", f"/v1/jobs/{job_id}/cancel")
    assert status == 200
    step_at_cancel = job["progress"]["step"]
    while (job := _status(server, job_id))["status"] == "running":
        time.sleep(0.005)
    took = time.monotonic() - t0
    print(f"cancel of a running job: stopped after {took * 1e3:.0f} ms (one step: {step_s * 1e3:.0f} ms), "
          f"at step {job['progress']['step']} (step {step_at_cancel} when cancelled) of 400")
    assert job["status"] == "cancelled", job
    assert took < step_s + 1.0
    assert job["progress"]["step"] <= step_at_cancel + 2
    status, err, _ = server.request("GET", f"/v1/jobs/{job_id}/result")
    assert status >= 400 and err["error"]["code"] == "cancelled"


def test_cancel_queued_job_touches_no_rank(server):
    def dispatched():
        text = server.request("GET", "/metrics")[1]
        return int(re.search(r"^xdit_jobs_dispatched_total (\d+)", text, re.M).group(1))

    before = dispatched()
    running = _job(server, 60)
    queued = _job(server, 4)
    assert _status(server, queued)["status"] == "queued"
    status, job, _ = server.request("DELETE", f"/v1/jobs/{queued}")
    assert status == 200 and job["status"] == "cancelled"
    while _status(server, running)["status"] in ("queued", "running"):
        time.sleep(0.05)
    assert _status(server, running)["status"] == "succeeded"
    assert dispatched() == before + 1  # only the running job reached the ranks


def test_job_api_progress_stream_and_result(server, baseline):
    job_id = _job(server, STEPS, n=1, size="16x16")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    events = re.findall(r"event: (\w+)\ndata: (.*)\n\n", r.read().decode())
    conn.close()
    names = [e for e, _ in events]
    assert names == ["step"] * STEPS + ["completed"], names
    assert [json.loads(d)["step"] for _, d in events[:-1]] == list(range(1, STEPS + 1))
    status, res, _ = server.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200 and _pngs(res) == baseline
    files = sorted((server.tmp / "serve_out" / job_id).iterdir())
    assert [f.read_bytes() for f in files] == baseline


# --- 4. queue full ------------------------------------------------------------------------------------------------


def test_queue_full_gives_429_fast_and_accepted_requests_succeed(server):
    long = _job(server, 300)
    _wait_running(server, long)
    accepted = [_job(server, 1, seed=s) for s in range(64)]
    t0 = time.monotonic()
    status, err, headers = server.request("POST", "/v1/jobs", {"prompt": PROMPT, "num_inference_steps": 1})
    took = time.monotonic() - t0
    print(f"\nqueue full: 429 in {took * 1e3:.1f} ms, Retry-After {headers.get('Retry-After')}")
    assert status == 429 and err["error"]["code"] == "queue_full", err
    assert int(headers["Retry-After"]) >= 1
    assert took < 0.100
    assert _status(server, long)["status"] == "running"
    deadline = time.monotonic() + 300
    for job_id in [long, *accepted]:
        while (job := _status(server, job_id))["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "succeeded", job


# --- 8. invalid requests, keys --------------------------------------------------------------------------------


def _invalid_bodies():
    ok = {"prompt": PROMPT, "size": "16x16", "num_inference_steps": STEPS}
    cases = []
    for v in (0, -1, 401, 10 ** 6, 1.5, "4", None, True, [4]):
        cases.append(({**ok, "num_inference_steps": v}, "num_inference_steps"))
    for v in ("1x1", "16384x16384", "16x16x16", "big", "", 16, "16 x 16", "0x0", "32x32", "../16x16", "16x../16"):
        cases.append(({**ok, "size": v}, "size"))
    for v in (0, 5, 100, -3, "2", 2.0, None):
        cases.append(({**ok, "n": v}, "n"))
    for v in ("", "   ", "x" * 4001, "../../etc/passwd", 7, None, ["3"], "11", "/etc/passwd"):
        cases.append(({**ok, "prompt": v}, "prompt"))
    for v in ("url", "../x", "png", None, 1):
        cases.append(({**ok, "response_format": v}, "response_format"))
    for v in (-1, 2 ** 63, "5", 1.5, None):
        cases.append(({**ok, "seed": v}, "seed"))
    for v in (-1.0, 1.0, 0.5, 1e9, "4", float("nan"), None):
        cases.append(({**ok, "guidance_scale": v}, "guidance_scale"))
    for v in ("dall-e-3", "../model", "/etc/passwd", 3):
        cases.append(({**ok, "model": v}, "model"))
    for k in ("output_dir", "path", "../x", "url", "quality", "image_url", "user"):
        cases.append(({**ok, k: "../../tmp/x"}, k))
    cases += [("[]", "body"), ("not json", "body"), ('"prompt"', "body"), ("", "body"), (b"\xff\xfe", "body"),
              ({"n": 1}, "prompt")]
    return cases


def test_invalid_bodies_get_4xx_naming_the_field(server):
    cases = _invalid_bodies()
    assert len(cases) >= 50
    failures = []
    for body, field in cases:
        raw = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else \
            json.dumps(body, allow_nan=True).encode()
        status, err, _ = server.request("POST", "/v1/images/generations", raw)
        named = isinstance(err, dict) and (err["error"]["param"] == field or field in err["error"]["message"])
        if not (400 <= status < 500 and named):
            failures.append((body if len(str(body)) < 80 else str(body)[:80], field, status, err))
    assert not failures, failures
    # an oversize body is refused before it is read (only the headers are sent)
    s = socket.create_connection((server.host, server.port))
    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Length: 70000\r\n\r\n")
    head, _, body = s.recv(4096).partition(b"\r\n\r\n")
    s.close()
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["param"] == "body", head + body
    # chunked bodies, paths that are not ids
    s = socket.create_connection((server.host, server.port))
    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 411")
    s.close()
    for path in ("/v1/jobs/../../etc/passwd", "/v1/jobs/%2e%2e%2fetc", "/v1/jobs/" + "a" * 32, "/etc/passwd"):
        assert server.request("GET", path)[0] == 404
    # keys
    assert server.request("POST", "/v1/images/generations", {"prompt": PROMPT}, key=None)[0] == 401
    assert server.request("POST", "/v1/images/generations", {"prompt": PROMPT}, key="wrong")[0] == 401
    assert server.request("GET", "/metrics", key=KEY[:-1])[0] == 401
    assert server.request("GET", "/v1/jobs/" + "0" * 32, key=None)[0] == 401
    # and it still serves
    status, res, _ = server.generate()
    assert status == 200 and len(res["data"]) == 1


def test_non_loopback_host_without_key_is_refused(tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text('model = "builtin:digits"\n[parallel]\ncfg = 2\n')
    env = {k: v for k, v in os.environ.items() if k != "XDIT_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "xdit_compile.cli", "serve", str(plan), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "XDIT_API_KEY" in r.stderr, r.stderr


# --- 5 and 6. failures of a rank ---------------------------------------------------------------------------------


def _failure_round(server, baseline, hit, what):
    """Start a request, hit a rank mid-request, check the 503 / readiness / restart / next image."""
    t0 = time.monotonic()
    while server.request("GET", "/health/ready", key=None)[1].get("spares_ready", 0) < 2:
        assert time.monotonic() - t0 < 300, "spare processes did not finish their imports"
        time.sleep(0.1)
    before = server.rank_pids()
    box = {}

    def call():
        box["r"] = server.generate(num_inference_steps=300)
        box["t"] = time.monotonic()

    th = threading.Thread(target=call)
    th.start()
    while True:
        s, body, _ = server.request("GET", "/health/ready", key=None)
        if body.get("running", {}).get("step", 0) >= 1:
            break
        time.sleep(0.01)
    rank = hit(before)
    t_hit = time.monotonic()
    saw_unready = False
    while th.is_alive():
        saw_unready |= server.request("GET", "/health/ready", key=None, timeout=5)[0] == 503
        time.sleep(0.05)
    th.join()
    status, err, _ = box["r"]
    answered = box["t"] - t_hit
    assert status == 503, err
    assert f"rank {rank}" in err["error"]["message"], err
    assert answered < 10.0
    saw_unready |= server.request("GET", "/health/ready", key=None)[0] == 503
    assert saw_unready
    restart = server.wait_ready(timeout=300)
    status, res, _ = server.generate()
    assert status == 200 and _pngs(res) == baseline
    after = server.rank_pids()
    assert not set(before) & set(after)
    kids = server.children()
    assert not [p for p in before if p in kids], f"old ranks still there: {kids}"
    assert all(state not in "ZT" for state in kids.values()), kids
    print(f"{what} rank {rank}: 503 after {answered:.2f} s, ready again {restart:.1f} s later")
    return answered, restart


def test_kill_9_rank_mid_request_5_times(server, baseline):
    print()
    for i in range(5):
        def hit(pids, rank=i % 2):
            os.kill(pids[rank], signal.SIGKILL)
            return rank
        _failure_round(server, baseline, hit, "kill -9")


def test_sigstop_rank_detected_by_heartbeat(server, baseline):
    print()

    def hit(pids):
        os.kill(pids[1], signal.SIGSTOP)
        return 1
    answered, _ = _failure_round(server, baseline, hit, "SIGSTOP")
    assert answered > 3.0  # it took the heartbeat timeout, not an exit code


def test_exception_on_one_rank_gives_500_then_correct(server, baseline):
    server.fault_file.write_text(json.dumps({"rank": 1, "step": 2}))
    t0 = time.monotonic()
    status, err, _ = server.generate()
    print(f"\ninjected exception on rank 1: {status} after {time.monotonic() - t0:.2f} s: {err['error']['message']}")
    assert status == 500, err
    assert "rank 1" in err["error"]["message"] and "RuntimeError" in err["error"]["message"], err
    server.wait_ready(timeout=300)
    status, res, _ = server.generate()
    assert status == 200 and _pngs(res) == baseline


# --- health, metrics, and 9. no pickle ------------------------------------------------------------------------


def test_metrics_and_health(server):
    assert server.request("GET", "/health/live", key=None)[0] == 200
    status, body, _ = server.request("GET", "/health/ready", key=None)
    assert status == 200 and body["workers_up"] == 2
    status, text, headers = server.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("xdit_requests_total{", "xdit_request_latency_seconds_bucket", "xdit_queue_wait_seconds_count",
                 "xdit_queue_depth 0", "xdit_step_latency_seconds_sum", "xdit_workers_up 2",
                 "xdit_worker_restarts_total"):
        assert name in text, name
    assert re.search(r'xdit_requests_total\{route="/v1/images/generations",status="200"\} [1-9]', text)


def test_serve_path_never_unpickles(server):
    assert server.generate()[0] == 200
    installed = server.guard_log.with_name(server.guard_log.name + ".installed").read_text().split()
    assert len(installed) >= 3  # the front and at least the two ranks ran with the guard
    calls = server.guard_log.read_text() if server.guard_log.exists() else ""
    assert calls == "", calls


# --- no server needed ---------------------------------------------------------------------------------------


def test_serve_plan_section():
    from xdit_compile.plan import Plan

    plan = Plan.from_dict({"serve": {"max_queue": 8, "api_key_env": "MY_KEY"}})
    assert plan.serve.max_queue == 8 and plan.serve.max_steps == 100 and plan.serve.output_dir == "outputs/"
    assert Plan.from_dict(plan.to_dict()) == plan
    for bad, field in (({"max_queue": 0}, "serve.max_queue"), ({"max_steps": "9"}, "serve.max_steps"),
                       ({"request_timeout_s": 0}, "serve.request_timeout_s"),
                       ({"api_key_env": "sk-live key"}, "serve.api_key_env"), ({"output_dir": ""}, "serve.output_dir"),
                       ({"max_que": 1}, "serve.max_que")):
        with pytest.raises(ValueError, match=re.escape(field)):
            Plan.from_dict({"serve": bad})


def test_check_host():
    from xdit_compile.serve import check_host

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_host(host, None, "XDIT_API_KEY")
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(ValueError, match="XDIT_API_KEY"):
            check_host(host, None, "XDIT_API_KEY")
        check_host(host, "a-key", "XDIT_API_KEY")

"""Prometheus text exposition (format 0.0.4) for a handful of counters, gauges and histograms; no dependency."""
from __future__ import annotations

from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Histogram:
    def __init__(self, name: str, help_: str, buckets=LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                f"{self.name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = Histogram("xdit_request_latency_seconds", "Time from request to answer (generations).")
        self.queue_wait = Histogram("xdit_queue_wait_seconds", "Time a generation waited in the queue.")
        self.step_latency = Histogram("xdit_step_latency_seconds", "Time of one denoising step (rank 0).")

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def render(self, *, queue_depth: int, workers_up: int, workers: int, restarts: int, dispatched: int) -> str:
        out = ["# HELP xdit_requests_total HTTP requests by route and status.", "# TYPE xdit_requests_total counter"]
        out += [f'xdit_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
        for h in (self.latency, self.queue_wait, self.step_latency):
            out += h.render()
        out += ["# HELP xdit_queue_depth Generations waiting for the workers.", "# TYPE xdit_queue_depth gauge",
                f"xdit_queue_depth {queue_depth}",
                "# HELP xdit_workers_up Worker ranks alive, ready and heartbeating.", "# TYPE xdit_workers_up gauge",
                f"xdit_workers_up {workers_up}",
                "# HELP xdit_workers Worker ranks the plan needs.", "# TYPE xdit_workers gauge",
                f"xdit_workers {workers}",
                "# HELP xdit_worker_restarts_total Times the worker group was restarted.",
                "# TYPE xdit_worker_restarts_total counter", f"xdit_worker_restarts_total {restarts}",
                "# HELP xdit_jobs_dispatched_total Generations sent to the ranks.",
                "# TYPE xdit_jobs_dispatched_total counter", f"xdit_jobs_dispatched_total {dispatched}"]
        return "\n".join(out) + "\n"

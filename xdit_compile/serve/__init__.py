"""`xdit-compile serve plan.toml --nproc N [--host 127.0.0.1 --port 8000]`: the plan's model over HTTP.

    app.py         routes, bounded queue, jobs, auth, metrics (the front: asyncio, never waits on a rank)
    http.py        a small HTTP/1.1 server on asyncio streams (stdlib), with server-sent events
    supervisor.py  the worker group: starts, watches (exit codes, signals, heartbeats) and restarts ranks
    worker.py      one rank: waits on its own socket when idle, agrees on each job by tensor broadcast
    schema.py      the request, validated by the front and again by every rank (JSON, never pickle)
    metrics.py     Prometheus text
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import sys

__all__ = ["check_host", "serve"]


def check_host(host: str, api_key: str | None, api_key_env: str) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        raise ValueError(f"--host {host} is reachable from other machines; set an API key in the environment "
                         f"variable {api_key_env} (plan key serve.api_key_env) or bind 127.0.0.1")


def serve(plan, nproc: int, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the server until SIGINT/SIGTERM. Prints the address it listens on once it listens."""
    api_key = os.environ.get(plan.serve.api_key_env) or None
    check_host(host, api_key, plan.serve.api_key_env)
    return asyncio.run(_main(plan, nproc, host, port, api_key))


async def _main(plan, nproc, host, port, api_key) -> int:
    from .app import Server
    from .http import start_server

    server = Server(plan, nproc, api_key=api_key)
    await server.start()
    http = await start_server(server.handle, server.error_body, host, port)
    bound = http.sockets[0].getsockname()
    print(f"xdit-compile serve: listening on http://{bound[0]}:{bound[1]} ({nproc} worker rank(s), "
          f"model {plan.model}{', API key required' if api_key else ''})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("xdit-compile serve: stopping", file=sys.stderr, flush=True)
    http.close()
    await server.group.close()
    return 0

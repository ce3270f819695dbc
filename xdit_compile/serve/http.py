"""A small HTTP/1.1 server on asyncio streams (stdlib only): keep-alive, Content-Length bodies, SSE.

Bounds come first: a request line or header over ``MAX_HEADER_BYTES``, more than ``MAX_HEADERS`` headers,
chunked bodies, and bodies over the handler's limit are refused before the body is read. The handler is
``async def handle(request) -> Response | EventStream`` and may consult ``request.read_body`` lazily, so
authentication can answer 401 before a byte of body is read.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 8 * 1024
MAX_HEADERS = 100
HEADER_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 30.0
DRAIN_LIMIT = 64 * 1024
"""An unread body up to this size is read and dropped to keep the connection; a larger one closes it."""
REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 411: "Length Required", 413: "Payload Too Large",
           429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 504: "Gateway Timeout"}


class HttpError(Exception):
    """A malformed request: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    reader: asyncio.StreamReader
    body_read: bool = False

    async def read_body(self, limit: int) -> bytes:
        if "transfer-encoding" in self.headers:
            raise HttpError(411, "chunked bodies are not accepted; send Content-Length", "body")
        raw = self.headers.get("content-length", "0")
        if not raw.isdigit() or len(raw) > 12:
            raise HttpError(400, "Content-Length must be a number of bytes", "body")
        size = int(raw)
        if size > limit:
            raise HttpError(413, f"the request body is {size} bytes; at most {limit}", "body")
        body = await asyncio.wait_for(self.reader.readexactly(size), BODY_TIMEOUT_S) if size else b""
        self.body_read = True
        return body


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, obj, headers: dict[str, str] | None = None) -> Response:
        return cls(status, json.dumps(obj).encode(), "application/json", headers or {})


@dataclass
class EventStream:
    """Server-sent events: ``events`` yields (event name, data dict) until the stream ends."""

    events: AsyncIterator[tuple[str, dict]]


Handler = Callable[[Request], Awaitable["Response | EventStream"]]


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed the connection between requests
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request line too long") from None
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    while True:
        try:
            h = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            raise HttpError(431, "header line too long") from None
        if h == b"\r\n":
            break
        if len(headers) >= MAX_HEADERS:
            raise HttpError(431, "too many headers")
        name, sep, value = h.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise HttpError(400, "malformed header")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


def _head(status: int, content_type: str, length: int | None, headers: dict[str, str], keep: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Type: {content_type}",
             "Cache-Control: no-store", "X-Content-Type-Options: nosniff",
             f"Connection: {'keep-alive' if keep else 'close'}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _connection(handler: Handler, error_body: Callable[[HttpError], bytes],
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await asyncio.wait_for(_read_head(reader), HEADER_TIMEOUT_S)
                if head is None:
                    return
                method, target, headers = head
                url = urlsplit(target)
                req = Request(method, url.path, url.query, headers, reader)
                resp = await handler(req)
            except HttpError as e:
                body = error_body(e)
                writer.write(_head(e.status, "application/json", len(body), {}, False) + body)
                await writer.drain()
                return
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            keep = req.headers.get("connection", "").lower() != "close"
            if not req.body_read:  # answered before the body was needed (401, 404): skip a small one
                try:
                    await req.read_body(DRAIN_LIMIT)
                except (HttpError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                    keep = False
            if isinstance(resp, EventStream):
                writer.write(_head(200, "text/event-stream", None, {}, False))
                await writer.drain()
                async for name, data in resp.events:
                    writer.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                    await writer.drain()
                return
            writer.write(_head(resp.status, resp.content_type, len(resp.body), resp.headers, keep) + resp.body)
            await writer.drain()
            if not keep:
                return
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def start_server(handler: Handler, error_body: Callable[[HttpError], bytes], host: str, port: int):
    return await asyncio.start_server(lambda r, w: _connection(handler, error_body, r, w), host, port,
                                      limit=MAX_HEADER_BYTES)

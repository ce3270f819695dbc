"""The one request shape of `xdit-compile serve`, checked twice: by the HTTP front on the client's JSON body
(before any rank does work) and by every rank on the JSON bytes the front forwards (never pickle).

``parse_request(body, limits)`` turns a client body into a ``GenerationRequest`` or raises ``ApiError``
(status, message naming the field, ``param``). ``GenerationRequest.to_json()`` is the canonical form that
travels to the ranks; ``GenerationRequest.from_json`` re-validates it there with the same rules.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

MAX_BODY_BYTES = 64 * 1024
"""Largest request body; a longer one is refused (413) before it is read."""
MAX_PROMPT_CHARS = 4000
"""Longest prompt (OpenAI's dall-e-3 limit)."""
MIN_SIDE, MAX_SIDE = 8, 4096
"""Bounds of each side of ``size`` in pixels, whatever the model."""
MAX_SEED = 2 ** 63 - 1
MAX_GUIDANCE = 100.0

_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
FIELDS = ("prompt", "n", "size", "response_format", "model", "seed", "num_inference_steps", "guidance_scale")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a request may ask for: the plan's [serve] limits, and what the model takes."""

    model: str
    max_steps: int
    max_images: int
    default_steps: int
    default_guidance: float
    default_size: tuple[int, int]
    sizes: tuple[tuple[int, int], ...] | None = None
    """The only sizes the model makes (builtin:digits: 16x16), or None: any size within the bounds."""
    labels: tuple[str, ...] | None = None
    """The only prompts a class-conditional model takes (builtin:digits: "0".."9"), or None."""
    min_guidance: float = 0.0
    """cfg = 2 needs guidance > 1: the smallest guidance_scale allowed is just above this."""

    @classmethod
    def from_plan(cls, plan) -> Limits:
        r, s = plan.run, plan.serve
        sizes = labels = None
        size = (r.width or 0, r.height or 0)
        if plan.model == "builtin:digits":
            from ..builtin.digits import NUM_CLASSES, SIZE
            sizes, labels = ((SIZE, SIZE),), tuple(str(i) for i in range(NUM_CLASSES))
            size = (SIZE, SIZE)
        elif not all(size):
            size = (1024, 1024)
        return cls(model=plan.model or "", max_steps=s.max_steps, max_images=s.max_images_per_request,
                   default_steps=min(r.num_inference_steps, s.max_steps), default_guidance=float(r.guidance_scale),
                   default_size=size, sizes=sizes, labels=labels,
                   min_guidance=1.0 if plan.parallel.cfg > 1 else 0.0)


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    prompt: str
    n: int
    width: int
    height: int
    seed: int
    num_inference_steps: int
    guidance_scale: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, limits: Limits) -> GenerationRequest:
        """The ranks' check of what the front forwarded: the same rules, the canonical fields only."""
        d = json.loads(data.decode("utf-8"))
        if not isinstance(d, dict) or set(d) != {"prompt", "n", "width", "height", "seed",
                                                 "num_inference_steps", "guidance_scale"}:
            raise ValueError(f"not a canonical request: {sorted(d) if isinstance(d, dict) else type(d).__name__}")
        body = {k: d[k] for k in ("prompt", "n", "seed", "num_inference_steps", "guidance_scale")}
        body["size"] = f"{d['width']}x{d['height']}"
        return parse_request(body, limits, default_seed=None)


def _int(d, key, lo, hi, default):
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be an integer, got {type(v).__name__}", param=key, code="invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {v}", param=key, code="out_of_range")
    return v


def parse_request(body: Any, limits: Limits, *, default_seed: int | None) -> GenerationRequest:
    """Validate a decoded JSON body; ``default_seed`` fills a missing seed (None: seed is required)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_body")
    for key in body:
        if key not in FIELDS:
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise ApiError(400, f"unknown field {shown!r}; valid fields: {', '.join(FIELDS)}",
                           param=shown, code="unknown_field")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "'prompt' must be a non-empty string", param="prompt", code="invalid_prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"'prompt' is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}", param="prompt",
                       code="prompt_too_long")
    if limits.labels is not None and prompt.strip() not in limits.labels:
        raise ApiError(400, f"'prompt' must be a class label of {limits.model} ({', '.join(limits.labels)}), "
                            f"got {prompt[:40]!r}", param="prompt", code="invalid_prompt")
    fmt = body.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise ApiError(400, "'response_format' must be 'b64_json' (this server does not host image URLs)",
                       param="response_format", code="invalid_value")
    model = body.get("model", limits.model)
    if model != limits.model:
        raise ApiError(400, f"'model' must be {limits.model!r} (the model this server serves) or left out",
                       param="model", code="model_not_found")
    width, height = _size(body.get("size"), limits)
    n = _int(body, "n", 1, limits.max_images, 1)
    steps = _int(body, "num_inference_steps", 1, limits.max_steps, limits.default_steps)
    seed = _int(body, "seed", 0, MAX_SEED, default_seed)
    g = body.get("guidance_scale", limits.default_guidance)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or g != g:
        raise ApiError(400, "'guidance_scale' must be a number", param="guidance_scale", code="invalid_type")
    if not (limits.min_guidance < g <= MAX_GUIDANCE if limits.min_guidance else 0 <= g <= MAX_GUIDANCE):
        low = f"> {limits.min_guidance} (this plan splits classifier-free guidance)" if limits.min_guidance else ">= 0"
        raise ApiError(400, f"'guidance_scale' must be {low} and <= {MAX_GUIDANCE}, got {g}",
                       param="guidance_scale", code="out_of_range")
    return GenerationRequest(prompt=prompt.strip() if limits.labels else prompt, n=n, width=width, height=height,
                             seed=seed, num_inference_steps=steps, guidance_scale=float(g))


def _size(size, limits: Limits) -> tuple[int, int]:
    if size is None:
        return limits.default_size
    m = _SIZE.match(size) if isinstance(size, str) else None
    if not m:
        raise ApiError(400, "'size' must be a string 'WIDTHxHEIGHT', e.g. '1024x1024'", param="size",
                       code="invalid_size")
    w, h = int(m.group(1)), int(m.group(2))
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        raise ApiError(400, f"'size' sides must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {w}x{h}",
                       param="size", code="invalid_size")
    if limits.sizes is not None and (w, h) not in limits.sizes:
        ok = ", ".join(f"{a}x{b}" for a, b in limits.sizes)
        raise ApiError(400, f"'size' must be {ok} for {limits.model}, got {w}x{h}", param="size", code="invalid_size")
    return w, h

"""The plan: what to parallelize and how, as frozen keyword-only dataclasses.

A plan is a tree of *sections* (``parallel``, ``attention``, ``compile``, ...) plus a few top-level scalars
(``model``). Each section is one dataclass that validates itself in ``__post_init__`` and raises
``ValueError`` naming the plan key path (``parallel.ulysses``), what it must be and what it got.

Adding a section is one dataclass (with ``SECTION = "<name>"``) plus one field on ``Plan``; ``SECTIONS``,
``Plan.from_dict``/``to_dict`` and the unknown-key checks are derived from ``Plan``'s fields.

Conventions: TOML has no null, so a field that may be ``None`` must default to ``None`` and ``to_dict``
leaves ``None`` values out.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "AttentionConfig",
    "CacheConfig",
    "CompileConfig",
    "ParallelConfig",
    "PipeFusionConfig",
    "Plan",
    "SECTIONS",
    "ServeConfig",
]


# --- validation helpers -------------------------------------------------------------------------------


def _got(value: Any) -> str:
    """``-2``, ``'2'``, ``True (bool)``: the value, and its type where the repr alone would mislead."""
    if type(value) in (int, float, str):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def _check_int(key: str, value: Any, *, minimum: int = 1) -> None:
    # bool is an int subclass: `ulysses = true` in a plan file is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}, got {_got(value)}")


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be a bool (true or false), got {_got(value)}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if isinstance(value, str) and value in choices:
        return
    valid = ", ".join(repr(c) for c in choices)
    hint = _suggest(value, choices) if isinstance(value, str) else ""
    raise ValueError(f"{key} must be one of {valid}, got {_got(value)}{hint}")


def _suggest(name: str, valid: Any) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(path: str, given: Mapping[str, Any], valid: list[str]) -> None:
    """Unknown keys are errors (a typo must not silently fall back to a default)."""
    for key in given:
        if key not in valid:
            full = f"{path}.{key}" if path else str(key)
            raise ValueError(
                f"plan key '{full}' is unknown{_suggest(str(key), valid)}; valid keys: {', '.join(valid)}"
            )


# --- sections -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Parallel degrees. Their product must equal the world size; ulysses is the innermost mesh axis."""

    SECTION: ClassVar[str] = "parallel"

    data: int = 1
    """Data parallel: independent prompts/samples per replica."""
    cfg: int = 1
    """Classifier-free guidance parallel: 2 puts the conditional and unconditional batch on two ranks."""
    pipefusion: int = 1
    """PipeFusion: transformer blocks split into this many stages, patches pipelined with stale KV."""
    ring: int = 1
    """Ring attention: sequence parallel, K/V passed around the ring, partial results merged by LSE."""
    ulysses: int = 1
    """Ulysses: sequence parallel, all-to-all swaps the token shard for a head shard around attention."""

    AXES: ClassVar[tuple[str, ...]] = ("data", "cfg", "pipefusion", "ring", "ulysses")

    def __post_init__(self) -> None:
        for axis in self.AXES:
            _check_int(f"{self.SECTION}.{axis}", getattr(self, axis))
        if self.cfg not in (1, 2):
            raise ValueError(
                f"{self.SECTION}.cfg must be 1 or 2 (conditional + unconditional), got {self.cfg}"
            )

    @property
    def world_size(self) -> int:
        """The product of all degrees: the number of processes this plan needs."""
        size = 1
        for axis in self.AXES:
            size *= getattr(self, axis)
        return size

    @property
    def sequence(self) -> int:
        """The sequence-parallel (USP) degree: ring x ulysses."""
        return self.ring * self.ulysses

    def degrees(self) -> tuple[int, ...]:
        """The degrees in mesh order (``AXES``), outermost first."""
        return tuple(getattr(self, axis) for axis in self.AXES)

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless the product of the degrees is ``world_size``."""
        if self.world_size == world_size:
            return
        terms = " x ".join(f"{axis}={getattr(self, axis)}" for axis in self.AXES)
        raise ValueError(
            f"parallel degrees {terms} = {self.world_size} but the world size is {world_size}; "
            f"change the degrees so their product is {world_size}, or launch {self.world_size} processes "
            f"(torchrun --nproc_per_node={self.world_size})"
        )


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """How the local attention (inside Ulysses/ring) is computed."""

    SECTION: ClassVar[str] = "attention"
    BACKENDS: ClassVar[tuple[str, ...]] = ("auto", "sdpa", "flash_attn", "yunchang", "math", "fa3_cute")

    backend: str = "auto"
    """auto (best available: fa3_cute on a Hopper GPU where its packages import, else torch SDPA), sdpa (torch
    SDPA: cuDNN on H100 / H200), flash_attn, yunchang, math (reference, slow), fa3_cute (flash_attn.cute's
    Hopper kernel, FlashAttention-3 design in the CuTe DSL; optional packages: flash_attn.cute and
    nvidia-cutlass-dsl; one H200: 3-18% faster than cuDNN at the FLUX / Wan shapes, benchmarks/attn_kernels.py).
    With fa3_cute the graph's own attention (SDPA without a mask) runs the kernel too (the attention_kernel
    pass)."""

    def __post_init__(self) -> None:
        _check_choice(f"{self.SECTION}.backend", self.backend, self.BACKENDS)


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """How the rewritten graph is lowered to code."""

    SECTION: ClassVar[str] = "compile"
    LOWERINGS: ClassVar[tuple[str, ...]] = ("eager", "inductor", "onediff")
    ALL_TO_ALLS: ClassVar[tuple[str, ...]] = ("auto", "nccl", "symm_mem", "allgather_kv", "copy_engine")
    RING_TRANSFERS: ClassVar[tuple[str, ...]] = ("auto", "nccl", "copy_engine")

    lowering: str = "eager"
    """eager (run the rewritten graph as is), inductor (torch's compiler), onediff (optional package)."""
    fullgraph: bool = False
    """Fail instead of falling back when dynamo breaks the model into several graphs."""
    dynamic: bool = False
    """Trace with symbolic shapes so one compile serves several resolutions."""
    cudagraphs: bool = False
    """With lowering = "inductor" on CUDA: replay the step as a CUDA graph (collectives included), which removes
    the per-kernel launch cost; the output of a call is overwritten by the next call (consume it first)."""
    decompose_collectives: bool = True
    """Inductor only: run the Ulysses all-to-all as functional collectives in the graph (attention without a
    mask, heads divisible by the degree, even shards), so Inductor fuses the layout copies around it and may
    overlap it; false keeps the opaque ``xdit::ulysses_attention`` op."""
    ulysses_chunks: int = 1
    """Inductor, decomposed Ulysses only: cut each attention's heads into this many chunks and pipeline them, so
    one chunk's all-to-all runs while the previous chunk's attention computes (1: one all-to-all each way). With
    all_to_all = "copy_engine" only attention whose output is not concatenated with a tensor computed before it
    is cut (FLUX: the double blocks; the single blocks' transfers already run beside their mlp)."""
    query_parts: int = 1
    """With all_to_all = "copy_engine": attend the queries in this many parts and send each part's output back as
    soon as it is computed, so the return trip runs beside the next part's attention (1: one output transfer
    after the whole attention). The queries come in an order rotated per rank, so the part computed last holds
    this rank's own tokens, which need no transfer. Rounded down to a divisor of the Ulysses degree. Only for
    attention whose output is not concatenated with a tensor computed before it (FLUX: the double blocks; the
    single blocks' output transfer already runs beside the mlp half of proj_out). Exact. Applied to every
    attention it was not faster (4 x H200, FLUX 1024² ulysses 4: 39.8 against 39.6 ms/step); the double blocks
    only are not measured yet."""
    ce_in_place: bool = True
    """Where the copy-engine all-to-all runs (all_to_all = "copy_engine", chosen or by "auto"; elsewhere it does
    nothing): the producers of q and k (xdit::norm_rope) and of the attention output (the fa3_cute kernel) write
    straight into the receive buffers, at the place their own piece belongs, so no transfer copies its own piece
    inside the GPU (runtime/ce_in_place.py). Those buffers hold every token and head (N times larger). Exact (on 2 x
    H200 benchmarks/ce_check.py; against one process on CPU). FLUX 2048² ulysses 2 on 2 x H200: 347.5 -> 343.7 and
    347.3 -> 343.4 ms/step; a ulysses-4 rank's kernels 162.9 -> 161.0 ms (benchmarks/results/session26/). Not
    applied with ulysses_chunks or to attention in query_parts."""
    ring_transfer: str = "auto"
    """How ring attention moves k/v. nccl: blocks pass around the ring by NCCL send/recv, one attention and one
    partial output per block, merged once. copy_engine (runtime/ce_ring.py): each rank's k/v are copied once into
    every peer's buffer by the copy engines (no SM) while the rank attends its own block; the peers' blocks are then
    attended as they land and the partial outputs merged once. Equal shards and unmasked attention only (other
    calls keep nccl). auto: copy_engine on CUDA when the ring spans the whole job (ulysses = 1) on one host's GPUs,
    else nccl; inside USP (ulysses x ring, Inductor) only when set to copy_engine (not measured on GPUs yet).
    FLUX.1-dev 2048² ring 2 on 2 x H200: 347.6 ms/step against 373.5 with nccl (benchmarks/results/session29/)."""
    all_to_all: str = "auto"
    """Decomposed Ulysses only: how its all-to-alls move data (USP's all-to-alls, around the ring op, are functional
    collectives under nccl and copy_engine; symm_mem and allgather_kv keep the USP op). auto (default): copy_engine with lowering = "inductor" on
    CUDA when Ulysses spans the whole job on one host's GPUs (the plans measured with it), else nccl. nccl
    (``_c10d_functional.all_to_all_single``) or symm_mem (``xdit::symm_all_to_all``: one Triton kernel stores into
    the peers' symmetric-memory buffers over NVLink, then a barrier; falls back to NCCL / gloo where the GPUs cannot
    reach each other), or allgather_kv (no all-to-all: one all-gather of k and v, then every rank attends its own
    queries on all heads; fewer, larger transfers, no return trip), or copy_engine (``xdit::a2a_start`` /
    ``a2a_wait``: q, k, v and the output are copied by the GPUs' copy engines straight into the peers' buffers, in
    the layouts SDPA and the out projection read, while independent compute runs (the schedule_transfers pass places
    it); completion by a barrier kernel with a timeout (``XDIT_CE_SIGNAL=flag``: stream-memop flags, no SM work, no
    timeout, slower on 4 GPUs; ``XDIT_CE_SIGNAL=spin``: those flags waited for by a kernel on the compute stream, so
    nothing spins beside compute; opt-in, exact on 2 and 4 GPUs, no faster on 2); falls back to NCCL / gloo like symm_mem; fastest measured: FLUX 1024² ulysses 4 on 4
    x H100 40.5 ms/step (38.6 with fuse_modulation and fuse_gelu); on 4 x H200 41.3 (flags) against 46.1 with nccl;
    Wan 480p ulysses 4 on 4 x H200 781.9 ms/step, 816.8 with nccl in an earlier run). Its receive buffers are made
    before the graph first runs (a rendezvous inside the first run deadlocked against Inductor's per-rank
    autotuning)."""
    shard_modulation: bool = True
    """Sequence parallel (ulysses x ring > 1): each rank computes 1/N of the rows of the per-sample modulation
    linears (AdaLN ``linear(silu(temb))``, the same on every rank) and one all-gather shares them, so each rank
    reads 1/N of their weights; false computes them whole on every rank."""
    fuse_modulation: bool = False
    """With shard_modulation: the local rows of a group's modulation linears are concatenated ONCE, at compile
    time, into one weight, so the group is one GEMV instead of one per linear (FLUX: 77 GEMVs, ~131 kernels,
    0.9 ms per step on 4 x H200). Costs 1/N of the group's weights in extra memory per rank (FLUX on 4 ranks:
    1.6 GB), and the copy does not follow weights changed in place after the compile (recompile after
    loading new weights). Off by default for that reason; measured: 0.85 -> 0.57 ms for the GEMVs, 40.8 -> 40.4
    ms/step (FLUX 1024² ulysses 4 with copy_engine, 4 x H100)."""
    fuse_gelu: bool = True
    """A linear followed by tanh-GELU (the MLPs of FLUX, SD3, Wan, PixArt) runs as one GEMM with bias + GELU in
    cuBLASLt's epilogue on CUDA (bf16 / fp16), instead of a GEMM and an elementwise kernel that reads its output
    back (one H100: FLUX 1024² ulysses 4 single-block MLP 154.8 -> 120.7 us; whole step on 4 x H100 with
    copy_engine and fuse_modulation 39.9 -> 38.6 ms). Slightly more accurate (one rounding instead of two).
    Elsewhere (CPU, float32) the same pair, unfused."""
    fuse_norm_rope: bool = True
    """RMSNorm of q / k followed by an interleaved rotary embedding (FLUX's per-head norm and diffusers'
    apply_rotary_emb; HunyuanVideo's dual-stream blocks; Wan's whole-token norm and its own rotary) runs as one
    ``xdit::norm_rope`` call: on CUDA one Triton kernel that reads q once and writes it once (one H100: FLUX 2048²
    single-block q at ulysses 4 40.3 -> 21.4 us; the step on 4 x H100 190.6 -> 186.7 ms, 1024² 39.5 -> 38.5).
    Rounds where eager rounds. Elsewhere the same math in torch ops."""
    fuse_linears: bool = True
    """Linears that read the same input (q / k / v projections; FLUX's text-stream add_q / k / v) run as one GEMM
    over their weights joined once, right after lowering (``xdit::sibling_linear``); the model's parameters become
    views of the joined tensor, so no memory is added. Helps where a rank's GEMMs have few rows (one H200, FLUX
    text q/k/v at 256 rows: ~50 -> ~30 us); FLUX 1024² ulysses 2 on 2 x H200: 70.9 -> 70.0 ms/step. Any lowering,
    also without parallelism."""
    split_cat_linears: bool = True
    """A linear over a concatenation at least twice as wide as its output (FLUX's and HunyuanVideo's single-block
    proj_out over [attention, mlp]) runs as one linear per part plus an add, so the concatenation is never
    copied (one H200, FLUX 2048² at world size 1: a 9.8 ms copy per step). Any lowering, also without
    parallelism. Under all_to_all = "copy_engine" schedule_transfers splits it first, so its mlp half runs
    while the attention output travels."""
    max_autotune: bool = False
    """Inductor only: let Inductor time its Triton GEMM templates (persistent TMA ones included) against cuBLAS
    at each matmul shape of the graph and keep the faster (``max_autotune_gemm``, backends ATEN and TRITON);
    also lets it fuse a following add into a template's epilogue. Adds autotuning to the first call: 7-14 s per
    tuned GEMM on an H200, several minutes for FLUX at 2048². One H200, each GEMM alone: cuBLAS stays ahead at
    most FLUX shapes; Triton wins the 12288 -> 3072 linears at a Ulysses-4 rank's 4224 rows by 4.7%
    (benchmarks/gemm_autotune.py). The whole step is not timed yet."""
    overlap: bool = False
    """Inductor only: let Inductor reorder compute around the collectives it sees
    (``reorder_for_compute_comm_overlap``), e.g. an all-to-all next to an independent MLP."""

    def __post_init__(self) -> None:
        _check_choice(f"{self.SECTION}.lowering", self.lowering, self.LOWERINGS)
        _check_bool(f"{self.SECTION}.fullgraph", self.fullgraph)
        _check_bool(f"{self.SECTION}.dynamic", self.dynamic)
        _check_bool(f"{self.SECTION}.cudagraphs", self.cudagraphs)
        _check_bool(f"{self.SECTION}.decompose_collectives", self.decompose_collectives)
        _check_bool(f"{self.SECTION}.overlap", self.overlap)
        _check_bool(f"{self.SECTION}.max_autotune", self.max_autotune)
        _check_bool(f"{self.SECTION}.shard_modulation", self.shard_modulation)
        _check_bool(f"{self.SECTION}.fuse_modulation", self.fuse_modulation)
        _check_bool(f"{self.SECTION}.fuse_gelu", self.fuse_gelu)
        _check_bool(f"{self.SECTION}.fuse_norm_rope", self.fuse_norm_rope)
        _check_bool(f"{self.SECTION}.fuse_linears", self.fuse_linears)
        _check_bool(f"{self.SECTION}.split_cat_linears", self.split_cat_linears)
        if self.fuse_modulation and not self.shard_modulation:
            raise ValueError(f"{self.SECTION}.fuse_modulation = true needs {self.SECTION}.shard_modulation = true "
                             "(it fuses the sharded linears); set shard_modulation = true or drop fuse_modulation")
        _check_int(f"{self.SECTION}.ulysses_chunks", self.ulysses_chunks)
        _check_choice(f"{self.SECTION}.all_to_all", self.all_to_all, self.ALL_TO_ALLS)
        _check_choice(f"{self.SECTION}.ring_transfer", self.ring_transfer, self.RING_TRANSFERS)
        _check_int(f"{self.SECTION}.query_parts", self.query_parts)
        _check_bool(f"{self.SECTION}.ce_in_place", self.ce_in_place)
        if self.query_parts > 1 and (self.all_to_all != "copy_engine" or self.ulysses_chunks > 1):
            raise ValueError(f"{self.SECTION}.query_parts = {self.query_parts} needs {self.SECTION}.all_to_all = "
                             f"\"copy_engine\" and {self.SECTION}.ulysses_chunks = 1, got all_to_all = "
                             f"{self.all_to_all!r}, ulysses_chunks = {self.ulysses_chunks}; set those or drop "
                             "query_parts")
        if self.overlap and self.lowering != "inductor":
            raise ValueError(f"{self.SECTION}.overlap = true needs {self.SECTION}.lowering = \"inductor\", "
                             f"got lowering = {self.lowering!r}; set lowering = \"inductor\" or drop overlap")
        if self.max_autotune and self.lowering != "inductor":
            raise ValueError(f"{self.SECTION}.max_autotune = true needs {self.SECTION}.lowering = \"inductor\", "
                             f"got lowering = {self.lowering!r}; set lowering = \"inductor\" or drop max_autotune")
        if self.cudagraphs and self.lowering != "inductor":
            raise ValueError(f"{self.SECTION}.cudagraphs = true needs {self.SECTION}.lowering = \"inductor\", "
                             f"got lowering = {self.lowering!r}; set lowering = \"inductor\" or drop cudagraphs")


@dataclass(frozen=True, kw_only=True)
class PipeFusionConfig:
    """PipeFusion (``parallel.pipefusion > 1``): blocks in stages, the sequence in patches, stale K/V."""

    SECTION: ClassVar[str] = "pipefusion"

    num_patches: int | None = None
    """Patches per sequence (default: the pipefusion degree); more patches, smaller pipeline bubbles."""
    warmup_steps: int = 1
    """Denoising steps (transformer calls) run on the whole sequence first; steps >= this many use stale K/V.
    Set it to the number of steps for an exact (bubbly) pipeline."""

    def __post_init__(self) -> None:
        if self.num_patches is not None:
            _check_int(f"{self.SECTION}.num_patches", self.num_patches)
        _check_int(f"{self.SECTION}.warmup_steps", self.warmup_steps)

    def patches(self, degree: int) -> int:
        """The number of patches for a pipefusion degree."""
        return self.num_patches if self.num_patches is not None else degree


@dataclass(frozen=True, kw_only=True)
class VaeConfig:
    """How the pipeline's VAE decodes."""

    SECTION: ClassVar[str] = "vae"

    parallel: bool = False
    """Patch-parallel decode: the latent is split by rows over all ranks (halo exchange, shared norms)."""

    def __post_init__(self) -> None:
        _check_bool(f"{self.SECTION}.parallel", self.parallel)


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Cache acceleration: skip the transformer blocks on steps where their input barely changed."""

    SECTION: ClassVar[str] = "cache"
    METHODS: ClassVar[tuple[str, ...]] = ("none", "fbcache", "teacache")

    method: str = "none"
    """none, fbcache (First-Block-Cache: the first block's residual decides) or teacache (the first block's
    timestep-modulated input decides, rescaled by a polynomial and accumulated over steps)."""
    threshold: float = 0.12
    """Skip when the relative L1 change (fbcache) or the accumulated rescaled change (teacache) is below it;
    0 never skips (the output is then the uncached model's)."""
    warmup_steps: int = 1
    """Steps always computed at the start of a generation (at least the first step always is)."""
    coefficients: Any = None
    """teacache: the rescaling polynomial, highest degree first (numpy.polyval order). Unset: the published
    one for the model class if there is one (Flux), else ``xdit-compile calibrate`` fits it."""

    def __post_init__(self) -> None:
        _check_choice(f"{self.SECTION}.method", self.method, self.METHODS)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"{self.SECTION}.threshold must be a number >= 0, got {_got(self.threshold)}")
        _check_int(f"{self.SECTION}.warmup_steps", self.warmup_steps, minimum=0)
        c = self.coefficients
        if c is not None:
            if not isinstance(c, (list, tuple)) or not c or any(
                    isinstance(x, bool) or not isinstance(x, (int, float)) for x in c):
                raise ValueError(f"{self.SECTION}.coefficients must be a non-empty list of numbers (highest "
                                 f"degree first), got {_got(c)}")
            object.__setattr__(self, "coefficients", tuple(float(x) for x in c))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Inputs of `xdit-compile run`."""

    SECTION: ClassVar[str] = "run"

    prompt: Any = ""
    """Text for text-to-image models, a class label (e.g. "7") for class-conditional ones; or a list, one per image."""
    negative_prompt: str = ""
    """Text of the unconditional branch (text models only)."""
    num_inference_steps: int = 20
    """Denoising steps."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale; <= 1 turns CFG off."""
    height: int = 0
    """Image height in pixels (0: the model's default)."""
    width: int = 0
    """Image width in pixels (0: the model's default)."""
    seed: int = 0
    """Image i uses seed + i, so results do not depend on how images are split over ranks."""
    num_images: int = 1
    """How many images to make (split over the data axis)."""
    output: str = "outputs/"
    """Folder for images and the timing table."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, (str, int)) and not (
                isinstance(self.prompt, list) and all(isinstance(p, (str, int)) for p in self.prompt)):
            raise ValueError(f"run.prompt must be a string or a list of strings, got {_got(self.prompt)}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"run.negative_prompt must be a string, got {_got(self.negative_prompt)}")
        _check_int(f"{self.SECTION}.num_inference_steps", self.num_inference_steps)
        _check_int(f"{self.SECTION}.num_images", self.num_images)
        _check_int(f"{self.SECTION}.height", self.height, minimum=0)
        _check_int(f"{self.SECTION}.width", self.width, minimum=0)
        _check_int(f"{self.SECTION}.seed", self.seed, minimum=0)
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise ValueError(f"run.guidance_scale must be a number, got {_got(self.guidance_scale)}")
        if not isinstance(self.output, str) or not self.output:
            raise ValueError(f"run.output must be a folder path, got {_got(self.output)}")
        if isinstance(self.prompt, list) and len(self.prompt) not in (1, self.num_images):
            raise ValueError(f"run.prompt has {len(self.prompt)} entries but run.num_images is {self.num_images}; "
                             "give one prompt, or one per image")

    def prompts(self) -> list[str]:
        """One prompt per image."""
        p = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        p = [str(x) for x in p]
        return p * self.num_images if len(p) == 1 else p


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Limits and settings of `xdit-compile serve` (checked by the HTTP front before any rank does work)."""

    SECTION: ClassVar[str] = "serve"

    max_queue: int = 64
    """Requests waiting for the workers; one more is answered 429 with Retry-After."""
    max_steps: int = 100
    """Largest num_inference_steps a request may ask for."""
    max_images_per_request: int = 8
    """Largest n of a request."""
    request_timeout_s: float = 600
    """A request (queue wait + generation) still unfinished after this long is cancelled (504)."""
    heartbeat_timeout_s: float = 5.0
    """A rank silent for this long (e.g. SIGSTOPped) counts as down: its request fails 503, the group restarts."""
    api_key_env: str = "XDIT_API_KEY"
    """Name of the environment variable holding the API key (never the key itself); unset: no key needed."""
    output_dir: str = "outputs/"
    """Where job results are written, one server-made id per folder."""

    def __post_init__(self) -> None:
        _check_int(f"{self.SECTION}.max_queue", self.max_queue)
        _check_int(f"{self.SECTION}.max_steps", self.max_steps)
        _check_int(f"{self.SECTION}.max_images_per_request", self.max_images_per_request)
        for key in ("request_timeout_s", "heartbeat_timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{self.SECTION}.{key} must be a number of seconds > 0, got {_got(value)}")
        if not isinstance(self.api_key_env, str) or not self.api_key_env.replace("_", "").isalnum():
            raise ValueError(f"{self.SECTION}.api_key_env must name an environment variable (letters, digits, _), "
                             f"got {_got(self.api_key_env)}; put the key itself in that variable, not in the plan")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"{self.SECTION}.output_dir must be a folder path, got {_got(self.output_dir)}")


# --- the plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The whole recipe. Build one in code, with ``Plan.from_dict``, or with ``load_plan(path)``."""

    model: str | None = None
    """A diffusers model id or local path; only needed where the plan itself loads the model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel degrees (see ``ParallelConfig``)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Local attention backend (see ``AttentionConfig``)."""
    compile: CompileConfig = field(default_factory=CompileConfig)
    """Lowering of the rewritten graph (see ``CompileConfig``)."""
    pipefusion: PipeFusionConfig = field(default_factory=PipeFusionConfig)
    """Patches and warm-up of PipeFusion (see ``PipeFusionConfig``)."""
    vae: VaeConfig = field(default_factory=VaeConfig)
    """VAE decode (see ``VaeConfig``)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Cache acceleration (see ``CacheConfig``)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Inputs of ``xdit-compile run`` (see ``RunConfig``)."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Limits of ``xdit-compile serve`` (see ``ServeConfig``)."""
    dtype: str = "float32"
    """Weights and compute dtype: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model must be a string (a diffusers model id or path), got {_got(self.model)}")
        _check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise TypeError(
                    f"Plan({name}=...) must be a {cls.__name__}, got {_got(value)}; "
                    f"use Plan.from_dict to build a plan from plain dicts"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Build a plan from nested plain dicts; unknown keys and wrong types raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan must be a mapping of sections, got {_got(d)}")
        _check_keys("", d, [f.name for f in dataclasses.fields(cls)])
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            section = SECTIONS.get(key)
            if section is None:
                kwargs[key] = value
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"plan key '{key}' must be a table of settings, got {_got(value)}")
            _check_keys(key, value, [f.name for f in dataclasses.fields(section)])
            kwargs[key] = section(**value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts that ``from_dict`` turns back into an equal plan (``None`` values left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECTIONS:
                value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
            if value is not None:
                out[f.name] = value
        return out

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless the product of the parallel degrees is ``world_size``."""
        self.parallel.check_world_size(world_size)

    def unsupported_reason(self) -> str | None:
        """Why this plan cannot run in this version, or ``None`` if it can."""
        if self.compile.dynamic:
            return ("compile.dynamic=true is not supported yet: the sharding analysis works on static shapes "
                    "(each new input shape compiles once); set compile.dynamic = false")
        return None


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Plan)
    if f.default_factory is not dataclasses.MISSING and hasattr(f.default_factory, "SECTION")
}
"""Section name -> dataclass, derived from ``Plan``'s fields so a new section is declared in one place."""

for _name, _cls in SECTIONS.items():
    assert _cls.SECTION == _name, f"{_cls.__name__}.SECTION is {_cls.SECTION!r} but Plan names it {_name!r}"

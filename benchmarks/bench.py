"""Per-denoising-step transformer benchmark: 1 GPU (eager, Inductor) vs this project vs diffusers' native context
parallelism vs xDiT (xfuser), at 1, 2 and 4 GPUs, random bf16 weights at the real configs (issue 4).

One command on a 4-GPU machine (the driver launches one torchrun sub-run per (N, model, group) with
CUDA_VISIBLE_DEVICES=0..N-1, then merges everything into OUT/bench.md and OUT/scaling.png):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python benchmarks/bench.py --driver --gpus 4 --out benchmarks/results [--budget-s 3000]
    python benchmarks/bench.py --driver --tiny --gpus 2 --out /tmp/b     # CPU / gloo, tiny configs (harness test)
    python benchmarks/bench.py --merge --out DIR [--merge-from DIR2 ...]   # rebuild bench.md / scaling.png only

Rows: (model, method, N, degrees). Models: flux1024, flux2048 (FLUX.1-dev config, batch 1, 512 text tokens),
wan480 (WanTransformer3DModel() defaults = Wan2.1-T2V-14B, latent 16x21x60x104 -> 32,760 tokens, 512 text
tokens), sd3cfg (SD3-medium config, 1024x1024, batch 2 = [uncond, cond], 333 text tokens; the model for cfg=2).
Methods:
  eager      1 GPU, plain diffusers model                        (N=1 only)
  inductor   1 GPU, torch.compile(model)                         (N=1 only)
  xdit       xdit_compile.parallelize, eager lowering            (every N; at N=1: all degrees 1, the wrapper cost)
  xdit_ind   xdit_compile.parallelize, inductor lowering, compile.all_to_all = "nccl"  (every N)
  xdit_cg    the same + compile.cudagraphs (the step replayed as one CUDA graph, collectives included; also at N=1)
  xdit_cg_op xdit_cg with compile.decompose_collectives = false: Ulysses stays the opaque xdit op (the path
             before issue 4's functional collectives; A/B against xdit_cg)  (N>1)
  xdit_cg_ov xdit_cg + compile.overlap = true (Inductor's reorder_for_compute_comm_overlap)  (N>1)
  xdit_cg_sm xdit_cg with compile.all_to_all = "symm_mem" (Ulysses all-to-alls as Triton stores into the
             peers' symmetric-memory buffers + a barrier, instead of NCCL)  (N>1)
  xdit_cg_ag xdit_cg with compile.all_to_all = "allgather_kv" (one all-gather of k, v per attention, local
             queries on all heads, instead of the two all-to-alls)  (N>1)
  xdit_cg_ce xdit_cg with compile.all_to_all = "copy_engine" (q, k, v and the output moved by the copy engines
             straight into the peers' buffers, started early and waited for late, compute in between; completion
             as XDIT_CE_SIGNAL's default: a barrier kernel since 2026-11-27 session 9, stream-memop flags before)  (N>1);
             xdit_cg_ceb the same with XDIT_CE_SIGNAL=barrier, xdit_cg_cef with XDIT_CE_SIGNAL=flag,
             xdit_cg_ce_fm with compile.fuse_modulation = true (the modulation group as one GEMV);
             xdit_cg_ce_fms = xdit_cg_ce_fm with XDIT_CE_SIGNAL=spin (flags waited for by a kernel on the
             compute stream at the wait, not a barrier kernel spinning beside the compute); xdit_cg_ce_fml =
             xdit_cg_ce_fm with XDIT_CE_LOCAL=triton (each transfer's own piece by runtime/local_copy.py's kernel);
             xdit_cg_ce_fip = xdit_cg_ce_fm + compile.ce_in_place (q, k and the attention output written straight
             into the receive buffers: no own-piece copies, runtime/ce_in_place.py; the default since session 26, so
             xdit_cg_ce_fm has it too), xdit_cg_ce_fm_noip with it off;
             xdit_cg_ce_fm_rn = xdit_cg_ce_fm with compile.ring_transfer = "nccl" (ring degrees: k/v around the ring
             by NCCL send/recv; xdit_cg_ce_fm's "auto" moves them by the copy engines, runtime/ce_ring.py, where
             the ring is the whole job), xdit_cg_ce_fm_rce with "copy_engine" (inside ulysses x ring too);
             xdit_cg_ce_fsm1 = xdit_cg_ce_fm with XDIT_CE_SM_PEERS=1 (of each exposed transfer, one peer's piece
             stored by SMs over NVLink beside the copy engine's), _fsm2 two peers' pieces, _fsm3 every peer's
             piece by SMs (a GPU's copy-engine copies to its peers run one after another, session 28);
             xdit_cg_ce_fq2 / _fq4 = xdit_cg_ce_fm + compile.query_parts = 2 / 4 (attention in query parts, each
             part's output sent back beside the next part's attention); xdit_cg_ce_fc2 / _fc3 / _fc5 = xdit_cg_ce_fm
             + compile.ulysses_chunks = 2 / 3 / 5 (since session 10 under copy_engine only where the output has no
             partner: FLUX's double blocks, Wan's self-attention; the largest divisor of the local heads <= it),
             xdit_cg_ce_fc2sm1 = xdit_cg_ce_fc2 with XDIT_CE_SM_PEERS=1 (q's first chunk, the last output chunk);
             xdit_cg_ce_fmg = xdit_cg_ce_fm + compile.fuse_gelu = true (MLP linear + tanh-GELU as one cuBLASLt GEMM
             with a GELU epilogue). fuse_gelu is the default since session 11, so every xdit row has it unless
             its method turns it off (xdit_cg_ce_fm_nog: xdit_cg_ce_fm without it, the A/B of session 11);
             xdit_cg_ce_fm_fl = xdit_cg_ce_fm + compile.fuse_linears = true (linears of one input as one GEMM; the
             default since session 16, so xdit_cg_ce_fm has it too), xdit_cg_ce_fm_nol with it off;
             xdit_cg_ce_fm_sdpa / xdit_cg_ce_sdpa = xdit_cg_ce_fm / xdit_cg_ce with attention.backend = "sdpa" (cuDNN; the default "auto" runs
             flash_attn.cute's Hopper kernel where it imports, benchmarks/fa_cute_env.sh, since session 17);
             xdit_cg_ce_c2 / _c3 / _c5 the same with compile.ulysses_chunks = 2 / 3 / 5 (attention per head chunk, each
             chunk's transfers beside the neighbouring chunk's attention)
  xdit_cg_nomod  xdit_cg with compile.shard_modulation = false: every rank computes the AdaLN modulation linears
             whole (A/B against xdit_cg, which splits them by rows with one all-gather)  (N>1)
  xdit_cg_nocat  xdit_cg with compile.split_cat_linears = false: FLUX's single-block proj_out over the
             concatenation [attention, mlp] as one GEMM after a copy (A/B against xdit_cg; also at N=1)
  xdit_cg_mat / xdit_cg_ce_fm_mat  xdit_cg / xdit_cg_ce_fm with compile.max_autotune = true (Inductor times its
             Triton GEMM templates against cuBLAS per shape; xdit_cg_mat also at N=1)
  xdit_cg_cK xdit_cg + compile.ulysses_chunks = K (K = 2, 3, 5, 6: heads in K chunks, all-to-all of one chunk
             beside the attention of the previous one); xdit_cg_cKov the same + overlap  (N>1)
  diffusers  model.enable_parallelism(ContextParallelConfig(ulysses_degree, ring_degree)); every attention
             backend in DIFFUSERS_BACKENDS is tried, the row is the fastest (all listed in its note)  (N>1)
  diffusers_ind  the same with the _native_cudnn backend under torch.compile (the peer's compiled mode)  (N>1)
  xfuser     xDiT's transformer-level USP wrapper (e.g. xFuserFlux1Transformer2DWrapper), same degrees  (N>1)
  xfuser_ind the same under torch.compile (xfuser's use_torch_compile: torch.compile(transformer.forward))  (N>1)
Degrees at N=2: ulysses 2, ring 2 (+ cfg 2 for sd3cfg); N=4: ulysses 4, ring 4, ulysses 2 x ring 2
(+ cfg 2 x ulysses 2 for sd3cfg). A peer that can't do a degree set (diffusers has no cfg parallelism and
no _cp_plan for SD3) or fails to import/run is recorded as "n/a: <reason>" and the run goes on.

Per row: the model is built directly in the run dtype on the device with torch.manual_seed(0) (same weights on
every rank, checked by a checksum; xfuser's wrapper subclasses the diffusers class, so it gets the same
weights too), 2 warm-up calls, median of >= 5 CUDA-event timings (rank 0's; the max over ranks is kept too),
peak memory = torch.cuda.max_memory_allocated() after reset_peak_memory_stats() (max over ranks, weights
included), rel err = ||out - ref|| / ||ref|| against the 1-GPU eager output of the same model (stored by the
N=1 sub-run in OUT/ref/<model>.pt; inductor rows also against the 1-GPU inductor output, "like-for-like").

FLOPs per step (analytic, `flops_per_step`): 2 x multiply-adds of every matmul, i.e.
  linear layers:  2 x tokens x d_in x d_out for every nn.Linear applied to a token (timestep/pooled embeddings,
                  one row per sample, are left out: < 0.01%)
  attention:      4 x B x H x S_q x S_kv x D per attention layer (QK^T and PV; softmax etc. not counted)
The driver also counts a meta-device forward with torch.utils.flop_counter.FlopCounterMode (SDPA as math) and
records it (meta.json flops_counted) as a check of the formula: they agree within 0.02% for the real configs.
Compute floor of a row = FLOPs / (N x measured bf16 matmul TFLOP/s, an 8192^3 torch.matmul on GPU 0, median
of 10); "floor frac" = floor / measured time.

Resumable: rows land in OUT/rows.jsonl (one JSON object a line); a driver run skips rows whose key is already
there with a time (use --force to redo), so a long matrix can be split over several commands (--models,
--methods, --ns) that share OUT. --budget-s: a row whose usual cost would run past the budget is recorded as
"skipped: time budget" instead.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ["flux1024", "flux2048", "wan480", "sd3cfg"]
CHUNKED = {f"xdit_cg_c{k}{ov}": {"lowering": "inductor", "cudagraphs": True, "ulysses_chunks": k, "overlap": bool(ov),
                                  "all_to_all": "nccl"}
           for k in (2, 3, 5, 6) for ov in ("", "ov")}
# compile section of each xdit method's plan (decompose_collectives defaults to true; all_to_all defaults to "auto",
# copy_engine when Ulysses spans one host's GPUs, so the NCCL rows name it)
XDIT_COMPILE = {"xdit": {"lowering": "eager"}, "xdit_ind": {"lowering": "inductor", "all_to_all": "nccl"},
                "xdit_cg_op": {"lowering": "inductor", "cudagraphs": True, "decompose_collectives": False},
                "xdit_cg": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "nccl"},
                "xdit_cg_ov": {"lowering": "inductor", "cudagraphs": True, "overlap": True, "all_to_all": "nccl"},
                "xdit_cg_sm": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "symm_mem"},
                "xdit_cg_ag": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "allgather_kv"},
                "xdit_cg_ce": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine"},
                "xdit_cg_ce_sdpa": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine"},
                "xdit_cg_ceb": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine"},
                "xdit_cg_cef": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine"},
                "xdit_cg_ce_fm": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                  "fuse_modulation": True},
                "xdit_cg_ce_fms": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                   "fuse_modulation": True},
                "xdit_cg_ce_fml": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                   "fuse_modulation": True},
                "xdit_cg_ce_fip": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                   "fuse_modulation": True, "ce_in_place": True},
                "xdit_cg_ce_fm_rn": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                     "fuse_modulation": True, "ring_transfer": "nccl"},
                "xdit_cg_ce_fm_rce": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                      "fuse_modulation": True, "ring_transfer": "copy_engine"},
                "xdit_cg_ce_fm_noip": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                       "fuse_modulation": True, "ce_in_place": False},
                **{f"xdit_cg_ce_fsm{k}": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                          "fuse_modulation": True} for k in (1, 2, 3)},
                **{f"xdit_cg_ce_fq{p}": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                         "fuse_modulation": True, "query_parts": p} for p in (2, 4)},
                "xdit_cg_ce_fmg": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                   "fuse_modulation": True, "fuse_gelu": True},
                "xdit_cg_ce_fm_nog": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                      "fuse_modulation": True, "fuse_gelu": False},
                "xdit_cg_ce_fm_nr": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                     "fuse_modulation": True, "fuse_norm_rope": False},
                "xdit_cg_ce_fm_fl": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                     "fuse_modulation": True, "fuse_linears": True},
                "xdit_cg_ce_fm_nol": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                      "fuse_modulation": True, "fuse_linears": False},
                **{f"xdit_cg_ce_fc{c}": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                         "fuse_modulation": True, "ulysses_chunks": c} for c in (2, 3, 5)},
                "xdit_cg_ce_fc2sm1": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                      "fuse_modulation": True, "ulysses_chunks": 2},
                "xdit_cg_ce_fm_sdpa": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                       "fuse_modulation": True},
                "xdit_cg_ce_c2": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                  "ulysses_chunks": 2},
                "xdit_cg_ce_c3": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                  "ulysses_chunks": 3},
                "xdit_cg_ce_c5": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                  "ulysses_chunks": 5},
                "xdit_cg_nomod": {"lowering": "inductor", "cudagraphs": True, "shard_modulation": False,
                                  "all_to_all": "nccl"},
                "xdit_cg_nocat": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "nccl",
                                  "split_cat_linears": False},
                "xdit_cg_mat": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "nccl",
                                "max_autotune": True},
                "xdit_cg_ce_fm_mat": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "copy_engine",
                                      "fuse_modulation": True, "max_autotune": True},
                "xdit_cg_smnm": {"lowering": "inductor", "cudagraphs": True, "all_to_all": "symm_mem",
                                 "shard_modulation": False}, **CHUNKED}
# attention section of a method's plan (default: backend "auto", flash_attn.cute's kernel where it imports)
XDIT_ATTENTION = {"xdit_cg_ce_fm_sdpa": {"backend": "sdpa"}, "xdit_cg_ce_sdpa": {"backend": "sdpa"}}
XDIT_ENV = {"xdit_cg_ceb": {"XDIT_CE_SIGNAL": "barrier"}, "xdit_cg_cef": {"XDIT_CE_SIGNAL": "flag"},
            "xdit_cg_ce_fms": {"XDIT_CE_SIGNAL": "spin"}, "xdit_cg_ce_fml": {"XDIT_CE_LOCAL": "triton"},
            "xdit_cg_ce_fsm1": {"XDIT_CE_SM_PEERS": "1"}, "xdit_cg_ce_fsm2": {"XDIT_CE_SM_PEERS": "2"},
            "xdit_cg_ce_fsm3": {"XDIT_CE_SM_PEERS": "3"}, "xdit_cg_ce_fc2sm1": {"XDIT_CE_SM_PEERS": "1"}}  # environment while the method builds and runs
XDIT_METHODS = tuple(XDIT_COMPILE)
MAIN_METHODS = ["eager", "inductor", *XDIT_METHODS, "diffusers", "diffusers_ind"]  # one sub-run
XFUSER_METHODS = ("xfuser", "xfuser_ind")
METHODS = [*MAIN_METHODS, *XFUSER_METHODS]
DIFFUSERS_BACKENDS = ["_native_cudnn", "flash", "_native_flash", "native"]
SAFE_ENV = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
# rough seconds per row on one H100 (build, compile, 7 calls), for --budget-s (the whole-FLUX compile with
# CUDA graphs took 130-154 s on 4 x H100 in session 13)
EST_S = {"eager": 20, "inductor": 100, "xdit": 25, "xdit_ind": 100, "xdit_cg_op": 150, "xdit_cg": 150,
         "xdit_cg_ov": 100, "xdit_cg_sm": 150, "xdit_cg_ag": 150, "xdit_cg_ce": 150, "xdit_cg_ceb": 150, "xdit_cg_cef": 150, "xdit_cg_ce_fm": 150, "xdit_cg_ce_fms": 150, "xdit_cg_ce_fml": 150, "xdit_cg_ce_fip": 150, "xdit_cg_ce_fm_noip": 150, "xdit_cg_ce_fm_rn": 150, "xdit_cg_ce_fm_rce": 150, "xdit_cg_ce_fsm1": 150, "xdit_cg_ce_fsm2": 150, "xdit_cg_ce_fsm3": 150, "xdit_cg_ce_fq2": 150, "xdit_cg_ce_fq4": 150, "xdit_cg_ce_fc2": 150, "xdit_cg_ce_fc3": 150, "xdit_cg_ce_fc5": 150, "xdit_cg_ce_fc2sm1": 150, "xdit_cg_ce_fmg": 150, "xdit_cg_ce_fm_nog": 150, "xdit_cg_ce_fm_nr": 150, "xdit_cg_ce_fm_fl": 150, "xdit_cg_ce_fm_nol": 150, "xdit_cg_ce_fm_sdpa": 150, "xdit_cg_ce_sdpa": 150, "xdit_cg_ce_c2": 150, "xdit_cg_ce_c3": 150, "xdit_cg_ce_c5": 150, "xdit_cg_nomod": 150, "xdit_cg_nocat": 150, "xdit_cg_mat": 250, "xdit_cg_ce_fm_mat": 250, "xdit_cg_smnm": 150,
         **{m: 100 for m in CHUNKED}, "diffusers": 40, "diffusers_ind": 100, "xfuser": 40, "xfuser_ind": 100}
EST_SCALE = {"flux1024": 1.0, "flux2048": 1.5, "wan480": 1.0, "sd3cfg": 0.5}
T0 = time.time()

# ----------------------------------------------------------------------------------------- model configs
FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=8, out_channels=None, num_layers=1, num_single_layers=2,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=20,
                 pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
WAN_14B = {}  # WanTransformer3DModel() defaults: 40 layers, 40 x 128 heads, ffn 13824, text_dim 4096
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                out_channels=4, text_dim=20, freq_dim=24, ffn_dim=48, num_layers=2, rope_max_seq_len=64)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=32,
                pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16)

# model -> (diffusers class, config, size); flux: h, w = packed token grid; wan: latent (C, F, H, W);
# sd3: latent (C, H, W), batch 2
SPECS = {
    "flux1024": ("FluxTransformer2DModel", FLUX_DEV, dict(h=64, w=64, txt=512, batch=1)),
    "flux2048": ("FluxTransformer2DModel", FLUX_DEV, dict(h=128, w=128, txt=512, batch=1)),
    "wan480": ("WanTransformer3DModel", WAN_14B, dict(c=16, f=21, h=60, w=104, txt=512, batch=1)),
    "sd3cfg": ("SD3Transformer2DModel", SD3_MEDIUM, dict(c=16, h=128, w=128, txt=333, batch=2)),
}
TINY_SPECS = {
    "flux1024": ("FluxTransformer2DModel", FLUX_TINY, dict(h=8, w=8, txt=16, batch=1)),
    "flux2048": ("FluxTransformer2DModel", FLUX_TINY, dict(h=16, w=16, txt=16, batch=1)),
    "wan480": ("WanTransformer3DModel", WAN_TINY, dict(c=4, f=3, h=8, w=12, txt=8, batch=1)),
    "sd3cfg": ("SD3Transformer2DModel", SD3_TINY, dict(c=4, h=8, w=12, txt=7, batch=2)),
}
HAS_CFG = {"sd3cfg"}
XFUSER_CLASSES = {"FluxTransformer2DModel": "xFuserFlux1Transformer2DWrapper",
                  "WanTransformer3DModel": "xFuserWanTransformer3DWrapper",
                  "SD3Transformer2DModel": "xFuserSD3Transformer2DWrapper"}


def spec(model, tiny):
    return (TINY_SPECS if tiny else SPECS)[model]


DEGS_FILTER: set[str] = set()   # --degs: only these degree strings (e.g. u4,cfg2xu2); empty = all


def degree_sets(n, model):
    """Degree dicts (ulysses, ring, cfg) benchmarked at world size n (filtered by --degs)."""
    return [d for d in _degree_sets(n, model) if n == 1 or not DEGS_FILTER or deg_str(d) in DEGS_FILTER]


def _degree_sets(n, model):
    if n == 1:
        return [dict(ulysses=1, ring=1, cfg=1)]
    out = [dict(ulysses=n, ring=1, cfg=1), dict(ulysses=1, ring=n, cfg=1)]
    if n >= 4 and n % 2 == 0:
        out.append(dict(ulysses=n // 2, ring=2, cfg=1))
    if model in HAS_CFG and n % 2 == 0:
        out.append(dict(ulysses=n // 2, ring=1, cfg=2))
    return out


def deg_str(d):
    parts = [f"{k[0] if k != 'cfg' else 'cfg'}{v}" for k, v in (("cfg", d["cfg"]), ("ulysses", d["ulysses"]),
                                                                  ("ring", d["ring"])) if v > 1]
    return "x".join(parts) or "1"


def methods_for(n, methods):
    if n == 1:
        return [m for m in methods if m in ("eager", "inductor", "xdit", "xdit_ind", "xdit_cg", "xdit_cg_nocat",
                                          "xdit_cg_mat")]
    return [m for m in methods if m in (*XDIT_METHODS, "diffusers", "diffusers_ind", *XFUSER_METHODS)]


def _decomposed_note(m):
    """How many sequence-parallel attentions Inductor got as functional all-to-alls (compile.decompose_collectives)."""
    reps = m._xdit_compiler.reports
    att = [a for r in reps for a in r["attention"] if "seq_sizes" in a]
    mod = [g for r in reps for g in r.get("modulation", ())]
    mod = (f"; modulation: {sum(g['linears'] for g in mod)} linears sharded, {len(mod)} all-gather(s)" if mod else "")
    fa3 = sum((r.get("fused") or {}).get("fa3_attention", 0) for r in reps)
    mod += f"; {fa3} SDPA as fa3_cute" if fa3 else ""
    if not att:
        return mod.lstrip("; ")
    became = " ".join(a.get("became", "") for a in att)
    rings = [a["became"] for a in att if a.get("became", "").startswith("ring")]
    if rings:
        ce = sum("copy engines" in b for b in rings)
        return f"ring: k/v by the copy engines in {ce}/{len(rings)} attention, NCCL send/recv in the rest{mod}"
    how = ("symm-mem all-to-all" if "symm_all_to_all" in became else
           "copy-engine all-to-all" if "copy-engine" in became else
           "all-gather k/v" if "all-gather of k, v" in became else "all-to-all as functional collectives")
    usp_ce = sum("(k/v by the copy engines)" in a.get("became", "") for a in att)
    how += f" (ring k/v by the copy engines in {usp_ce})" if usp_ce else ""
    inplace = sum("written in place" in a.get("became", "") for a in att)
    how += f" ({inplace} written in place)" if inplace else ""
    return f"{how}: {sum(bool(a.get('decomposed')) for a in att)}/{len(att)} attention{mod}"


def row_key(model, method, n, d):
    return f"{model}|{method}|N{n}|{deg_str(d)}"


# ------------------------------------------------------------------------------------------ FLOP formula
def flops_per_step(model, tiny=False):
    """Analytic FLOPs of one transformer forward (see the module docstring)."""
    cls, cfg, s = spec(model, tiny)
    B = s["batch"]
    if cls == "FluxTransformer2DModel":
        H, D = cfg["num_attention_heads"], cfg["attention_head_dim"]
        d = H * D
        Si, St = s["h"] * s["w"], s["txt"]
        S = Si + St
        L2, L1 = cfg["num_layers"], cfg["num_single_layers"]
        # double block, per token of each stream: q,k,v,out 4d^2 + ff d*4d*2 = 12 d^2 MACs
        # single block, per token: q,k,v 3d^2 + proj_mlp 4d^2 + proj_out 5d*d = 12 d^2
        lin = L2 * 12 * d * d * S + L1 * 12 * d * d * S
        lin += Si * cfg["in_channels"] * d + St * cfg["joint_attention_dim"] * d + Si * d * cfg["in_channels"]
        attn = (L2 + L1) * 4 * H * S * S * D
        return 2 * B * lin + B * attn
    if cls == "WanTransformer3DModel":
        H = cfg.get("num_attention_heads", 40)
        D = cfg.get("attention_head_dim", 128)
        ffn, L = cfg.get("ffn_dim", 13824), cfg.get("num_layers", 40)
        tdim, cin = cfg.get("text_dim", 4096), s["c"]
        p = cfg.get("patch_size", (1, 2, 2))
        d = H * D
        S = (s["f"] // p[0]) * (s["h"] // p[1]) * (s["w"] // p[2])
        St = s["txt"]
        # per block: self-attn q,k,v,o 4d^2 per token; cross-attn q,o 2d^2 per token, k,v 2d^2 per text token;
        # ffn 2 d ffn per token
        lin = L * (S * (6 * d * d + 2 * d * ffn) + St * 2 * d * d)
        lin += St * (tdim * d + d * d)  # text embedder (2 linears)
        pp = p[0] * p[1] * p[2]
        lin += S * (cin * pp * d + d * cfg.get("out_channels", 16) * pp)  # patch embed conv + proj_out
        attn = L * (4 * H * S * S * D + 4 * H * S * St * D)
        return 2 * B * lin + B * attn
    if cls == "SD3Transformer2DModel":
        H, D = cfg["num_attention_heads"], cfg["attention_head_dim"]
        d = H * D
        pch = cfg["patch_size"]
        Si = (s["h"] // pch) * (s["w"] // pch)
        St = s["txt"]
        L = cfg["num_layers"]
        # every block: image stream 12 d^2 per token; text stream 12 d^2 per token except the last block
        # (context_pre_only: only q,k,v = 3 d^2)
        lin = L * 12 * d * d * Si + (L - 1) * 12 * d * d * St + 3 * d * d * St
        lin += St * cfg["joint_attention_dim"] * d + Si * (s["c"] * pch * pch * d * 2)
        attn = L * 4 * H * (Si + St) ** 2 * D
        return 2 * B * lin + B * attn
    raise ValueError(cls)


# ------------------------------------------------------------------------------------------------ worker
def log(*a):
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def build_model(model, tiny, device, dtype, cls_override=None, layers=0):
    """The model with random weights; ``layers`` > 0 keeps only that many blocks (Flux: that many double and
    twice as many single blocks), for quick checks of one block's time and compile cost."""
    import diffusers
    import torch
    cls_name, cfg, _ = spec(model, tiny)
    if layers:
        cfg = {**cfg, "num_layers": layers, **({"num_single_layers": 2 * layers} if "Flux" in cls_name else {})}
    cls = cls_override or getattr(diffusers, cls_name)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # init directly in the target dtype, on the device
    try:
        with torch.device(device):
            m = cls(**cfg)
    finally:
        torch.set_default_dtype(prev)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def checksum(m):
    import torch
    s = torch.zeros((), dtype=torch.float64, device=next(m.parameters()).device)
    for i, p in enumerate(m.parameters()):
        s += p.double().sum() * ((i % 7) + 1)
    return s.item()


def make_inputs(model, tiny, device, dtype):
    import torch
    cls_name, cfg, s = spec(model, tiny)
    g = torch.Generator().manual_seed(1234)
    B = s["batch"]
    if cls_name == "FluxTransformer2DModel":
        h, w, txt = s["h"], s["w"], s["txt"]
        ids = torch.zeros(h, w, 3)  # diffusers' FluxPipeline._prepare_latent_image_ids
        ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
        kw = dict(hidden_states=torch.randn(B, h * w, cfg["in_channels"], generator=g),
                  encoder_hidden_states=torch.randn(B, txt, cfg["joint_attention_dim"], generator=g),
                  pooled_projections=torch.randn(B, cfg["pooled_projection_dim"], generator=g),
                  timestep=torch.full((B,), 1.0), img_ids=ids.reshape(h * w, 3), txt_ids=torch.zeros(txt, 3),
                  guidance=torch.full((B,), 3.5))
        floats = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    elif cls_name == "WanTransformer3DModel":
        kw = dict(hidden_states=torch.randn(B, s["c"], s["f"], s["h"], s["w"], generator=g),
                  encoder_hidden_states=torch.randn(B, s["txt"], cfg.get("text_dim", 4096), generator=g),
                  timestep=torch.full((B,), 500.0))
        floats = ("hidden_states", "encoder_hidden_states")
    else:  # SD3, batch = [uncond, cond]
        kw = dict(hidden_states=torch.randn(B, s["c"], s["h"], s["w"], generator=g),
                  encoder_hidden_states=torch.randn(B, s["txt"], cfg["joint_attention_dim"], generator=g),
                  pooled_projections=torch.randn(B, cfg["pooled_projection_dim"], generator=g),
                  timestep=torch.full((B,), 500.0))
        floats = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    out = {k: (v.to(device, dtype) if k in floats else v.to(device)) for k, v in kw.items()}
    out["return_dict"] = False
    return out


class Worker:
    def __init__(self, args):
        import torch
        import torch.distributed as dist
        self.args, self.tiny = args, args.tiny
        lr = int(os.environ.get("LOCAL_RANK", 0))
        if self.tiny:
            self.device, self.dtype, backend = torch.device("cpu"), torch.float32, "gloo"
        else:
            torch.cuda.set_device(lr)
            self.device, self.dtype, backend = torch.device("cuda", lr), torch.bfloat16, "nccl"
        dist.init_process_group(backend, device_id=self.device if self.device.type == "cuda" else None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.done = load_done(args.out) if not args.force else set()
        self.deadline = args.deadline or float("inf")

    # --- helpers (collectives: every rank calls them in the same order)
    def sync(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def allmax(self, vals):
        import torch
        import torch.distributed as dist
        t = torch.tensor([float("inf") if v != v else v for v in vals], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def agree(self, flag):
        return self.allmax([0.0 if flag else 1.0])[0] == 0.0

    def reset_mem(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self):
        import torch
        m = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else float("nan")
        return m

    def call(self, fn, inputs):
        import torch
        with torch.no_grad():
            out = fn(**inputs)
        while isinstance(out, (tuple, list)) or hasattr(out, "sample"):  # xfuser's SD3 wrapper: ((sample,),)
            out = out[0] if isinstance(out, (tuple, list)) else out.sample
        return out

    def timed(self, fn, inputs):
        import torch
        import torch.distributed as dist
        for _ in range(self.args.warmup):
            out = self.call(fn, inputs)
        self.sync()
        ts = []
        for _ in range(self.args.iters):
            dist.barrier()
            k = self.args.calls_per_sample
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if self.args.gpu_ahead_ms:   # the GPU sleeps while the CPU queues the first call: no CPU lead timed
                    torch.cuda._sleep(int(self.args.gpu_ahead_ms * 2e6))   # cycles, ~2 GHz
                a.record()
                for _ in range(k):   # back to back, as a denoising loop calls it: the CPU may run ahead
                    out = self.call(fn, inputs)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / k)
            else:
                t = time.perf_counter()
                out = self.call(fn, inputs)
                ts.append((time.perf_counter() - t) * 1e3)
        med = statistics.median(ts)
        return med, self.allmax([med])[0], out, ts

    def rel_err(self, out, ref):
        if ref is None:
            return None
        o, r = out.detach().float().cpu(), ref.float()
        if o.shape != r.shape:
            return self.allmax([float("inf")])[0]
        return self.allmax([((o - r).norm() / r.norm()).item()])[0]

    def record(self, row):
        row.setdefault("time", datetime.datetime.now().isoformat(timespec="seconds"))
        if self.rank == 0:
            write_row(self.args.out, row)
            log("ROW", json.dumps({k: v for k, v in row.items() if k not in ("times", "traceback")}))

    def base_row(self, model, method, d, **kw):
        return dict(key=row_key(model, method, self.world, d), model=model, method=method, n=self.world,
                    degrees=d, deg=deg_str(d), tiny=self.tiny, **kw)

    def fits(self, model, method):
        est = EST_S[method] * EST_SCALE[model] * (0.05 if self.tiny else 1.0)
        return self.agree(time.time() + est <= self.deadline)

    def ref(self, model, which="eager"):
        import torch
        name = f"{model}{'' if which == 'eager' else '_' + which}.pt"
        p = os.path.join(self.args.ref_dir or self.args.out, "ref", name)
        if not os.path.exists(p):
            return None
        return torch.load(p, map_location="cpu")["out"]

    def save_ref(self, model, out, which="eager", **extra):
        import torch
        if self.rank != 0:
            return
        d = os.path.join(self.args.out, "ref")
        os.makedirs(d, exist_ok=True)
        torch.save(dict(out=out.detach().cpu(), **extra),
                   os.path.join(d, f"{model}{'' if which == 'eager' else '_' + which}.pt"))

    # --- one row of a method; every failure becomes a row
    def guarded(self, model, method, d, fn):
        import torch
        key = row_key(model, method, self.world, d)
        if key in self.done:
            log(f"{key}: already in rows.jsonl, skipped")
            return
        if not self.fits(model, method):
            self.record(self.base_row(model, method, d, ms=None, note="skipped: time budget"))
            return
        try:
            row = fn()
        except Exception as e:
            tb = traceback.format_exc()
            print(f"[rank {self.rank}] {key} FAILED\n{tb}", flush=True)
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            row = dict(ms=None, note=f"n/a: {type(e).__name__}: {msg}", traceback=tb[-3000:])
        finally:
            torch._dynamo.reset()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        # (a rank that fails alone leaves the others in a collective: the driver's --subrun-timeout ends that)
        self.record(self.base_row(model, method, d, **row))

    def measure(self, fn, inputs, model, ref=None, ref_like=None, first_call=True):
        """first call (compile) + timing + errors -> row dict."""
        self.reset_mem()
        t = time.time()
        if first_call:
            log(f"{model}: first call (compile, CUDA-graph capture) ...")
            self.call(fn, inputs)
            self.sync()
        first_s = time.time() - t
        if first_call:    # in the log, so a sub-run that times out tells compile from timing
            log(f"{model}: first call done in {first_s:.1f}s; timing")
        ms, msx, out, ts = self.timed(fn, inputs)
        peak = self.allmax([self.peak_gib()])[0] if self.device.type == "cuda" else None
        row = dict(ms=ms, ms_max_over_ranks=msx, times=ts, peak_gib=peak, first_call_s=first_s,
                   rel_err=self.rel_err(out, ref), note="")
        if ref_like is not None:
            row["rel_err_like"] = self.rel_err(out, ref_like)
        return row, out

    # --- methods
    def run_main(self, model, methods):
        import torch
        import xdit_compile
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
        inputs = make_inputs(model, self.tiny, self.device, self.dtype)
        m = None
        todo = [(meth, d) for meth in methods if not meth.startswith("diffusers")
                for d in degree_sets(self.world, model)]
        need_model = any(row_key(model, meth, self.world, d) not in self.done for meth, d in todo)
        if need_model:
            t = time.time()
            m = build_model(model, self.tiny, self.device, self.dtype)
            self.sync()
            cs = checksum(m)
            same = self.allmax([cs])[0] == -self.allmax([-cs])[0]
            log(f"{model}: built {sum(p.numel() for p in m.parameters()) / 1e9:.3f} B params in "
                f"{time.time() - t:.1f}s, weights identical on all ranks: {same}")
        ref = self.ref(model)
        ref_ind = self.ref(model, "inductor")
        for meth in methods:
            if meth.startswith("diffusers"):
                continue
            for d in degree_sets(self.world, model):
                if meth == "eager":
                    def fn():
                        row, out = self.measure(m, inputs, model, ref=ref, first_call=False)
                        self.save_ref(model, out, checksum=checksum(m))
                        row.update(rel_err=0.0 if ref is None else row["rel_err"])
                        return row
                elif meth == "inductor":
                    def fn():
                        cm = torch.compile(m)
                        row, out = self.measure(cm, inputs, model, ref=self.ref(model))
                        self.save_ref(model, out, which="inductor")
                        return row
                elif meth in XDIT_METHODS:
                    def fn(d=d, meth=meth):
                        comp = dict(XDIT_COMPILE[meth])
                        plan = {"parallel": dict(d), "compile": comp, "attention": XDIT_ATTENTION.get(meth, {})}
                        saved = {k: os.environ.get(k) for k in XDIT_ENV.get(meth, {})}
                        os.environ.update(XDIT_ENV.get(meth, {}))
                        xdit_compile.parallelize(m, plan)
                        try:
                            row, out = self.measure(m, inputs, model, ref=self.ref(model),
                                                    ref_like=self.ref(model, "inductor") if meth != "xdit"
                                                    else None)
                            row["plan"] = plan
                            if comp["lowering"] == "inductor":
                                row["note"] = " ".join(filter(None, [row.get("note"), _decomposed_note(m)]))
                            return row
                        finally:
                            xdit_compile.unparallelize(m)
                            for k, v in saved.items():
                                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                else:
                    continue
                if self.world == 1 or meth not in ("eager", "inductor"):
                    self.guarded(model, meth, d, fn)
        del m, ref, ref_ind
        for meth in ("diffusers", "diffusers_ind"):
            if meth in methods and self.world > 1:
                for d in degree_sets(self.world, model):
                    self.guarded(model, meth, d,
                                 lambda d=d, c=meth == "diffusers_ind": self.run_diffusers(model, d, inputs, c))

    def run_diffusers(self, model, d, inputs, compiled=False):
        """diffusers' native CP on a freshly built model (its hooks can't be removed)."""
        import torch
        if d["cfg"] > 1:
            raise NotImplementedError("diffusers' ContextParallelConfig has no cfg parallelism")
        from diffusers import ContextParallelConfig
        cls_name = spec(model, self.tiny)[0]
        import diffusers
        if getattr(getattr(diffusers, cls_name), "_cp_plan", None) is None:
            raise NotImplementedError(f"{cls_name} has no _cp_plan in diffusers {diffusers.__version__}")
        if self.device.type == "cpu" and torch.accelerator.device_count() == 0:
            torch.accelerator.device_count = lambda: 1  # diffusers does rank % device_count() even on CPU
        import gc
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        m = build_model(model, self.tiny, self.device, self.dtype)
        backends = ["native"] if self.tiny else DIFFUSERS_BACKENDS
        m.set_attention_backend(backends[-1] if self.tiny else "native")
        kw = {}
        if d["ulysses"] > 1:
            kw["ulysses_degree"] = d["ulysses"]
        if d["ring"] > 1:
            kw["ring_degree"] = d["ring"]
        m.enable_parallelism(config=ContextParallelConfig(**kw))
        ref = self.ref(model)
        best, notes, rows = None, [], {}
        if compiled:  # the peer's compiled mode: its fastest GPU backend under torch.compile
            backends = backends[:1]
            m.set_attention_backend(backends[0])
            cm = torch.compile(m)
            row, out = self.measure(cm, inputs, model, ref=ref, ref_like=self.ref(model, "inductor"))
            del m, cm, out
            row.update(backend=backends[0], note=f"torch.compile, backend {backends[0]}")
            return row
        for be in backends:
            try:
                m.set_attention_backend(be)
                self.call(m, inputs)
                self.sync()
                ok = self.agree(True)
            except Exception as e:
                print(f"[rank {self.rank}] diffusers backend {be} failed: {traceback.format_exc()}", flush=True)
                self.agree(False)
                notes.append(f"{be}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
                continue
            if not ok:
                notes.append(f"{be}: failed on another rank")
                continue
            row, out = self.measure(m, inputs, model, ref=ref, first_call=False)
            del out
            rows[be] = row
            notes.append(f"{be}: {row['ms']:.1f} ms")
            if best is None or row["ms"] < rows[best]["ms"]:
                best = be
        del m
        if best is None:
            raise RuntimeError("no attention backend ran: " + "; ".join(notes))
        row = dict(rows[best])
        row.update(backend=best, note="fastest backend " + best + " (" + "; ".join(notes) + ")",
                   backends={b: r["ms"] for b, r in rows.items()})
        return row

    def run_xfuser(self, model, d, method="xfuser"):
        inputs = make_inputs(model, self.tiny, self.device, self.dtype)
        self.guarded(model, method, d, lambda: self._xfuser(model, d, inputs, compiled=method == "xfuser_ind"))

    def _xfuser(self, model, d, inputs, compiled=False):
        import importlib
        import pkgutil
        import torch
        import xfuser  # noqa: F401  (ImportError -> "n/a: ModuleNotFoundError ...")
        from xfuser import xFuserArgs
        from xfuser.core.distributed import (get_runtime_state, init_distributed_environment,
                                             initialize_model_parallel, initialize_runtime_state)
        cls_name = spec(model, self.tiny)[0]
        want = XFUSER_CLASSES[cls_name]
        cls = None
        import xfuser.model_executor.models as xm
        for info in pkgutil.walk_packages(xm.__path__, xm.__name__ + "."):
            try:
                mod = importlib.import_module(info.name)
            except Exception:
                continue
            c = getattr(mod, want, None)
            if c is not None and isinstance(c, type) and issubclass(c, torch.nn.Module):
                cls = c  # a subclass of the diffusers class (config kwargs) or a wrapper of an instance
                break
        if cls is None:
            raise NotImplementedError(f"no transformer-level {want} (a subclass of {cls_name}) in xfuser "
                                      f"{getattr(xfuser, '__version__', '?')}")
        init_distributed_environment(rank=self.rank, world_size=self.world)
        eargs = xFuserArgs(model="none", ulysses_degree=d["ulysses"], ring_degree=d["ring"],
                           use_cfg_parallel=d["cfg"] > 1)
        engine_config, _ = eargs.create_config()
        try:
            from xfuser.core.distributed import model_parallel_is_initialized
            already = model_parallel_is_initialized()
        except ImportError:
            already = False
        if not already:
            initialize_model_parallel(data_parallel_degree=1, classifier_free_guidance_degree=d["cfg"],
                                      sequence_parallel_degree=d["ulysses"] * d["ring"],
                                      ulysses_degree=d["ulysses"], ring_degree=d["ring"])
        import diffusers
        if issubclass(cls, getattr(diffusers, cls_name)):
            m = build_model(model, self.tiny, self.device, self.dtype, cls_override=cls)
        else:  # e.g. xFuserSD3Transformer2DWrapper(transformer): wraps a built diffusers model
            m = cls(build_model(model, self.tiny, self.device, self.dtype)).eval()
        ref_cs = None
        p = os.path.join(self.args.ref_dir or self.args.out, "ref", f"{model}.pt")
        if os.path.exists(p):
            ref_cs = torch.load(p, map_location="cpu").get("checksum")
        cs = checksum(m)

        class Holder:
            transformer = m
            vae_scale_factor = 8
            vae_scale_factor_spatial, vae_scale_factor_temporal = 8, 4
        s = spec(model, self.tiny)[2]
        if cls_name == "WanTransformer3DModel":
            # what xfuser's Wan runner does (runner_models/base_model.py): the runtime state from a pipeline whose
            # class name starts with "Wan" (its video branch, which reads the tuple patch size), and no input
            # parameters: the wrapper splits the sequence itself
            initialize_runtime_state(type("WanPipeline", (Holder,), {})(), engine_config)
        else:
            initialize_runtime_state(Holder(), engine_config)
            hw = (s["h"] * 16, s["w"] * 16) if cls_name == "FluxTransformer2DModel" else (s["h"] * 8, s["w"] * 8)
            get_runtime_state().set_input_parameters(
                height=hw[0], width=hw[1], batch_size=s["batch"], max_condition_sequence_length=s["txt"],
                split_text_embed_in_sp=True)
        if compiled:   # what xfuser's pipelines do with use_torch_compile (base_pipeline._convert_transformer_backbone)
            m.forward = torch.compile(m.forward)
        row, out = self.measure(m, inputs, model, ref=self.ref(model))
        row["note"] = f"{cls.__module__}.{cls.__name__}" + (" under torch.compile" if compiled else "") + (
            "" if ref_cs is None or ref_cs == cs else " (WARNING: weights differ from the 1-GPU model)")
        return row


def worker_main(args):
    w = Worker(args)
    sys.path.insert(0, ROOT)
    methods = args.methods.split(",")
    for model in args.models.split(","):
        if any(m in XFUSER_METHODS for m in methods):
            d = json.loads(args.degrees)
            for m in methods:
                w.run_xfuser(model, d, m)
        else:
            w.run_main(model, methods)
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- rows / merge
def write_row(out, row):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rows.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(dirs):
    rows = {}
    for d in dirs:
        p = os.path.join(d, "rows.jsonl")
        if not os.path.exists(p):
            continue
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    old = rows.get(r["key"])
                    if old is None or r.get("ms") is not None or old.get("ms") is None:
                        rows[r["key"]] = r  # a later row wins, except a failure over a success
    return rows


def load_done(out):
    return {k for k, r in read_rows([out]).items() if r.get("ms") is not None}


def read_meta(dirs):
    meta = {}
    for d in dirs:
        p = os.path.join(d, "meta.json")
        if os.path.exists(p):
            with open(p) as f:
                m = json.load(f)
            for k, v in m.items():  # the first dir wins (OUT over --merge-from), FLOP counts are merged
                if isinstance(v, dict) and isinstance(meta.get(k), dict):
                    meta[k] = {**v, **meta[k]}
                else:
                    meta.setdefault(k, v)
    return meta


METHOD_LABEL = {"eager": "1 GPU eager", "inductor": "1 GPU Inductor", "xdit": "xdit_compile (eager)",
                "xdit_ind": "xdit_compile (Inductor)", "xdit_cg": "xdit_compile (Inductor + CUDA graphs)",
                "xdit_cg_op": "xdit_compile (Inductor + CUDA graphs, opaque all-to-all op)",
                "xdit_cg_ov": "xdit_compile (Inductor + CUDA graphs + comm overlap)",
                "xdit_cg_sm": "xdit_compile (Inductor + CUDA graphs, symm-mem all-to-all)",
                "xdit_cg_ag": "xdit_compile (Inductor + CUDA graphs, all-gather k/v)",
                "xdit_cg_ce": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all beside compute)",
                "xdit_cg_cef": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, stream-memop flags)",
                "xdit_cg_ce_fm": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV)",
                "xdit_cg_ceb": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, barrier kernel)",
                "xdit_cg_ce_fms": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                  "spin-wait kernel at the wait)",
                "xdit_cg_ce_fml": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                  "own piece by a Triton copy)",
                "xdit_cg_ce_fip": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                  "q / k / attention output written into the receive buffers)",
                "xdit_cg_ce_fm_noip": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                      "GEMV, own pieces copied: no ce_in_place)",
                "xdit_cg_ce_fm_rn": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                    "GEMV, ring k/v by NCCL send/recv)",
                "xdit_cg_ce_fm_rce": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                     "GEMV, ring k/v by the copy engines also inside ulysses x ring)",
                "xdit_cg_ce_fsm1": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                   "GEMV, one peer's piece of exposed transfers by SMs)",
                "xdit_cg_ce_fsm2": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                   "GEMV, two peers' pieces of exposed transfers by SMs)",
                "xdit_cg_ce_fsm3": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                   "GEMV, every peer's piece of exposed transfers by SMs)",
                **{f"xdit_cg_ce_fq{p}": f"xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                        f"GEMV, {p} query parts)" for p in (2, 4)},
                "xdit_cg_ce_fmg": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                  "GELU epilogue)",
                "xdit_cg_ce_fm_nog": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                     "no GELU epilogue)",
                "xdit_cg_ce_fm_nr": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                    "no norm_rope kernel)",
                "xdit_cg_ce_fm_fl": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                    "q/k/v as one GEMM)",
                "xdit_cg_ce_fm_nol": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                     "q/k/v as separate GEMMs)",
                "xdit_cg_ce_sdpa": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, attention backend "
                                   "sdpa: cuDNN)",
                "xdit_cg_ce_fm_sdpa": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                      "GEMV, attention backend sdpa: cuDNN)",
                **{f"xdit_cg_ce_fc{c}": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                        f"GEMV, {c} head chunks)" for c in (2, 3, 5)},
                "xdit_cg_ce_fc2sm1": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation "
                                     "GEMV, 2 head chunks, one peer's piece of exposed transfers by SMs)",
                "xdit_cg_ce_c2": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, 2 head chunks)",
                "xdit_cg_ce_c3": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, 3 head chunks)",
                "xdit_cg_ce_c5": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, 5 head chunks)",
                "xdit_cg_nomod": "xdit_compile (Inductor + CUDA graphs, modulation linears not sharded)",
                "xdit_cg_smnm": "xdit_compile (Inductor + CUDA graphs, symm-mem all-to-all, modulation not sharded)",
                "xdit_cg_nocat": "xdit_compile (Inductor + CUDA graphs, linear over cat not split)",
                "xdit_cg_mat": "xdit_compile (Inductor + CUDA graphs, max-autotune GEMMs)",
                "xdit_cg_ce_fm_mat": "xdit_compile (Inductor + CUDA graphs, copy-engine all-to-all, one modulation GEMV, "
                                     "max-autotune GEMMs)",
                **{m: f"xdit_compile (Inductor + CUDA graphs, {c['ulysses_chunks']} head chunks"
                      f"{' + comm overlap' if c['overlap'] else ''})" for m, c in CHUNKED.items()},
                "diffusers": "diffusers CP", "diffusers_ind": "diffusers CP (torch.compile)",
                "xfuser": "xDiT (xfuser)", "xfuser_ind": "xDiT (xfuser, torch.compile)"}


def format_md(rows, meta):
    tiny = meta.get("tiny", False)
    tflops = meta.get("matmul_tflops")
    lines = [f"# Transformer per-step benchmark{' (TINY, CPU: times meaningless)' if tiny else ''}", "",
             f"- date: {meta.get('date', '?')}; device: {meta.get('gpu', '?')} x {meta.get('gpus', '?')}",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
             f"- measured {'bf16' if not tiny else 'fp32'} matmul: "
             + (f"{tflops:.3g} TFLOP/s ({'512^3 on CPU' if tiny else '8192^3 torch.matmul on GPU 0'})"
                if tflops else "?"),
             f"- command: `{meta.get('cmd', '?')}`",
             f"- ms/step: median of >= 5 CUDA-event timings of {meta.get('calls_per_sample', 1)} transformer forward(s) "
             "back to back / their number (2 warm-up calls), rank 0"
             + (f", the GPU held {meta['gpu_ahead_ms']:g} ms before each timing so that the first call's CPU time is "
                "not in it" if meta.get("gpu_ahead_ms") else "") + "; "
             "speed-up over the 1-GPU eager row of the same model; floor frac = FLOPs / (N x matmul TFLOP/s) / "
             "time; peak mem = max over ranks of torch.cuda.max_memory_allocated (weights included); rel err = "
             "||out - ref|| / ||ref|| vs the 1-GPU eager output (Inductor rows: like-for-like vs the 1-GPU "
             "Inductor output in brackets).", ""]
    by_model = {}
    for r in rows.values():
        by_model.setdefault(r["model"], []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    for model in [m for m in MODELS if m in by_model]:
        rs = sorted(by_model[model], key=lambda r: (r["n"], order.get(r["method"], 99), r["deg"]))
        fl = flops_per_step(model, tiny)
        counted = meta.get("flops_counted", {}).get(model)
        base = next((r["ms"] for r in rs if r["method"] == "eager" and r["n"] == 1 and r.get("ms")), None)
        cls, cfg, s = spec(model, tiny)
        lines += [f"## {model}: {cls}, {json.dumps(s)}", "",
                  f"FLOPs/step (formula): {fl / 1e12:.4g} TFLOP"
                  + (f"; FlopCounterMode (meta device, SDPA as math): {counted / 1e12:.4g} TFLOP "
                     f"(formula / counted = {fl / counted:.3f})" if counted else ""), "",
                  "| N | method | degrees | ms/step | speed-up | floor frac | peak mem GiB | rel err | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            ms = r.get("ms")
            sp = f"{base / ms:.2f}x" if ms and base else "-"
            ff = f"{fl / (r['n'] * tflops * 1e12) / (ms / 1e3):.0%}" if ms and tflops else "-"
            pk = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
            re = "-" if r.get("rel_err") is None else f"{r['rel_err']:.2e}"
            if r.get("rel_err_like") is not None:
                re += f" ({r['rel_err_like']:.2e})"
            note = (r.get("note") or "").replace("|", "/")[:160]
            lines.append(f"| {r['n']} | {METHOD_LABEL.get(r['method'], r['method'])} | {r['deg']} | "
                         f"{'-' if ms is None else f'{ms:.1f}'} | {sp} | {ff} | {pk} | {re} | {note} |")
        lines.append("")
    return "\n".join(lines)


def merge(out, extra_dirs=(), md_path=None, png_path=None):
    dirs = [out, *extra_dirs]
    rows, meta = read_rows(dirs), read_meta(dirs)
    md = format_md(rows, meta)
    md_path = md_path or os.path.join(out, "bench.md")
    with open(md_path, "w") as f:
        f.write(md + "\n")
    print(f"wrote {md_path} ({len(rows)} rows)")
    sys.path.insert(0, HERE)
    try:
        import plot
        plot.plot(list(rows.values()), png_path or os.path.join(out, "scaling.png"), title=meta.get("gpu", ""))
    except Exception as e:
        print(f"plot skipped: {type(e).__name__}: {e}")
    return md_path


# ------------------------------------------------------------------------------------------------ driver
def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def matmul_tflops(tiny):
    import torch
    if tiny or not torch.cuda.is_available():
        a = torch.randn(512, 512)
        t = time.perf_counter()
        for _ in range(5):
            a @ a
        return 5 * 2 * 512**3 / (time.perf_counter() - t) / 1e12
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / (statistics.median(ts) / 1e3) / 1e12


def count_flops(model, tiny):
    """FlopCounterMode on a meta-device copy of the model (no memory, no time), SDPA as math, so attention
    is counted as its two batched matmuls: the check of flops_per_step()."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    dev = torch.device("meta")
    m = build_model(model, tiny, dev, torch.bfloat16)
    inputs = make_inputs(model, tiny, dev, torch.bfloat16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        m(**inputs)
    return fc.get_total_flops()


def versions():
    from importlib import metadata
    v = {}
    for p in ("torch", "diffusers", "xfuser", "yunchang", "distvae", "triton"):
        try:
            v[p] = metadata.version(p)
        except Exception:
            v[p] = "not installed"
    return v


def driver(args):
    import torch
    os.makedirs(args.out, exist_ok=True)
    tiny = args.tiny
    gpus = args.gpus
    ns = [int(x) for x in args.ns.split(",")] if args.ns else [n for n in (1, 2, 4, 8) if n <= gpus]
    models, methods = args.models.split(","), args.methods.split(",")
    deadline = time.time() + args.budget_s if args.budget_s else 0
    meta = read_meta([args.out])
    meta.update(date=datetime.date.today().isoformat(), gpus=gpus, tiny=tiny, versions=versions(),
                calls_per_sample=args.calls_per_sample, gpu_ahead_ms=args.gpu_ahead_ms,
                cmd=" ".join([os.path.basename(sys.executable), *sys.argv]))
    if tiny or not torch.cuda.is_available():
        meta["gpu"] = "cpu"
    else:
        meta["gpu"] = torch.cuda.get_device_name(0)
    if "matmul_tflops" not in meta or args.force:
        meta["matmul_tflops"] = matmul_tflops(tiny)
        print(f"matmul: {meta['matmul_tflops']:.1f} TFLOP/s", flush=True)
    fc = meta.setdefault("flops_counted", {})
    for model in models:
        if model not in fc:
            try:
                fc[model] = count_flops(model, tiny)
            except Exception as e:
                print(f"FlopCounterMode on meta failed for {model}: {type(e).__name__}: {e}", flush=True)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    logdir = os.path.join(args.out, "logs")
    os.makedirs(logdir, exist_ok=True)
    env = dict(os.environ, **SAFE_ENV)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if tiny:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1",
                   CUDA_VISIBLE_DEVICES="")
    import importlib.util
    no_xfuser = None
    if importlib.util.find_spec("xfuser") is None:
        no_xfuser = "n/a: xfuser is not installed (needs the wheels xfuser 0.7.0, yunchang 0.6.4, distvae 0.1.0)"
    for n in ns:
        for model in models:
            main = [m for m in methods_for(n, methods) if m not in XFUSER_METHODS]
            xf = [m for m in methods_for(n, methods) if m in XFUSER_METHODS]
            groups = []
            if main:
                keys = [row_key(model, m, n, d) for m in main for d in degree_sets(n, model)]
                groups.append(("main", main, None, keys))
            if xf:
                for d in degree_sets(n, model):
                    if no_xfuser:
                        for m in xf:
                            write_row(args.out, dict(key=row_key(model, m, n, d), model=model, method=m,
                                                     n=n, degrees=d, deg=deg_str(d), ms=None, note=no_xfuser))
                        continue
                    groups.append((f"xfuser_{deg_str(d)}", xf, d, [row_key(model, m, n, d) for m in xf]))
            for gname, gmethods, d, keys in groups:
                done = load_done(args.out) if not args.force else set()
                if all(k in done for k in keys):
                    print(f"N={n} {model} {gname}: all rows done, skipped", flush=True)
                    continue
                if deadline and time.time() > deadline:
                    for k in keys:
                        if k not in done:
                            mm, meth, _, dd = k.split("|")
                            write_row(args.out, dict(key=k, model=mm, method=meth, n=n, deg=dd, ms=None,
                                                     note="skipped: time budget"))
                    continue
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                       f"--master_port={free_port()}", os.path.abspath(__file__), "--worker",
                       "--models", model, "--methods", ",".join(gmethods), "--out", args.out,
                       "--warmup", str(args.warmup), "--iters", str(args.iters),
                       "--calls-per-sample", str(args.calls_per_sample), "--gpu-ahead-ms", str(args.gpu_ahead_ms)]
                if d is not None:
                    cmd += ["--degrees", json.dumps(d)]
                if tiny:
                    cmd.append("--tiny")
                if args.force:
                    cmd.append("--force")
                if args.ref_dir:
                    cmd += ["--ref-dir", args.ref_dir]
                if args.degs:
                    cmd += ["--degs", args.degs]
                if deadline:
                    cmd += ["--deadline", str(deadline)]
                e = dict(env)
                if gname.startswith("xfuser"):      # the peer without flash_attn.cute (fa_cute_env.sh says why)
                    fa = set(filter(None, e.get("XDIT_FA_PATHS", "").split(os.pathsep)))
                    e["PYTHONPATH"] = os.pathsep.join(p for p in e["PYTHONPATH"].split(os.pathsep) if p not in fa)
                if not tiny:
                    e["CUDA_VISIBLE_DEVICES"] = ",".join(str(i + args.gpu_offset) for i in range(n))
                lp = os.path.join(logdir, f"N{n}_{model}_{gname}.log")
                print(f"[{time.time() - T0:7.1f}s] N={n} {model} {gname}: {' '.join(cmd[3:])}  (log {lp})",
                      flush=True)
                t = time.time()
                limit = args.subrun_timeout
                if deadline:  # the rows past the deadline are skipped by the worker; this catches a hang
                    limit = max(60.0, min(limit, deadline - time.time() + 60))
                with open(lp, "w") as lf:
                    proc = subprocess.Popen(cmd, env=e, stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT,
                                            start_new_session=True)  # its own process group: killable whole
                    try:
                        rc = proc.wait(timeout=limit)
                    except subprocess.TimeoutExpired:
                        _kill_tree(proc.pid)  # torchrun and its workers (they may sit in sessions of their own)
                        proc.wait()
                        rc = f"timeout after {limit:.0f}s"
                print(f"[{time.time() - T0:7.1f}s]   rc={rc} in {time.time() - t:.0f}s", flush=True)
                if rc != 0:
                    done = set(read_rows([args.out]))
                    tail = open(lp).read()[-300:].replace("\n", " ")
                    for k in keys:
                        if k not in done:
                            mm, meth, _, dd = k.split("|")
                            write_row(args.out, dict(key=k, model=mm, method=meth, n=n, deg=dd, ms=None,
                                                     note=f"n/a: sub-run exited rc={rc}: ...{tail[-120:]}"))
    return merge(args.out, md_path=args.md, png_path=args.png)


def _kill_tree(pid: int) -> None:
    """SIGKILL pid's process group and every descendant of pid (torchrun may start its workers in new sessions,
    out of reach of killpg; left alive they keep the GPUs and write rows after the driver has moved on)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--driver", action="store_true", help="launch the torchrun sub-runs, then merge")
    ap.add_argument("--worker", action="store_true", help="(internal) one sub-run, under torchrun")
    ap.add_argument("--merge", action="store_true", help="only rebuild bench.md / scaling.png from OUT")
    ap.add_argument("--merge-from", nargs="*", default=[], help="more dirs with rows.jsonl to merge")
    ap.add_argument("--tiny", action="store_true", help="tiny configs, float32, CPU / gloo")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--ns", default="", help="world sizes to run, e.g. 1,2,4 (default: 1,2,4 up to --gpus)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--degrees", default="", help="(internal) JSON degrees of an xfuser sub-run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--ref-dir", default="", help="where ref/<model>.pt are read (default OUT)")
    ap.add_argument("--md", default=None, help="markdown path (default OUT/bench.md)")
    ap.add_argument("--png", default=None, help="plot path (default OUT/scaling.png)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--calls-per-sample", type=int, default=1,
                    help="K: each timing = K forwards back to back between two CUDA events / K (a denoising "
                         "loop's steady state: the CPU launches step i+1 while the GPU runs step i); 1 = one "
                         "forward per timing, its launch latency included")
    ap.add_argument("--gpu-ahead-ms", type=float, default=0,
                    help="hold the GPU this long (a sleep kernel) before each timing's start event, so the CPU queues "
                         "the first forward meanwhile: every forward of the sample then runs as in a loop's steady "
                         "state, where the CPU is ahead (0: the first forward's CPU time, ~3-5 ms of dynamo guards "
                         "and launches, is in each sample)")
    ap.add_argument("--budget-s", type=float, default=0, help="driver: total seconds; 0 = no limit")
    ap.add_argument("--deadline", type=float, default=0, help="(internal) epoch seconds")
    ap.add_argument("--subrun-timeout", type=float, default=1800)
    ap.add_argument("--force", action="store_true", help="redo rows already in rows.jsonl")
    ap.add_argument("--degs", default="", help="only these degree sets at N>1, e.g. u4,r4,cfg2xu2")
    ap.add_argument("--gpu-offset", type=int, default=0,
                    help="sub-runs use GPUs OFFSET..OFFSET+N-1 (run several N=1 drivers side by side)")
    args = ap.parse_args()
    DEGS_FILTER.update(x for x in args.degs.split(",") if x)
    if args.iters < 5 and not args.tiny:
        ap.error("--iters must be >= 5")
    if args.worker:
        worker_main(args)
    elif args.driver:
        driver(args)
    elif args.merge:
        merge(args.out, args.merge_from, args.md, args.png)
    else:
        ap.error("give --driver (usual), --merge, or --worker (under torchrun)")


if __name__ == "__main__":
    main()

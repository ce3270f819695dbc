"""Peak memory and time of patch-parallel VAE decode (xdit_compile.runtime.vae) for 1, 2, 4 ranks.

An AutoencoderKL with the Stable Diffusion VAE's config (channels 128/256/512/512, 2 layers per block,
32 groups; random weights) decodes one latent (default 4x64x64 -> a 512x512 image). Each N runs under
torchrun; rank 0 also decodes serially afterwards to report the max relative error
(max |parallel - serial| / max |serial|).

    python benchmarks/vae_memory.py                        # launches torchrun for N in 1 2 4, writes the table
    python benchmarks/vae_memory.py --nprocs 1 2 --latent 128 --dtype bfloat16 --out results/x.md
    torchrun --nproc_per_node=2 benchmarks/vae_memory.py --json-out row.json    # one N by hand

Device: CUDA (NCCL, one GPU per rank) when available, else CPU (gloo). Nothing else changes.

Memory, per rank, around the decodes (model and latent already built):
  CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(); "decode peak" is that minus
        memory_allocated() before, "total peak" the raw maximum (weights included).
  CPU   torch's CPU allocations are invisible to tracemalloc, and psutil is not assumed, so the process's
        resident set is read from /proc/self/status: "decode peak" = VmHWM (peak RSS) after the decodes
        minus VmRSS before them; "total peak" = VmHWM. glibc's mmap threshold is pinned to 64 KiB first
        (mallopt) so freed tensors go back to the OS and RSS follows live tensors instead of the heap's
        high-water mark. RSS also counts the interpreter, libraries and communication buffers, so the
        "decode peak" column is the one to compare across N.
Time: wall time of one decode after a warm-up decode (barrier before, CUDA synchronised), mean of
--repeats, max over ranks. On CPU each rank gets cpus // N intra-op threads (at least 1).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _pin_malloc_mmap_threshold(nbytes: int = 64 * 1024) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD; also turns off glibc's dynamic threshold
    except OSError:
        pass


def _rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _reference(path: str | None, world: int, decode, device):
    """The serial decode: computed and saved by the N=1 run, loaded by the others (computed if absent)."""
    import torch

    if world > 1 and path and os.path.exists(path):
        return torch.load(path).to(device)
    out = decode()
    if world == 1 and path:
        torch.save(out.cpu(), path)
    return out


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from diffusers import AutoencoderKL

    from xdit_compile.runtime.vae import parallel_decode

    cuda = torch.cuda.is_available() and not args.cpu
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # float32 means float32: TF32 convs pick different algorithms for slab and whole image (~1e-3 apart)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    else:
        _pin_malloc_mmap_threshold()
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    rank = dist.get_rank()
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, args.latent, args.latent, generator=g).to(device=device, dtype=dtype)
    weights_mb = sum(p.numel() * p.element_size() for p in vae.decoder.parameters()) / 2**20

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    with torch.no_grad():
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _proc_status_kb("VmRSS") * 1024
        for _ in range(args.warmup):  # the peak is the same for every decode
            parallel_decode(vae, z)
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = parallel_decode(vae, z)
            sync()
            times.append(time.perf_counter() - t0)
        if cuda:
            total = torch.cuda.max_memory_allocated()
        else:
            total = _proc_status_kb("VmHWM") * 1024
        mine = [(total - before) / 2**20, total / 2**20, sum(times) / len(times)]
        rows = [None] * world
        dist.all_gather_object(rows, mine)

        err = err32 = None
        if rank == 0:
            serial = _reference(args.reference, world, lambda: vae.decode(z).sample, device)
            err = _rel_err(out, serial)
            if dtype != torch.float32:  # the precision's own noise: its serial decode vs float32's
                vae.float()
                ref32 = _reference(args.reference and args.reference + ".fp32", world,
                                   lambda: vae.decode(z.float()).sample, device)
                err32 = _rel_err(out, ref32)
        dist.barrier()

    if rank == 0:
        row = dict(
            n=world, device=torch.cuda.get_device_name(device) if cuda else "CPU", threads=torch.get_num_threads(),
            backend=dist.get_backend(), dtype=args.dtype, latent=args.latent, image=int(out.shape[-1]),
            weights_mb=weights_mb, decode_peak_mb=[r[0] for r in rows], total_peak_mb=[r[1] for r in rows],
            time_s=max(r[2] for r in rows), max_rel_err=err, max_rel_err_fp32=err32, load_avg=os.getloadavg()[0],
        )
        print(json.dumps(row), flush=True)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(row, f)
    dist.destroy_process_group()


def launch(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # the N=1 run saves its image; later runs compare with it instead of decoding serially again
        reference = os.path.join(tmp, "serial.pt")
        for n in sorted(args.nprocs):
            path = os.path.join(tmp, f"row{n}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   os.path.abspath(__file__), "--json-out", path, "--reference", reference,
                   "--latent", str(args.latent), "--dtype", args.dtype, "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup)] + (["--cpu"] if args.cpu else [])
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            with open(path) as f:
                rows.append(json.load(f))
    write_table(rows, args.out)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def write_table(rows: list[dict], out: str) -> None:
    r0 = rows[0]
    lines = [
        "# Patch-parallel VAE decode: peak memory per rank",
        "",
        f"`python benchmarks/vae_memory.py` - AutoencoderKL with the SD VAE config (128/256/512/512, 2 layers per "
        f"block, random weights, decoder weights {r0['weights_mb']:.0f} MB), latent 4x{r0['latent']}x{r0['latent']} "
        f"-> {r0['image']}x{r0['image']} image, {r0['dtype']}, {r0['device']}, {r0['backend']}.",
        "",
        "| N | decode peak MB per rank (max) | per rank | total peak MB per rank (max) | time s | max rel err vs serial "
        "| vs float32 serial | threads/rank | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        per = " / ".join(f"{m:.0f}" for m in r["decode_peak_mb"])
        lines.append(
            f"| {r['n']} | {max(r['decode_peak_mb']):.0f} | {per} | {max(r['total_peak_mb']):.0f} | "
            f"{r['time_s']:.3f} | {r['max_rel_err']:.1e} | {_fmt(r.get('max_rel_err_fp32'))} | {r['threads']} | "
            f"{r['load_avg']:.1f} |"
        )
    lines += [
        "",
        "Decode peak: the memory a decode adds on top of what the rank held before it (weights, latent); total "
        "peak: the whole process's maximum. How each is measured (CUDA allocator statistics, or /proc/self/status "
        "VmHWM/VmRSS on CPU with glibc's mmap threshold pinned) is in the script's docstring. Errors: max |a - b| / "
        "max |b| on rank 0's full image; for a low-precision dtype the N=1 row's 'vs float32 serial' is that "
        "precision's own noise, which the N>1 rows should match. Time: mean of the timed decodes, max "
        "over ranks; load avg is the machine's 1-minute load when the run ended (on a shared CPU machine, times "
        "say little; memory does not depend on load). Threads/rank are torch intra-op threads (CPU only).",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--latent", type=int, default=64, help="latent height = width (image is 8x)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=1, help="timed decodes")
    p.add_argument("--warmup", type=int, default=1, help="untimed decodes before them")
    p.add_argument("--reference", default=None,
                   help="N=1 writes its image here; N>1 compares with it (default: rank 0 decodes serially)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU/gloo even where CUDA is available")
    p.add_argument("--json-out", default=None, help="(under torchrun) where rank 0 writes its row")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vae_memory.md"))
    args = p.parse_args()
    if "RANK" in os.environ:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()

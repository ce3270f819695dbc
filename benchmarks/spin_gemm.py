"""Does a 1-CTA kernel spinning on a side stream (what the copy-engine all-to-all's barrier kernel does while it
waits for the peers) slow the GEMMs on the compute stream? One GPU, no collectives: `torch.cuda._sleep` is a
<<<1, 1>>> kernel that spins for a number of clock cycles.

    python3 benchmarks/spin_gemm.py [--out spin_gemm.md]

For each GEMM shape of a FLUX 2048² Ulysses-4 rank: K GEMMs back to back alone, then the same with spinners on
a side stream covering the whole run (worst case: a barrier waiting all the time), then with one spinner of
~0.4 ms (one q/k/v transfer) launched before the first GEMM. Median of 20 CUDA-event timings.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from gpu_util import timed_us

SHAPES = {  # (M, K, N): a rank's rows (4224 = (16384 + 512) / 4) x in -> out
    "single proj_mlp 3072->12288": (4224, 3072, 12288),
    "single proj_out mlp half 12288->3072": (4224, 12288, 3072),
    "qkv 3072->9216": (4224, 3072, 9216),
    "to_out 3072->3072": (4224, 3072, 3072),
}


def _time(fn) -> float:
    """ms of one fn() call: median of 20 CUDA-event timings (gpu_util.timed_us)."""
    return timed_us(fn, reps=1, samples=20) / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="spin_gemm.md")
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args()
    dev = torch.device("cuda")
    side = torch.cuda.Stream()
    # cycles per ms: time a long sleep
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    torch.cuda._sleep(100_000_000)
    e1.record()
    torch.cuda.synchronize()
    cyc_ms = 100_000_000 / e0.elapsed_time(e1)
    lines = [f"# A 1-CTA spinner beside GEMMs, {torch.cuda.get_device_name()} ({torch.__version__})", "",
             f"{args.k} GEMMs back to back, bf16, ms (median of 20); spinner = torch.cuda._sleep on a side stream "
             f"({cyc_ms / 1e3:.0f} cycles/us)", "",
             "| GEMM (M x K -> N) | alone | spinner over the whole run | one 0.4 ms spinner at the start | "
             "slowdown, whole | slowdown, 0.4 ms |", "|---|---|---|---|---|---|"]
    for name, shape in [*SHAPES.items(), ("SDPA (cuDNN / flash) 6 heads x 16896 tokens", None)]:
        if shape is None:
            q = torch.randn(1, 6, 16896, 128, device=dev, dtype=torch.bfloat16)
            m, k, n = 16896, 128, 16896

            def gemms():
                for _ in range(args.k // 4):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
        else:
            m, k, n = shape
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
            bias = torch.randn(n, device=dev, dtype=torch.bfloat16)

            def gemms():
                for _ in range(args.k):
                    torch.nn.functional.linear(x, w, bias)

        alone = _time(gemms)
        span = int(alone * cyc_ms * 1.2)

        def with_spin(cycles, iters=20):
            """The GEMMs' own time (events on the compute stream only) while a spinner runs beside them."""
            ts = []
            for it in range(iters + 3):
                torch.cuda.synchronize()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    torch.cuda._sleep(cycles)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                gemms()
                e1.record()
                torch.cuda.synchronize()
                if it >= 3:
                    ts.append(e0.elapsed_time(e1))
            return statistics.median(ts)

        whole = with_spin(span)
        short = with_spin(int(0.4 * cyc_ms))
        alone2 = _time(gemms)
        base = min(alone, alone2)
        lines.append(f"| {name} ({m} x {k} -> {n}) | {base:.3f} | {whole:.3f} | {short:.3f} | "
                     f"{whole / base - 1:+.1%} | {short / base - 1:+.1%} |")
        print(lines[-1], flush=True)
    lines += ["", "Times are the GEMMs' own (CUDA events on the compute stream; the spinner is launched just "
              "before the first GEMM and lasts 1.2x their time alone, or 0.4 ms)."]
    lines += ["", *_wait_latency(side, cyc_ms)]
    open(args.out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _wait_latency(side, cyc_ms, iters=50):
    """From a flag set by a stream memory operation (what a sender's copy stream does after its copies) to the
    next kernel on the waiting stream: cuStreamWaitValue32 (XDIT_CE_SIGNAL=flag) against the spin-wait kernel
    (spin). The side stream sleeps 1 ms, then sets the flag; the main stream waits, then runs a tiny kernel;
    latency = main's time - the side's 1 ms sleep alone."""
    from xdit_compile.runtime import ce_a2a
    from xdit_compile.runtime.spin_wait import spin_wait
    flags = torch.zeros(2, dtype=torch.int32, device="cuda")
    tiny = torch.zeros(1, device="cuda")
    cyc = int(cyc_ms)

    def run(mode):
        ts = []
        for it in range(iters + 3):
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                if mode != "none":
                    torch.cuda._sleep(cyc)
                    ce_a2a._check_cu(ce_a2a._cuda()["write32"](side.cuda_stream, flags.data_ptr() + 4, 1, 0), "write")
                else:
                    torch.cuda._sleep(cyc)
            if mode == "flag":
                ce_a2a._wait_flags([flags.data_ptr() + 4], torch.cuda.current_stream())
            elif mode == "spin":
                spin_wait(flags, 0, 2, 2, 0, 10_000)
            else:
                torch.cuda.current_stream().wait_stream(side)
            tiny.add_(1)
            e1.record()
            torch.cuda.synchronize()
            if it >= 3:
                ts.append(e0.elapsed_time(e1))
        return statistics.median(ts) * 1e3

    base = run("none")
    out = ["From a flag set by a stream memory operation to the next kernel on the waiting stream, us (median of "
           f"{iters}; the side stream sleeps 1 ms first; an event join of the same streams: {base:.1f} us in all):", "",
           "| wait | us after the flag (beyond an event join) |", "|---|---|"]
    for mode in ("flag", "spin"):
        out.append(f"| {'cuStreamWaitValue32 (flag)' if mode == 'flag' else 'spin-wait kernel (spin)'} | "
                   f"{run(mode) - base:.1f} |")
    return out


if __name__ == "__main__":
    main()

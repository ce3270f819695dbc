"""Train the built-in digits DiT (CPU, a few minutes) and/or evaluate it.

    python -m xdit_compile.builtin.digits.train --steps 1200 --seed 0     # train + save + evaluate
    python -m xdit_compile.builtin.digits.train --eval-only               # evaluate the shipped weights

Recipe: diffusers ``DiTTransformer2DModel`` (see ``model_config()``), rectified flow in
FlowMatchEulerDiscreteScheduler's convention (``x_s = (1-s) x + s noise``, target ``noise - x``, model timestep
``1000 s``, ``s = sigmoid(N(0, 1))``), AdamW lr 1e-3 with cosine decay, batch 128, grad clip 1, EMA 0.999
(with the usual ``(1+k)/(10+k)`` warm-up so the zero-initialised start does not linger in the average; the
EMA weights are what is saved). Labels are dropped (replaced by NULL_LABEL=10) per sample with p=0.1 here,
instead of by diffusers' per-block LabelEmbedding dropout, which is switched off. adaLN-Zero init: every
block's adaLN modulation linear and the final ``proj_out_1`` / ``proj_out_2`` start at zero.

Evaluation: 20 samples per class (200) at guidance 1, 2 and 4 (20 Euler steps) scored with
``classifier()``; writes ``samples.png`` (10x10 grid, one row per class, nearest x4) and ``training.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from xdit_compile.builtin import digits as D


def build_model(seed: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**D.model_config())
    assert model.out_channels == 1 and model.proj_out_2.out_features == model.config.patch_size ** 2
    D.disable_label_dropout(model)
    # adaLN-Zero (DiT paper): modulation of every block and the final layer, and the output projection, start at 0
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    return model


def train(steps: int, seed: int, out: Path, batch: int = 128, lr: float = 1e-3, ema_decay: float = 0.999,
          p_uncond: float = 0.1, log_every: int = 100, device: str = "cpu", threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    x_all, y_all = D.load_data()
    model = build_model(seed).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DiT digits: {n_params / 1e6:.2f}M params, {len(x_all)} images, {steps} steps, batch {batch}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(x_all), generator=g), 0
    t0, window, losses = time.time(), [], []
    for step in range(steps):
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(x_all), generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        x, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch, generator=g) < p_uncond] = D.NULL_LABEL  # drop the label for the whole sample
        noise = torch.randn(x.shape, generator=g)
        s = torch.sigmoid(torch.randn(batch, generator=g))
        # all randomness comes from the CPU generator, so --device only changes the arithmetic
        x, y, noise, s = (t.to(device) for t in (x, y, noise, s))
        xs = (1 - s[:, None, None, None]) * x + s[:, None, None, None] * noise
        pred = model(xs, timestep=1000 * s, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, noise - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            print(f"step {step + 1:5d}/{steps}  loss {losses[-1]:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
            window = []
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    ema.to("cpu").save_pretrained(str(out), safe_serialization=True)
    print(f"saved EMA weights to {out} ({wall:.0f}s of training)", flush=True)
    return {"steps": steps, "seed": seed, "batch": batch, "device": str(device), "threads": threads,
            "train_wall_s": round(wall, 1),
            "final_loss_last100": round(losses[-1], 4), "loss_every_100": [round(l, 4) for l in losses],
            "params": n_params}


def evaluate(path: Path, png: Path | None, per_class: int = 20, steps: int = 20,
             guidances=(1.0, 2.0, 4.0), seed: int = 0) -> dict:
    torch.set_num_threads(2)
    model = D.load_transformer(path=path)
    labels = torch.arange(D.NUM_CLASSES).repeat_interleave(per_class)
    res = {}
    for gsc in guidances:
        t0 = time.time()
        imgs = D.sample(model, labels, steps=steps, guidance=gsc, seed=seed)
        acc = D.accuracy(imgs, labels)
        res[f"accuracy_guidance_{gsc:g}"] = acc
        print(f"guidance {gsc:g}: accuracy {acc:.3f} over {len(labels)} samples ({time.time() - t0:.1f}s)", flush=True)
        if png is not None and gsc == max(guidances):
            save_grid(imgs.reshape(D.NUM_CLASSES, per_class, 1, D.SIZE, D.SIZE)[:, :10], png)
    return res


def save_grid(imgs: torch.Tensor, png: Path, scale: int = 4) -> None:
    """imgs (rows, cols, 1, H, W) in [0, 1] -> a grayscale PNG, nearest-upscaled by `scale`, 1-px gaps."""
    from PIL import Image

    r, c, _, h, w = imgs.shape
    canvas = torch.zeros(r * (h + 1) + 1, c * (w + 1) + 1)
    for i in range(r):
        for j in range(c):
            canvas[1 + i * (h + 1):1 + i * (h + 1) + h, 1 + j * (w + 1):1 + j * (w + 1) + w] = imgs[i, j, 0]
    a = (canvas * 255).round().to(torch.uint8).numpy()
    Image.fromarray(a, mode="L").resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST).save(png)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=D.TRANSFORMER_DIR, help="diffusers folder to write")
    ap.add_argument("--device", default="cpu", help="training device (default cpu)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--eval-only", action="store_true", help="skip training; evaluate --out")
    ap.add_argument("--png", type=Path, default=D.HERE / "samples.png")
    ap.add_argument("--stats", type=Path, default=D.HERE / "training.json")
    args = ap.parse_args(argv)
    stats = json.loads(args.stats.read_text()) if args.eval_only and args.stats.exists() else {}
    if not args.eval_only:
        stats = train(args.steps, args.seed, args.out, device=args.device, threads=args.threads)
    stats.update(evaluate(args.out, args.png))
    args.stats.write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "loss_every_100"}))


if __name__ == "__main__":
    main()

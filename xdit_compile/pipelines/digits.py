"""DigitsPipeline: the built-in digits model as a pipeline object (`.transformer`, `__call__`).

Pixel space, class labels as prompts ("7"), FlowMatchEulerDiscreteScheduler, batched CFG [cond, uncond]
in one transformer call (so parallel.cfg=2 splits that batch). One generator per image, so how images are
split over ranks never changes them.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..builtin import digits


class DigitsPipeline:
    def __init__(self, transformer):
        self.transformer = transformer
        self.vae = None
        self.progress = None                 # callable(step, total) or None

    @staticmethod
    def labels(prompts) -> torch.Tensor:
        out = []
        for p in prompts:
            s = str(p).strip()
            if not s.isdigit() or not 0 <= int(s) < digits.NUM_CLASSES:
                raise ValueError(f"builtin:digits takes class labels 0-9 as prompts, got {p!r}")
            out.append(int(s))
        return torch.tensor(out)

    @torch.no_grad()
    def __call__(self, *, prompt, generator, num_inference_steps=20, guidance_scale=4.0, height=0, width=0,
                 output_type="pt", **unused):
        from diffusers import FlowMatchEulerDiscreteScheduler
        if (height or digits.SIZE) != digits.SIZE or (width or digits.SIZE) != digits.SIZE:
            raise ValueError(f"builtin:digits makes {digits.SIZE}x{digits.SIZE} images; set run.height/width to "
                             f"{digits.SIZE} or 0")
        prompt = [prompt] if isinstance(prompt, (str, int)) else list(prompt)
        gens = generator if isinstance(generator, list) else [generator] * len(prompt)
        if len(gens) != len(prompt):
            raise ValueError(f"{len(prompt)} prompts but {len(gens)} generators")
        p = next(self.transformer.parameters())
        labels = self.labels(prompt).to(p.device)
        x = torch.cat([torch.randn(1, 1, digits.SIZE, digits.SIZE, generator=g) for g in gens]).to(p.device)
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(num_inference_steps, device=p.device)
        cfg = guidance_scale > 1.0
        cls = torch.cat([labels, torch.full_like(labels, digits.NULL_LABEL)]) if cfg else labels
        for i, t in enumerate(sched.timesteps):
            inp = torch.cat([x, x]) if cfg else x
            v = self.transformer(inp.to(p.dtype), timestep=t.expand(inp.shape[0]), class_labels=cls,
                                 return_dict=False)[0].float()
            if cfg:
                v_c, v_u = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = sched.step(v, t, x).prev_sample
            if self.progress:
                self.progress(i + 1, len(sched.timesteps))
        images = ((x.float().cpu() + 1) / 2).clamp(0, 1)
        return SimpleNamespace(images=images)

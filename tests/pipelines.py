"""TINY random-weight diffusers pipelines (float32, CPU, no downloads) for end-to-end tests.

    from pipelines import PIPELINES, build, call_kwargs, generators

    pipe = build("pixart")                           # seeded: the same weights on every rank
    images = pipe(**call_kwargs("pixart", batch=2), generator=generators(2)).images

No text encoders or tokenizers: every pipeline is built with ``text_encoder=None`` / ``tokenizer=None`` and
called with ``prompt_embeds`` / ``negative_prompt_embeds`` (+ attention masks for PixArt, pooled embeds for
SD3 and Flux) made by ``call_kwargs``. Transformers reuse the configs of ``tests/models.py`` (2 heads x 16,
one or two layers); the VAEs are the smallest that decode the transformers' latents:

=========  ==========================  ==================  ==============================================
name       pipeline                    VAE                 image (px) -> latent -> image tokens
=========  ==========================  ==================  ==============================================
pixart     PixArtSigmaPipeline         AutoencoderKL z=4   16x24 -> 4x8x12 -> 4x6 (patch 2)
sd3        StableDiffusion3Pipeline    AutoencoderKL z=4   16x24 -> 4x8x12 -> 4x6 (patch 2)
flux       FluxPipeline                AutoencoderKL z=2   16x24 -> 2x8x12 -> packed 4x6 of 8 channels
wan        WanPipeline                 AutoencoderKLWan    3 frames 16x16 -> 4x2x8x8 -> 2x4x4 (patch 1,2,2)
=========  ==========================  ==================  ==============================================

CFG: PixArt and SD3 batch [uncond, cond] into one transformer call (``guidance_scale > 1``); Wan calls the
transformer twice per step (``guidance_scale > 1``); Flux does true CFG, two calls per step, only with
``true_cfg_scale > 1`` and ``negative_prompt_embeds`` + ``negative_pooled_prompt_embeds`` (its
``guidance_scale`` is the distilled-guidance embedding, not CFG). ``call_kwargs(name, cfg=False)`` turns CFG
off for each (Flux: ``true_cfg_scale=1``; the others: ``guidance_scale=1``).
"""

from __future__ import annotations

from typing import Any

import torch
from models import MODELS, POOLED_DIM, TEXT_DIM

PIPELINES = ("pixart", "sd3", "flux", "wan")
BATCHED_CFG = ("pixart", "sd3")
"""Pipelines that call the transformer once per step with the batch [uncond, cond]."""
TWO_CALL_CFG = ("flux", "wan")
"""Pipelines that call the transformer twice per step (cond, then uncond)."""

HEIGHT, WIDTH, FRAMES = 16, 24, 3
TEXT_LEN = 7
STEPS = 2
GUIDANCE = 4.0


def _transformer(name: str):
    return MODELS[name].build()  # torch.manual_seed(0) inside: same weights on every rank


def _vae_kl(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        latent_channels=latent_channels, sample_size=32, shift_factor=0.0,  # SD3/Flux read shift_factor
    ).eval()


def _vae_wan(z_dim: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1)
    return AutoencoderKLWan(
        base_dim=4, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
        scale_factor_temporal=2, scale_factor_spatial=2,
    ).eval()


def build(name: str):
    """A tiny pipeline, seeded (identical on every rank), float32, eval mode."""
    import diffusers

    if name == "pixart":
        from diffusers import DPMSolverMultistepScheduler
        return diffusers.PixArtSigmaPipeline(
            tokenizer=None, text_encoder=None, vae=_vae_kl(4), transformer=_transformer("pixart"),
            scheduler=DPMSolverMultistepScheduler())
    if name == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler
        return diffusers.StableDiffusion3Pipeline(
            transformer=_transformer("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae_kl(4), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None)
    if name == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler
        transformer = _transformer("flux")
        return diffusers.FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
            vae=_vae_kl(transformer.config.in_channels // 4), text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    if name == "wan":
        from diffusers import FlowMatchEulerDiscreteScheduler
        transformer = _transformer("wan")
        return diffusers.WanPipeline(
            tokenizer=None, text_encoder=None, vae=_vae_wan(transformer.config.in_channels),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    raise KeyError(f"unknown pipeline {name!r}; known: {PIPELINES}")


def _mask(batch: int) -> torch.Tensor:
    """(B, L) text mask with trailing padding (row b pads 2 + b % 2 positions)."""
    m = torch.ones(batch, TEXT_LEN, dtype=torch.long)
    for b in range(batch):
        m[b, TEXT_LEN - 2 - b % 2:] = 0
    return m


def call_kwargs(name: str, batch: int = 1, seed: int = 0, cfg: bool = True, steps: int = STEPS) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)`` (everything but ``generator``): seeded embeddings of ``batch``
    prompts, tiny size, ``steps`` steps, ``output_type="pt"``, CFG on (scale 4) unless ``cfg=False``."""
    g = torch.Generator().manual_seed(1000 + seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    kw: dict[str, Any] = dict(
        prompt_embeds=randn(batch, TEXT_LEN, TEXT_DIM),
        negative_prompt_embeds=randn(batch, TEXT_LEN, TEXT_DIM),
        num_inference_steps=steps, height=HEIGHT, width=WIDTH, output_type="pt",
    )
    if name == "pixart":
        kw.update(prompt_attention_mask=_mask(batch), negative_prompt_attention_mask=_mask(batch), negative_prompt=None,
                  use_resolution_binning=False, guidance_scale=GUIDANCE if cfg else 1.0)
    elif name == "sd3":
        kw.update(pooled_prompt_embeds=randn(batch, POOLED_DIM), negative_pooled_prompt_embeds=randn(batch, POOLED_DIM),
                  guidance_scale=GUIDANCE if cfg else 1.0)
    elif name == "flux":
        kw.update(pooled_prompt_embeds=randn(batch, POOLED_DIM), negative_pooled_prompt_embeds=randn(batch, POOLED_DIM),
                  guidance_scale=3.5, true_cfg_scale=GUIDANCE if cfg else 1.0)
    elif name == "wan":  # WanPipeline wants height and width divisible by 16
        kw.update(num_frames=FRAMES, height=16, width=16, guidance_scale=GUIDANCE if cfg else 1.0)
    else:
        raise KeyError(f"unknown pipeline {name!r}; known: {PIPELINES}")
    return kw


def generators(batch: int, seed: int = 0) -> list[torch.Generator]:
    """One generator per image (what data parallelism needs to reproduce the serial run)."""
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def images(name: str, out) -> torch.Tensor:
    """The images of a pipeline output (``.images``; Wan: the video, ``.frames``), as a tensor."""
    x = out.frames if name == "wan" else out.images
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)

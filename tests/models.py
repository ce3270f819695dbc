"""Registry of TINY diffusers DiT configs (random weights, float32, CPU-fast).

Each entry of ``MODELS`` is a :class:`ModelCase`:

* ``build()``  -> ``nn.Module`` built with ``torch.manual_seed(0)``, eval mode.
* ``inputs(batch=1, seed=0, **size)`` -> kwargs for ``forward`` (seeded, always
  ``return_dict=False``).  ``size`` keys are listed in ``case.sizes`` (the
  defaults).  Size units are documented per case in ``case.notes``; for image
  models ``height``/``width`` are *latent* sizes as the forward receives them
  (so tokens = (height/p) * (width/p)), for the "packed" models (Flux,
  QwenImage, LTX) they are the token grid directly.

Dimension choices: inner dim 32 = 2 heads x 16 head_dim everywhere; default
image-token counts 24 (4x6 grid) per frame, 2-3 latent frames for video, text
length 7 (odd) -- so no token count coincides with a channel dim, head count
or with the other sequence's length.  Text masks have trailing padding
(last 2 positions False / 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

HEADS = 2
HEAD_DIM = 16
INNER = HEADS * HEAD_DIM  # 32
TEXT_DIM = 20  # raw text-encoder feature dim (caption channels)
POOLED_DIM = 12


@dataclass
class ModelCase:
    name: str
    cls_name: str
    config: dict
    make_inputs: Callable[..., dict]
    sizes: dict = field(default_factory=dict)
    notes: str = ""

    def build(self) -> nn.Module:
        import diffusers

        torch.manual_seed(0)
        cls = getattr(diffusers, self.cls_name)
        model = cls(**self.config)
        return model.eval()

    def inputs(self, batch: int = 1, seed: int = 0, **size) -> dict:
        unknown = set(size) - set(self.sizes)
        if unknown:
            raise TypeError(f"{self.name}: unknown size keys {sorted(unknown)}; known {sorted(self.sizes)}")
        s = {**self.sizes, **size}
        g = torch.Generator().manual_seed(seed)
        kw = self.make_inputs(batch, g, **s)
        kw["return_dict"] = False
        return kw


# ----------------------------------------------------------------- helpers
def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _timestep(g, batch, scale=1000.0):
    return torch.rand(batch, generator=g, dtype=torch.float32) * scale


def _mask(batch, text_len, pad=2, dtype=torch.bool):
    """(B, L) mask, last ``pad`` positions padding (row b pads ``pad + b % 2``)."""
    m = torch.ones(batch, text_len, dtype=torch.bool)
    for b in range(batch):
        n = min(pad + (b % 2), text_len - 1)
        if n > 0:
            m[b, text_len - n :] = False
    return m.to(dtype)


def _latent_image_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


MODELS: dict[str, ModelCase] = {}


def _register(case: ModelCase) -> ModelCase:
    MODELS[case.name] = case
    return case


# ----------------------------------------------------------------- Flux
def _flux_inputs(batch, g, height, width, text_len, in_channels=8):
    return dict(
        hidden_states=_randn(g, batch, height * width, in_channels),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        pooled_projections=_randn(g, batch, POOLED_DIM),
        timestep=_timestep(g, batch, 1.0),
        img_ids=_latent_image_ids(height, width),
        txt_ids=torch.zeros(text_len, 3),
        guidance=torch.full((batch,), 3.5),
    )


_register(ModelCase(
    name="flux",
    cls_name="FluxTransformer2DModel",
    config=dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    make_inputs=_flux_inputs,
    sizes=dict(height=4, width=6, text_len=7),
    notes="packed tokens: height/width = token grid (img tokens = h*w); joint attn [txt, img]",
))


# ----------------------------------------------------------------- SD3
def _sd3_inputs(batch, g, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, 4, height, width),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        pooled_projections=_randn(g, batch, POOLED_DIM),
        timestep=_timestep(g, batch),
    )


_register(ModelCase(
    name="sd3",
    cls_name="SD3Transformer2DModel",
    config=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                joint_attention_dim=TEXT_DIM, caption_projection_dim=INNER,
                pooled_projection_dim=POOLED_DIM, out_channels=4, pos_embed_max_size=16,
                dual_attention_layers=(0,), qk_norm="rms_norm"),
    make_inputs=_sd3_inputs,
    sizes=dict(height=8, width=12, text_len=7),
    notes="latent h/w, patch 2 (tokens = h/2*w/2); layer0 is SD3.5 dual-attention, last block context_pre_only",
))


# ----------------------------------------------------------------- PixArt
def _pixart_inputs(batch, g, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, 4, height, width),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        timestep=_timestep(g, batch),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        encoder_attention_mask=_mask(batch, text_len, dtype=torch.long),
    )


_register(ModelCase(
    name="pixart",
    cls_name="PixArtTransformer2DModel",
    config=dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                out_channels=8, num_layers=1, cross_attention_dim=INNER,
                sample_size=8, patch_size=2, caption_channels=TEXT_DIM,
                use_additional_conditions=False, interpolation_scale=1),
    make_inputs=_pixart_inputs,
    sizes=dict(height=8, width=12, text_len=7),
    notes="latent h/w, patch 2; self-attn + masked cross-attn",
))


# ----------------------------------------------------------------- HunyuanDiT
_HDIT_TEXT, _HDIT_T5 = 7, 6


def _hunyuandit_inputs(batch, g, height, width):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    gh, gw = height // 2, width // 2
    rope = get_2d_rotary_pos_embed(HEAD_DIM, ((0, 0), (gh, gw)), (gh, gw), use_real=True)
    return dict(
        hidden_states=_randn(g, batch, 4, height, width),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, _HDIT_TEXT, TEXT_DIM),
        text_embedding_mask=_mask(batch, _HDIT_TEXT, dtype=torch.long),
        encoder_hidden_states_t5=_randn(g, batch, _HDIT_T5, 24),
        text_embedding_mask_t5=_mask(batch, _HDIT_T5, pad=1, dtype=torch.long),
        image_meta_size=torch.tensor([[8 * height, 8 * width, 8 * height, 8 * width, 0, 0]] * batch, dtype=torch.float32),
        style=torch.zeros(batch, dtype=torch.long),
        image_rotary_emb=rope,
    )


_register(ModelCase(
    name="hunyuandit",
    cls_name="HunyuanDiT2DModel",
    config=dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                patch_size=2, sample_size=8, hidden_size=INNER, num_layers=2,
                cross_attention_dim=TEXT_DIM, cross_attention_dim_t5=24,
                pooled_projection_dim=POOLED_DIM, text_len=_HDIT_TEXT, text_len_t5=_HDIT_T5),
    make_inputs=_hunyuandit_inputs,
    sizes=dict(height=8, width=12),
    notes="latent h/w, patch 2; text lengths FIXED by config (7 clip + 6 t5 = 13; t5 dim 24: attn-pool has 8 heads); rope passed as input",
))


# ----------------------------------------------------------------- CogVideoX
def _cogvideox_inputs(batch, g, frames, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, frames, 4, height, width),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        timestep=_timestep(g, batch),
    )


_register(ModelCase(
    name="cogvideox",
    cls_name="CogVideoXTransformer3DModel",
    config=dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                out_channels=4, time_embed_dim=24, text_embed_dim=TEXT_DIM, num_layers=1,
                sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=7),
    make_inputs=_cogvideox_inputs,
    sizes=dict(frames=3, height=8, width=12, text_len=7),
    notes="hidden (B,F,C,H,W) latent; patch 2 -> 3*24=72 video tokens; joint attn [txt, video]; "
          "sincos pos-embed sized for text_len=7 (other text_len needs matching max_text_seq_length)",
))


# ----------------------------------------------------------------- Wan
def _wan_inputs(batch, g, frames, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, 4, frames, height, width),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
    )


_register(ModelCase(
    name="wan",
    cls_name="WanTransformer3DModel",
    config=dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=24, ffn_dim=48,
                num_layers=1, rope_max_seq_len=64),
    make_inputs=_wan_inputs,
    sizes=dict(frames=3, height=8, width=12, text_len=7),
    notes="hidden (B,C,F,H,W); patch (1,2,2) -> 72 tokens; self-attn + cross-attn (text)",
))


# ----------------------------------------------------------------- HunyuanVideo
def _hyvideo_inputs(batch, g, frames, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, 4, frames, height, width),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        encoder_attention_mask=_mask(batch, text_len, dtype=torch.long),
        pooled_projections=_randn(g, batch, POOLED_DIM),
        guidance=torch.full((batch,), 6.0 * 1000),
    )


_register(ModelCase(
    name="hunyuanvideo",
    cls_name="HunyuanVideoTransformer3DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                guidance_embeds=True, text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                rope_axes_dim=(4, 6, 6)),
    make_inputs=_hyvideo_inputs,
    sizes=dict(frames=3, height=8, width=12, text_len=7),
    notes="hidden (B,C,F,H,W); 72 video tokens; joint attn [video, txt] with key-padding mask",
))


# ----------------------------------------------------------------- LTX-Video
def _ltx_inputs(batch, g, frames, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, frames * height * width, 8),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        timestep=_timestep(g, batch).long(),
        encoder_attention_mask=_mask(batch, text_len, dtype=torch.long),
        num_frames=frames,
        height=height,
        width=width,
    )


_register(ModelCase(
    name="ltxvideo",
    cls_name="LTXVideoTransformer3DModel",
    config=dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=INNER,
                num_layers=1, caption_channels=TEXT_DIM),
    make_inputs=_ltx_inputs,
    sizes=dict(frames=3, height=4, width=6, text_len=7),
    notes="packed tokens (B, F*H*W, C): frames/height/width = token grid; self-attn + masked cross-attn",
))


# ----------------------------------------------------------------- Sana
def _sana_inputs(batch, g, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, 4, height, width),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        timestep=_timestep(g, batch),
        encoder_attention_mask=_mask(batch, text_len, dtype=torch.long),
    )


_register(ModelCase(
    name="sana",
    cls_name="SanaTransformer2DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                num_layers=1, num_cross_attention_heads=HEADS, cross_attention_head_dim=HEAD_DIM,
                cross_attention_dim=INNER, caption_channels=TEXT_DIM, sample_size=8, patch_size=1),
    make_inputs=_sana_inputs,
    sizes=dict(height=4, width=6, text_len=7),
    notes="latent h/w, patch 1 -> 24 tokens; self-attn is LINEAR attention (no SDPA); masked cross-attn",
))


# ----------------------------------------------------------------- Latte
def _latte_inputs(batch, g, frames, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, 4, frames, height, width),
        timestep=_timestep(g, batch),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
    )


_register(ModelCase(
    name="latte",
    cls_name="LatteTransformer3DModel",
    config=dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
                num_layers=1, cross_attention_dim=INNER, sample_size=8, patch_size=2,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=TEXT_DIM, video_length=2),
    make_inputs=_latte_inputs,
    sizes=dict(frames=2, height=8, width=12, text_len=7),
    notes="hidden (B,C,F,H,W); 24 spatial tokens/frame > 2 frames; spatial block (seq=H*W, batch B*F) "
          "+ temporal block (seq=F, batch B*H*W); frames FIXED to config video_length=2 (temporal pos-embed)",
))


# ----------------------------------------------------------------- Mochi
def _mochi_inputs(batch, g, frames, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, 4, frames, height, width),
        encoder_hidden_states=_randn(g, batch, text_len, 24),
        timestep=_timestep(g, batch),
        encoder_attention_mask=_mask(batch, text_len, dtype=torch.long),
    )


_register(ModelCase(
    name="mochi",
    cls_name="MochiTransformer3DModel",
    config=dict(patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
                pooled_projection_dim=POOLED_DIM, in_channels=4, text_embed_dim=24,
                time_embed_dim=24, max_sequence_length=7),
    make_inputs=_mochi_inputs,
    sizes=dict(frames=3, height=8, width=12, text_len=7),
    notes="hidden (B,C,F,H,W); 72 tokens; text feat dim 24 (attn-pool has 8 heads); joint attn [video, valid txt] (per-sample mask slicing)",
))


# ----------------------------------------------------------------- QwenImage
def _qwen_inputs(batch, g, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, height * width, 16),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        encoder_hidden_states_mask=_mask(batch, text_len, dtype=torch.long),
        timestep=_timestep(g, batch, 1.0),
        img_shapes=[(1, height, width)] * batch,
    )


_register(ModelCase(
    name="qwenimage",
    cls_name="QwenImageTransformer2DModel",
    config=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
                axes_dims_rope=(4, 6, 6)),
    make_inputs=_qwen_inputs,
    sizes=dict(height=4, width=6, text_len=7),
    notes="packed tokens: height/width = token grid; joint attn [txt, img] with text mask",
))


# ----------------------------------------------------------------- Lumina2
def _lumina2_inputs(batch, g, height, width, text_len):
    return dict(
        hidden_states=_randn(g, batch, 4, height, width),
        timestep=_timestep(g, batch, 1.0),
        encoder_hidden_states=_randn(g, batch, text_len, TEXT_DIM),
        encoder_attention_mask=_mask(batch, text_len, dtype=torch.bool),
    )


_register(ModelCase(
    name="lumina2",
    cls_name="Lumina2Transformer2DModel",
    config=dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=INNER, num_layers=1,
                num_refiner_layers=1, num_attention_heads=HEADS, num_kv_heads=1, multiple_of=16,
                axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), cap_feat_dim=TEXT_DIM),
    make_inputs=_lumina2_inputs,
    sizes=dict(height=8, width=12, text_len=7),
    notes="latent h/w, patch 2; GQA (2 q heads, 1 kv head); joint [txt, img] with mask",
))


# ----------------------------------------------------------------- DiT (bonus)
def _dit_inputs(batch, g, height, width):
    return dict(
        hidden_states=_randn(g, batch, 4, height, width),
        timestep=_timestep(g, batch).long(),
        class_labels=torch.randint(0, 10, (batch,), generator=g),
    )


_register(ModelCase(
    name="dit",
    cls_name="DiTTransformer2DModel",
    config=dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, num_layers=1,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10),
    make_inputs=_dit_inputs,
    sizes=dict(height=10, width=10),
    notes="latent h/w, patch 2; MUST be square (forward infers side = sqrt(tokens)) -> 25 tokens; "
          "class-conditional, self-attn only",
))


def get_case(name: str) -> ModelCase:
    return MODELS[name]


__all__ = ["ModelCase", "MODELS", "get_case"]

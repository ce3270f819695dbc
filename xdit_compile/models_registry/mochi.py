"""Mochi: the same joint attention as diffusers' MochiAttnProcessor2_0, with the prompt padding expressed as
a key mask instead of per-sample `torch.nonzero` gathers (which split the dynamo graph and leave the
attention outside it). Equal for right-padded prompts, which is what MochiPipeline produces: padded text
queries give zeros, valid ones attend to image tokens and valid text tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rope(x, cos, sin):
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(x_even * cos - x_odd * sin).to(x.dtype), (x_even * sin + x_odd * cos).to(x.dtype)],
                       dim=-1).flatten(-2)


class MaskedMochiAttnProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        def proj(x, q, k, v, nq, nk):
            q, k, v = (m(x).unflatten(2, (attn.heads, -1)) for m in (q, k, v))
            return (nq(q) if nq is not None else q), (nk(k) if nk is not None else k), v

        query, key, value = proj(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        e_query, e_key, e_value = proj(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj,
                                       attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
        if image_rotary_emb is not None:
            query, key = _rope(query, *image_rotary_emb), _rope(key, *image_rotary_emb)
        s_img = query.shape[1]
        q, k, v = (torch.cat([a, b], dim=1).transpose(1, 2)
                   for a, b in ((query, e_query), (key, e_key), (value, e_value)))
        valid = torch.cat([attention_mask.new_ones(attention_mask.shape[0], s_img), attention_mask], dim=1).bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], dropout_p=0.0)
        out = out * valid[:, None, :, None].to(out.dtype)
        out = out.transpose(1, 2).flatten(2, 3)
        hidden_states, encoder_hidden_states = out.split_with_sizes((s_img, out.shape[1] - s_img), dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _set(m, processor) -> None:
    m.set_processor(processor) if hasattr(m, "set_processor") else setattr(m, "processor", processor)


def use_masked_attention(model) -> None:
    for m in model.modules():
        if type(m).__name__ == "MochiAttention":
            if not hasattr(m, "_xdit_orig_processor"):
                m._xdit_orig_processor = m.processor
            _set(m, MaskedMochiAttnProcessor())


def restore_attention(model) -> None:
    """Undo use_masked_attention (unparallelize): each attention gets its original processor back."""
    for m in model.modules():
        if hasattr(m, "_xdit_orig_processor"):
            _set(m, m._xdit_orig_processor)
            del m._xdit_orig_processor

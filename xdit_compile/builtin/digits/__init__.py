"""A tiny class-conditional DiT trained on scikit-learn's bundled digits (shipped weights, no download).

The model is a plain ``diffusers.DiTTransformer2DModel`` (4 layers, 4 heads x 32, patch 2, 16x16x1 pixels,
64 tokens) trained with rectified flow in ``FlowMatchEulerDiscreteScheduler``'s convention:
``x_s = (1 - s) * x + s * noise``, the model predicts ``noise - x`` and is called with ``timestep = 1000 * s``.
Labels 0..9 are the digits; label :data:`NULL_LABEL` (10) is the unconditional (dropped) class, which is
the extra row that diffusers' ``LabelEmbedding`` allocates (index ``num_classes``) for classifier-free guidance.

* :func:`load_transformer` - the shipped model (``transformer/``, a real diffusers folder).
* :func:`sample` - the reference sampler (Euler flow matching, batched classifier-free guidance).
* :func:`classifier` / :func:`accuracy` - a scikit-learn logistic regression that scores samples.

``train.py`` next to this file regenerates the weights; ``README.md`` has the measured numbers.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
TRANSFORMER_DIR = HERE / "transformer"
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # diffusers' LabelEmbedding uses row `num_classes` for the dropped label
SIZE = 16  # pixel resolution the model works at (digits are 8x8, bilinearly upsampled)

__all__ = ["TRANSFORMER_DIR", "NUM_CLASSES", "NULL_LABEL", "SIZE", "load_data", "model_config",
           "disable_label_dropout", "load_transformer", "sample", "classifier", "accuracy"]


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(images, labels)``: images (1797, 1, 16, 16) float32 in [-1, 1]
    (8x8 values 0..16, /16, bilinear upsample to 16x16, *2-1), labels int64 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.from_numpy(d.target.astype(np.int64))


def model_config() -> dict:
    """The DiTTransformer2DModel config of the built-in model."""
    return dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4,
                sample_size=SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero")


def disable_label_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers' DiT drops class labels inside every block's LabelEmbedding (p=0.1, independently per
    block) when in train mode. We drop labels per sample in the training loop instead, so turn that off.
    The embedding tables keep their extra row (index NULL_LABEL) for the unconditional class."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            assert m.embedding_table.num_embeddings == NUM_CLASSES + 1 and m.num_classes == NULL_LABEL
            m.dropout_prob = 0.0
    return model


def load_transformer(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """The shipped ``DiTTransformer2DModel`` (eval mode, label dropout off)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(str(path or TRANSFORMER_DIR), torch_dtype=dtype,
                                                  low_cpu_mem_usage=False)
    return disable_label_dropout(model).eval()


@torch.no_grad()
def sample(transformer, labels, steps: int = 20, guidance: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Generate one image per label: ``(N, 1, 16, 16)`` float32 in [0, 1].

    Euler flow matching with ``FlowMatchEulerDiscreteScheduler`` (default config, shift 1.0) from
    ``torch.Generator().manual_seed(seed)`` noise (drawn on CPU in float32). With ``guidance != 1`` the
    conditional and unconditional (label :data:`NULL_LABEL`) predictions come from one batched forward
    ``[cond, uncond]`` and are combined as ``v = v_u + guidance * (v_c - v_u)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    p = next(transformer.parameters())
    device, dtype = p.device, p.dtype
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    n = labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIZE, SIZE, generator=g, dtype=torch.float32).to(device)
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps, device=device)
    cfg = guidance != 1.0
    cls = torch.cat([labels, torch.full_like(labels, NULL_LABEL)]) if cfg else labels
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if cfg else x
        v = transformer(inp.to(dtype), timestep=t.expand(inp.shape[0]).to(device), class_labels=cls).sample
        v = v.float()
        if cfg:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = sched.step(v, t, x).prev_sample
    return ((x.cpu() + 1) / 2).clamp(0, 1)


@lru_cache(maxsize=1)
def classifier():
    """A scikit-learn ``LogisticRegression`` trained on all 1797 digits at the model's resolution:
    the same 16x16 bilinear-upsampled images the DiT was trained on, in [0, 1], flattened to 256 features
    (so generated images are scored without any resampling). Cached."""
    from sklearn.linear_model import LogisticRegression

    x, y = load_data()
    clf = LogisticRegression(max_iter=3000, C=1.0)
    clf.fit(((x + 1) / 2).reshape(len(x), -1).numpy(), y.numpy())
    return clf


def predict(images) -> np.ndarray:
    """Classifier predictions for images ``(N, 1, 16, 16)`` in [0, 1]."""
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, SIZE * SIZE).numpy()
    return classifier().predict(x)


def accuracy(images, labels) -> float:
    """Fraction of ``images`` ((N, 1, 16, 16) in [0, 1]) that :func:`classifier` assigns to ``labels``."""
    return float((predict(images) == np.asarray(torch.as_tensor(labels).cpu())).mean())

"""Builtin demo models for the CLI and the examples: a name is data, not code.

    from xdit_compile import models_registry as mr

    spec = mr.get("flux-tiny")             # ValueError listing the valid names for an unknown name
    model = spec.build()                   # random weights, torch.manual_seed(seed): equal on every rank
    kwargs = spec.inputs()                 # seeded forward kwargs (return_dict=False); height/width in pixels

    model, spec = mr.load("path/to/folder")  # a local diffusers folder: <Class>.from_pretrained(path)

A ``ModelSpec`` is (diffusers class name, config dict, default sizes). Inputs come from ``INPUT_BUILDERS``,
keyed by the diffusers class name and driven by the model's config (channels, text dim, patch size), so the
same builder serves a tiny random model and a real checkpoint loaded from disk.

Sizes are those of the *image* (pixels), as a pipeline would be called: the builders turn them into latent
or token sizes (VAE factor 8, times the patch size). The tiny models default to 64 x 96 pixels, which is the
24-token image of ``tests/models.py`` (Flux: a 4 x 6 token grid).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["ModelSpec", "InputBuilder", "MODELS", "INPUT_BUILDERS", "get", "load", "resolve", "names"]

VAE_SCALE = 8
"""Pixels per latent pixel for the VAEs of all models below."""


# --- input builders (one per diffusers class) ---------------------------------------------------------

def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _padding_mask(batch, text_len, pad=2):
    """(B, L) long mask, the last ``pad`` positions of each row are padding (as a tokenizer would give)."""
    m = torch.ones(batch, text_len, dtype=torch.long)
    if text_len > 1:
        m[:, text_len - min(pad, text_len - 1):] = 0
    return m


def _grid_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _flux_multiple(cfg):
    return VAE_SCALE * 2 * cfg.get("patch_size", 1)  # the pipeline packs 2x2 latent pixels into one token


def _flux_inputs(cfg, batch, g, *, height, width, text_len, frames):
    h, w = height // _flux_multiple(cfg), width // _flux_multiple(cfg)
    kw = dict(
        hidden_states=_randn(g, batch, h * w, cfg["in_channels"]),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["joint_attention_dim"]),
        pooled_projections=_randn(g, batch, cfg["pooled_projection_dim"]),
        timestep=torch.rand(batch, generator=g),  # the pipeline passes sigma in [0, 1]
        img_ids=_grid_ids(h, w),
        txt_ids=torch.zeros(text_len, 3),
    )
    if cfg.get("guidance_embeds"):
        kw["guidance"] = torch.full((batch,), 3.5)
    return kw


def _wan_multiple(cfg):
    return VAE_SCALE * tuple(cfg.get("patch_size", (1, 2, 2)))[1]


def _wan_inputs(cfg, batch, g, *, height, width, text_len, frames):
    kw = dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], frames, height // VAE_SCALE, width // VAE_SCALE),
        timestep=torch.rand(batch, generator=g) * 1000,
        encoder_hidden_states=_randn(g, batch, text_len, cfg["text_dim"]),
    )
    if cfg.get("image_dim"):  # image-to-video: CLIP image tokens
        n = cfg.get("pos_embed_seq_len") or 257
        kw["encoder_hidden_states_image"] = _randn(g, batch, n, cfg["image_dim"])
    return kw


def _pixart_multiple(cfg):
    return VAE_SCALE * cfg.get("patch_size", 2)


def _pixart_inputs(cfg, batch, g, *, height, width, text_len, frames):
    extra = cfg.get("use_additional_conditions")
    if extra is None:  # PixArtTransformer2DModel's own rule
        extra = cfg.get("sample_size") == 128
    cond = {"resolution": None, "aspect_ratio": None}
    if extra:
        cond = {"resolution": torch.tensor([[float(height), float(width)]] * batch),
                "aspect_ratio": torch.tensor([[height / width]] * batch)}
    return dict(
        hidden_states=_randn(g, batch, cfg["in_channels"], height // VAE_SCALE, width // VAE_SCALE),
        encoder_hidden_states=_randn(g, batch, text_len, cfg["caption_channels"]),
        timestep=torch.rand(batch, generator=g) * 1000,
        added_cond_kwargs=cond,
        encoder_attention_mask=_padding_mask(batch, text_len),
    )


@dataclass(frozen=True)
class InputBuilder:
    """How to call one diffusers class: ``fn(config, batch, generator, **sizes)`` -> forward kwargs."""

    fn: Callable[..., dict]
    multiple: Callable[[dict], int]
    """Height and width (pixels) must be multiples of this (VAE factor x patch / packing)."""
    defaults: dict
    """Sizes for a real checkpoint of this class: height, width (pixels), text_len, frames (latent)."""


INPUT_BUILDERS: dict[str, InputBuilder] = {
    "FluxTransformer2DModel": InputBuilder(_flux_inputs, _flux_multiple,
                                           dict(height=1024, width=1024, text_len=512, frames=1)),
    "WanTransformer3DModel": InputBuilder(_wan_inputs, _wan_multiple,
                                          dict(height=480, width=832, text_len=512, frames=21)),
    "PixArtTransformer2DModel": InputBuilder(_pixart_inputs, _pixart_multiple,
                                             dict(height=1024, width=1024, text_len=300, frames=1)),
}


# --- models -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A diffusers class, its config and default sizes. ``path`` is set for a model loaded from disk."""

    name: str
    cls_name: str
    config: dict
    sizes: dict = field(default_factory=dict)
    """Overrides of the class's ``InputBuilder.defaults`` (height, width, text_len, frames)."""
    description: str = ""
    path: str | None = None

    @property
    def builder(self) -> InputBuilder:
        b = INPUT_BUILDERS.get(self.cls_name)
        if b is None:
            raise ValueError(f"no input builder for {self.cls_name} (model '{self.name}'); "
                             f"classes with one: {', '.join(sorted(INPUT_BUILDERS))}")
        return b

    def default_size(self) -> tuple[int, int]:
        s = {**self.builder.defaults, **self.sizes}
        return s["height"], s["width"]

    def check_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The (height, width) in pixels the inputs will have; ValueError if the model can't take them."""
        dh, dw = self.default_size()
        height, width = height or dh, width or dw
        m = self.builder.multiple(self.config)
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"{self.name}: height and width must be positive multiples of {m} pixels "
                             f"(VAE factor {VAE_SCALE} x patch), got {height} x {width}")
        return height, width

    def build(self, *, seed: int = 0, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The model with random weights from ``torch.manual_seed(seed)`` (equal on every rank), eval mode."""
        import diffusers

        cls = getattr(diffusers, self.cls_name)
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(**self.config)
        return _cast(model, dtype).eval()

    def inputs(self, *, height: int | None = None, width: int | None = None, batch: int = 1, seed: int = 0,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        """Seeded forward kwargs (CPU generator, so equal on every rank and every device), return_dict=False."""
        height, width = self.check_size(height, width)
        s = {**self.builder.defaults, **self.sizes, "height": height, "width": width}
        g = torch.Generator().manual_seed(seed)
        kw = self.builder.fn(self.config, batch, g, **s)
        kw = _to(kw, device, dtype)
        kw["return_dict"] = False
        return kw


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters to ``dtype``, keeping the class's ``_keep_in_fp32_modules`` in float32 (as
    ``from_pretrained(torch_dtype=...)`` does)."""
    if dtype == torch.float32:
        return model
    torch.nn.Module.to(model, dtype=dtype)  # ModelMixin.to would warn about the fp32 modules we handle here
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if name and any(k in name.split(".") for k in keep):
            torch.nn.Module.to(module, dtype=torch.float32)
    return model


def _to(obj: Any, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else None)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device, dtype) for v in obj)
    return obj


# Tiny configs (from tests/models.py): inner dim 32 = 2 heads x 16, text length 7, 24 image tokens.
_HEADS, _HEAD_DIM, _TEXT_DIM, _POOLED_DIM = 2, 16, 20, 12
_TINY = dict(height=64, width=96, text_len=7, frames=3)

MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    ModelSpec(
        "flux-tiny", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
             attention_head_dim=_HEAD_DIM, num_attention_heads=_HEADS,
             joint_attention_dim=_TEXT_DIM, pooled_projection_dim=_POOLED_DIM,
             guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        _TINY, "FLUX-shaped, 1 double + 1 single block, 2 heads; 24 image + 7 text tokens at 64x96"),
    ModelSpec(
        "wan-tiny", "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=_HEADS, attention_head_dim=_HEAD_DIM,
             in_channels=4, out_channels=4, text_dim=_TEXT_DIM, freq_dim=24, ffn_dim=48,
             num_layers=1, rope_max_seq_len=64),
        _TINY, "Wan2.1-shaped, 1 block, 2 heads; 3 latent frames x 24 tokens at 64x96, 7 text tokens"),
    ModelSpec(
        "pixart-tiny", "PixArtTransformer2DModel",
        dict(num_attention_heads=_HEADS, attention_head_dim=_HEAD_DIM, in_channels=4,
             out_channels=8, num_layers=1, cross_attention_dim=_HEADS * _HEAD_DIM,
             sample_size=8, patch_size=2, caption_channels=_TEXT_DIM,
             use_additional_conditions=False, interpolation_scale=1),
        _TINY, "PixArt-shaped, 1 block, 2 heads; 24 image tokens at 64x96, masked cross-attention"),
    ModelSpec(
        "flux-dev", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        dict(height=1024, width=1024, text_len=512),
        "FLUX.1-dev config (12B parameters), random weights; (h/16)*(w/16) image + 512 text tokens"),
]}


def names() -> list[str]:
    return list(MODELS)


def get(name: str) -> ModelSpec:
    """The builtin demo model ``name``; ValueError listing the valid names otherwise."""
    spec = MODELS.get(name)
    if spec is None:
        raise ValueError(f"unknown model '{name}'; builtin models: {', '.join(MODELS)} "
                         f"(or a local diffusers folder: a directory with config.json)")
    return spec


def _folder(path: str | os.PathLike) -> Path:
    """The model folder under ``path``: itself, or its ``transformer/`` if ``path`` is a pipeline folder."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "transformer" / "config.json").is_file():
        p = p / "transformer"
    return p


def resolve(name_or_path: str) -> ModelSpec:
    """A builtin name or a local diffusers folder -> ModelSpec (cheap: reads config.json, loads no weights).

    Raises ValueError with one clear line for an unknown name, a folder without a usable config, a class
    diffusers doesn't have, or a class without an input builder.
    """
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    p = Path(name_or_path)
    if not p.is_dir():
        get(name_or_path)  # raises the unknown-name error
    folder = _folder(p)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"'{p}' is a directory without config.json (nor transformer/config.json): "
                         f"not a diffusers model folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read '{cfg_file}': {e}") from None
    cls_name = config.get("_class_name")
    if not isinstance(cls_name, str):
        raise ValueError(f"'{cfg_file}' has no _class_name: not a diffusers model config")
    import diffusers

    if not hasattr(diffusers, cls_name):
        raise ValueError(f"'{cfg_file}': diffusers {diffusers.__version__} has no class {cls_name}")
    spec = ModelSpec(str(p), cls_name, {k: v for k, v in config.items() if not k.startswith("_")},
                     description=f"{cls_name} from {folder}", path=str(folder))
    spec.builder  # noqa: B018  (raises ValueError: no input builder for this class)
    return spec


def load(name_or_path: str, *, seed: int = 0, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, ModelSpec]:
    """(model, spec): a builtin model with seeded random weights, or ``<_class_name>.from_pretrained``
    of a local diffusers folder (a model folder, or a pipeline folder with ``transformer/``)."""
    spec = resolve(name_or_path)
    if spec.path is None:
        return spec.build(seed=seed, device=device, dtype=dtype), spec
    import diffusers

    cls = getattr(diffusers, spec.cls_name)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        if cls._keep_in_fp32_modules:  # diffusers' from_pretrained refuses these without accelerate
            return _load_without_accelerate(cls, spec, dtype).to(device).eval(), spec
    model = cls.from_pretrained(spec.path, torch_dtype=dtype)
    return model.to(device).eval(), spec


def _load_without_accelerate(cls, spec: ModelSpec, dtype: torch.dtype) -> torch.nn.Module:
    """``cls.from_config`` + the folder's safetensors (one file or an index of shards), strict."""
    from safetensors.torch import load_file

    folder = Path(spec.path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"'{folder}': weight file(s) {', '.join(missing)} not found (only safetensors are read)")
    model = cls.from_config(spec.config)
    state = {}
    for f in files:
        state.update(load_file(str(folder / f)))
    model.load_state_dict(state, strict=True)
    return _cast(model, dtype)

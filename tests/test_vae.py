"""Patch-parallel VAE decode (runtime/vae.py) against the unsplit decoder.

Every rank builds the same tiny AutoencoderKL / AutoencoderKLWan (random weights, norms' affine perturbed so
they matter) and the same latents, decodes them serially and patch-parallel, and returns the max relative
error (max |par - ser| / max |ser|). Latent heights include ones the world size does not divide. One
distributed call per world size runs the whole case list; the tests read its results.
"""

import functools

import pytest
import torch
from dist_utils import run_distributed

TOL = 1e-4


def _tiny_kl():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    return _perturbed(vae)


def _tiny_wan():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])
    return _perturbed(vae)


def _perturbed(vae):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return vae.eval()


def _latents(shape, seed):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(1, shape[1], *([1] * (len(shape) - 2)), generator=g)  # per-channel means matter to norms
    return torch.randn(shape, generator=g) + offset


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _cases(rank, world_size):
    import torch.distributed as dist

    from xdit_compile.runtime.vae import disable_parallel_decode, enable_parallel_decode, parallel_decode

    out = {}
    kl, wan = _tiny_kl(), _tiny_wan()
    with torch.no_grad():
        # even, uneven, and a slab of 1 row (thinner than 2 halos: the conv redoes it whole)
        heights = {2: (8, 7, 3), 4: (8, 10, 5)}[world_size]
        for h in heights:
            z = _latents((2, 4, h, 6), seed=h)
            out[f"kl_h{h}"] = _rel_err(parallel_decode(kl, z), kl.decode(z).sample)

        if world_size == 2:  # bfloat16: as close to the float32 decode as the serial bfloat16 decode is
            z = _latents((1, 4, 7, 6), seed=7)
            ref = kl.decode(z).sample
            kl16 = _tiny_kl().to(torch.bfloat16)
            z16 = z.to(torch.bfloat16)
            out["bf16_serial_vs_fp32"] = _rel_err(kl16.decode(z16).sample.float(), ref)
            out["bf16_parallel_vs_fp32"] = _rel_err(parallel_decode(kl16, z16).float(), ref)

        h = {2: 5, 4: 6}[world_size]
        z = _latents((1, 4, 2, h, 5), seed=h)  # 2 latent frames: the causal feature cache is exercised
        serial = wan.decode(z).sample
        out[f"wan_h{h}"] = _rel_err(parallel_decode(wan, z), serial)

        # enable/disable: vae.decode itself becomes parallel (as a pipeline would call it), then is restored
        handle = enable_parallel_decode(wan)
        same = enable_parallel_decode(wan) is handle
        with handle:
            patched = wan.decode(z, return_dict=False)[0]
        out["wan_enable"] = _rel_err(patched, serial)
        out["restored"] = same and "decode" not in wan.__dict__ and not disable_parallel_decode(wan)
        out["hooks_left"] = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in wan.modules())

        # too few latent rows for the group: the same clear error on every rank, before any communication
        try:
            parallel_decode(kl, _latents((1, 4, world_size - 1, 6), seed=0))
            out["too_few_rows"] = None
        except ValueError as e:
            out["too_few_rows"] = str(e)

        if world_size == 4:  # a subgroup: neighbours' global ranks differ from group ranks
            group = dist.new_group([1, 2, 3])
            if rank != 0:
                z = _latents((1, 4, 7, 6), seed=3)
                out["kl_subgroup_h7"] = _rel_err(parallel_decode(kl, z, group), kl.decode(z).sample)
    return out


@functools.lru_cache(maxsize=None)
def _results(world_size):
    return run_distributed(_cases, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_autoencoder_kl_matches_serial(world_size):
    for rank, res in enumerate(_results(world_size)):
        errs = {k: v for k, v in res.items() if k.startswith("kl_")}
        assert errs and all(e < TOL for e in errs.values()), (rank, errs)


@pytest.mark.parametrize("world_size", [2, 4])
def test_wan_matches_serial(world_size):
    for rank, res in enumerate(_results(world_size)):
        errs = {k: v for k, v in res.items() if k.startswith("wan_")}
        assert len(errs) == 2 and all(e < TOL for e in errs.values()), (rank, errs)


def test_bfloat16_within_serial_noise():
    for rank, res in enumerate(_results(2)):
        serial, par = res["bf16_serial_vs_fp32"], res["bf16_parallel_vs_fp32"]
        assert par <= 2 * serial + 1e-3, (rank, serial, par)


@pytest.mark.parametrize("world_size", [2, 4])
def test_enable_is_idempotent_and_removable(world_size):
    for res in _results(world_size):
        assert res["restored"] is True
        assert res["hooks_left"] == 0


@pytest.mark.parametrize("world_size", [2, 4])
def test_too_few_rows_is_a_clear_error(world_size):
    for res in _results(world_size):
        msg = res["too_few_rows"]
        assert msg is not None and f"latent height {world_size - 1}" in msg and f"{world_size} ranks" in msg


def test_unsupported_vae_is_a_type_error():
    from xdit_compile.runtime.vae import enable_parallel_decode

    with pytest.raises(TypeError, match="AutoencoderKL"):
        enable_parallel_decode(torch.nn.Conv2d(1, 1, 3))

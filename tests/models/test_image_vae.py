"""The VAE on still images without the video feature cache: the same bits as diffusers'
cached path, for the edit model's VAE and Layered's (RGBA), encode and decode."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from src.models.memory import image_vae
from src.models.files.snapshots import main_snapshot
from tests.conftest import TINY_HF_HOME


def snapshot(repo: str):
    return main_snapshot(TINY_HF_HOME, f"Qwen/{repo}")


@pytest.fixture(params=["Qwen-Image-Edit-2511", "Qwen-Image-Layered"])
def vaes(request, hf_home):
    """The same tiny VAE twice: diffusers' own, and one set up for images."""
    path = snapshot(request.param) / "vae"
    stock = AutoencoderKLQwenImage.from_pretrained(path).eval()
    lean = AutoencoderKLQwenImage.from_pretrained(path).eval()
    image_vae.for_images(lean)
    return stock, lean


def feature_caches_passed(module) -> list:
    """What each call of `module` was given as its feature cache (a hook that only looks)."""
    seen: list = []
    module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("feat_cache")),
                                     with_kwargs=True)
    return seen


@torch.no_grad()
def test_a_single_frame_decodes_to_the_same_bits_without_the_cache(vaes):
    stock, lean = vaes
    stock_caches, lean_caches = feature_caches_passed(stock.decoder), feature_caches_passed(lean.decoder)
    z = torch.randn(1, stock.config.z_dim, 1, 12, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lean.decode(z).sample, stock.decode(z).sample)
    assert torch.equal(lean.decode(z, return_dict=False)[0], stock.decode(z).sample)
    assert lean_caches == [None, None] and all(isinstance(cache, list) for cache in stock_caches)


@torch.no_grad()
def test_a_batch_of_layers_decodes_to_the_same_bits(vaes):
    stock, lean = vaes
    z = torch.randn(4, stock.config.z_dim, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(lean.decode(z).sample, stock.decode(z).sample)


@torch.no_grad()
def test_a_single_frame_encodes_to_the_same_bits_without_the_cache(vaes):
    stock, lean = vaes
    lean_caches = feature_caches_passed(lean.encoder)
    channels = stock.config.input_channels
    x = torch.rand(1, channels, 1, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(lean.encode(x).latent_dist.mode(), stock.encode(x).latent_dist.mode())
    assert lean_caches == [None]


@torch.no_grad()
def test_several_frames_keep_the_cached_path(vaes):
    """A video's frames depend on each other through the cache: left to diffusers."""
    stock, lean = vaes
    z = torch.randn(1, stock.config.z_dim, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(lean.decode(z).sample, stock.decode(z).sample)


def test_setting_up_twice_wraps_once(vaes):
    _, lean = vaes
    decode = lean._decode
    image_vae.for_images(lean)
    assert lean._decode is decode

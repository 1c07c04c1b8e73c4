"""Shared pytest fixtures: tiny, seeded, generated in memory or in ``tmp_path``; no network, no downloads."""
from __future__ import annotations

import pytest
import torch

from clip.model import CLIP, CLIPConfig

# A ViT CLIP small enough to build in milliseconds; the full vocabulary so real token ids work.
TINY_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=2, vision_heads=1)


def random_clip_opts(sizes: dict) -> list[str]:
    """--opts that make a demo config's random CLIP exactly ``sizes`` (the demo's own init options unset)."""
    import json

    return [f"network.random_clip={json.dumps(sizes)}", "network.random_clip.vision_positional_std=null"]


@pytest.fixture
def tiny_clip_config() -> CLIPConfig:
    """Sizes of the tiny CLIP (heads = width // 64, so they can be read back off the weights)."""
    return CLIPConfig(**TINY_CLIP)


@pytest.fixture
def tiny_clip_state_dict(tiny_clip_config) -> dict:
    """A seeded random tiny CLIP state dict in OpenAI's layout, every tensor perturbed.

    LayerNorm weights and biases are moved off 1 and 0, so a loader that mixes them up, or drops one, changes
    the outputs.
    """
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the global RNG of other tests
        torch.manual_seed(1234)
        model = CLIP(tiny_clip_config)
    gen = torch.Generator().manual_seed(5678)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_clip_file(tmp_path, tiny_clip_state_dict):
    """The tiny CLIP state dict saved with ``torch.save`` as ``tmp_path/tiny_clip.pt``."""
    path = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip_state_dict, path)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The synthetic demo set (videos, frames, lists, classes, descriptions), 2 videos per class and split; a module
    that needs another size defines its own ``demo``."""
    import sys
    from pathlib import Path

    tools = str(Path(__file__).resolve().parents[1] / "Dataset_creation_scripts")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import make_synthetic_demo

    out = tmp_path_factory.mktemp("demo")
    assert make_synthetic_demo.main([str(out), "--train-per-class", "2", "--val-per-class", "2",
                                     "--no-progress", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module's tests: on a busy 2-core machine two threads spin against each other and
    run many times slower. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_t2l(path, seed: int = 0, perturb_seed: int = 7, clip_config: dict = TINY_CLIP, clip_seed: int = 0,
                  **extra):
    """A tiny T2L checkpoint of ours at ``path`` on the seeded random CLIP ``clip_config``, its T2L tensors perturbed
    (seeded) so that adapters and temporal tokens change the outputs; ``extra`` goes into the checkpoint dict."""
    from modules import build_t2l, make_checkpoint, random_clip
    from utils.checkpoint import atomic_save

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_t2l(random_clip(clip_config, seed=clip_seed), num_frames=8, drop_path_rate=0.0)
    gen = torch.Generator().manual_seed(perturb_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip."):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    backbone = {"name_or_path": "random", "seed": clip_seed, "config": dict(clip_config)}
    atomic_save(make_checkpoint(model, backbone=backbone, **extra), path)
    return path

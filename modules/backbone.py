"""The frozen CLIP under a T2L model: a seeded random CLIP (demo, tests), or the one a checkpoint names, checked.

``random_clip`` builds the demo's CLIP; ``build_backbone`` rebuilds the backbone a checkpoint of ours records (its
name or path with SHA-256, or the random CLIP's seed and sizes); ``check_backbone`` refuses a CLIP other than the
recorded one. The model factory (``modules.factory``) and the checkpoint readers use them.
"""
from __future__ import annotations

import torch

import clip

from .errors import CheckpointError

__all__ = ["random_clip", "build_backbone", "check_backbone"]


def build_backbone(backbone: dict, source: str = "checkpoint") -> torch.nn.Module:
    """Rebuild the frozen CLIP a checkpoint of ours names: a seeded random CLIP (demo, tests) or ``clip.load``."""
    name = backbone.get("name_or_path")
    if name is None:
        raise CheckpointError(f"{source} does not say which CLIP it was trained on (no backbone.name_or_path); "
                              f"pass the CLIP model explicitly")
    if str(name).startswith("random"):
        cfg = backbone.get("config")
        if not cfg:
            raise CheckpointError(f"{source}: a random-initialised backbone needs its config in the checkpoint")
        return random_clip(cfg, int(backbone.get("seed", 0)))
    model = clip.load(name)
    check_backbone(backbone, model, source)
    return model


def check_backbone(recorded: dict, clip_model: torch.nn.Module, source: str = "checkpoint") -> None:
    """Refuse a frozen CLIP other than the one a checkpoint was trained on, where both say which it is.

    Two random CLIPs must agree on seed and config; two loaded files on their SHA-256. Anything else (a CLIP
    without a recorded identity, a checkpoint of an older version) is accepted as given.
    """
    given = getattr(clip_model, "source_identity", None) or {}
    if str(recorded.get("name_or_path", "")).startswith("random") and given.get("name_or_path") == "random":
        want = (int(recorded.get("seed", 0)), dict(recorded.get("config") or {}))
        have = (int(given.get("seed", 0)), dict(given.get("config") or {}))
        if want != have:
            diff = sorted(k for k in set(want[1]) | set(have[1]) if want[1].get(k) != have[1].get(k))
            diff += ["seed"] if want[0] != have[0] else []
            raise CheckpointError(
                f"{source} was trained on a random CLIP with seed {want[0]} and config {want[1]}, but the CLIP given "
                f"has seed {have[0]} and config {have[1]} (differing: {', '.join(diff)}): the frozen weights "
                f"differ, so the results would too. Set network.random_seed and network.random_clip to the "
                f"checkpoint's")
    elif recorded.get("sha256") and given.get("sha256") and recorded["sha256"] != given["sha256"]:
        raise CheckpointError(f"{source} was trained on CLIP {recorded.get('name_or_path')} with SHA-256 "
                              f"{recorded['sha256']}, but the CLIP {given.get('name_or_path')} has SHA-256 "
                              f"{given['sha256']}: the frozen weights differ, so the results would too")


def random_clip(config: dict, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised CLIP of the given sizes, the same on every machine for a seed (demo and tests).

    ``config`` holds the sizes of ``CLIPConfig`` and, optionally, ``vision_positional_std``: the standard deviation
    of the image tower's positional embedding. OpenAI's initialisation draws it at ``vision_width ** -0.5``, which
    leaves a random network nearly blind to where things are in the image (a trained CLIP is not); the demo draws it
    larger. The global RNG is left as it was, so building a model does not change the data order of a run.
    """
    from clip.model import CLIP, CLIPConfig

    sizes = dict(config)
    positional_std = sizes.pop("vision_positional_std", None)  # None: OpenAI's scale, and not recorded
    if positional_std is not None and (type(positional_std) not in (int, float) or positional_std <= 0):
        raise ValueError(f"vision_positional_std must be a positive number, got {positional_std!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(CLIPConfig(**sizes)).eval()
    if positional_std is not None:
        visual = model.visual
        with torch.no_grad():  # the same draw, rescaled from OpenAI's width ** -0.5 to the requested std
            visual.positional_embedding.mul_(positional_std * visual.width ** 0.5)
        sizes["vision_positional_std"] = positional_std
    model.source_identity = {"name_or_path": "random", "seed": seed, "config": sizes}
    return model

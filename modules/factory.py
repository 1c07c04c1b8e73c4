"""The one model factory: every script and ``features.load_model`` build or load their model here.

    build_clip(cfg)                  the frozen CLIP of ``network.pretrained`` (a ``clip.load`` name or path, or random)
    build_model(cfg, init_from)      a fresh T2L for training, on that CLIP (train.py); with ``init_from``
                                     (``network.init_from``) its T2L tensors start from that checkpoint or folder
    load_model("last.pt")            a T2L (our checkpoint, a published one, a model folder) or, for a CLIP name or
                                     CLIP weights, the frame-averaged CLIP baseline; returns a :class:`LoadedModel`
    load_eval_model(cfg, weights)    what test.py evaluates: the T2L of ``weights``, or the baseline for None

A file is read once: its keys say what it is, and the model is built from what was read. The frame count is checked
in one place (``modules.checkpoint.check_num_frames``) and one log line says what was loaded.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

import clip

from .backbone import random_clip
from .checkpoint import (FORMAT, check_num_frames, init_from_checkpoint, is_published, read_checkpoint,
                         t2l_from_checkpoint)
from .model_folder import is_model_folder, load_model_folder, read_folder_config
from .t2l import T2L, build_t2l

logger = logging.getLogger(__name__)

__all__ = ["FrameAverageCLIP", "LoadedModel", "build_clip", "build_model", "load_model", "load_eval_model",
           "model_kind"]

PathLike = Union[str, os.PathLike]


class FrameAverageCLIP(nn.Module):
    """The standard zero-shot baseline: the frozen CLIP on every frame, frame embeddings averaged."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model
        self.num_frames = None

    def encode_video(self, videos: torch.Tensor):
        B, T = videos.shape[:2]
        frame_emb = self.clip.encode_image(videos.flatten(0, 1)).view(B, T, -1)  # (B*T, E) -> (B, T, E)
        return frame_emb.mean(1), frame_emb

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)

    @property
    def logit_scale(self):
        return self.clip.logit_scale


# ---------------------------------------------------------------------------------------------- from a config
def build_clip(cfg) -> nn.Module:
    """The frozen CLIP of ``network.pretrained``: a ``clip.load`` name or path, or a seeded random CLIP."""
    if cfg.network.pretrained == "random":
        logger.info("CLIP backbone: RANDOM initialisation (seed %d, sizes %s) -- a demo/test model, not "
                    "pretrained weights", cfg.network.random_seed, cfg.network.random_clip)
        return random_clip(cfg.network.random_clip, cfg.network.random_seed)
    kwargs = {"download_root": cfg.network.clip_cache} if cfg.network.clip_cache else {}
    return clip.load(cfg.network.pretrained, device="cpu", **kwargs)


def build_model(cfg, clip_model: Optional[nn.Module] = None, init_from: Optional[str] = None) -> T2L:
    """A fresh T2L (training) from the config's model options, on ``clip_model`` or :func:`build_clip`'s CLIP;
    with ``init_from`` (train.py passes ``network.init_from`` on a first start) its T2L tensors start from that
    checkpoint or model folder (``modules.checkpoint.init_from_checkpoint``: ours or published)."""
    clip_model = clip_model if clip_model is not None else build_clip(cfg)
    model = build_t2l(clip_model, num_frames=cfg.data.num_frames, **vars(cfg.network.t2l))
    if init_from:
        init_from_checkpoint(model, init_from, trust=cfg.network.trust_checkpoint)
        logger.info("T2L tensors initialised from %s (network.init_from)", init_from)
    return model


def load_eval_model(cfg, weights: Optional[str]) -> nn.Module:
    """A T2L checkpoint (ours or published) or model folder, or the frame-averaged CLIP baseline when ``weights``
    is None; in eval mode. The T2L must have been trained with ``data.num_frames`` frames."""
    if weights is None:
        logger.info("no T2L weights: evaluating the frozen CLIP baseline (frame-averaged %s)",
                    cfg.network.pretrained)
        return FrameAverageCLIP(build_clip(cfg)).eval()
    clip_model = build_clip(cfg) if cfg.network.pretrained == "random" else None
    loaded = load_model(weights, trust=cfg.network.trust_checkpoint, clip_model=clip_model, t2l_only=True,
                        num_frames=cfg.data.num_frames, frames_setting="data.num_frames",
                        frames_fix="set --opts data.num_frames={trained}")
    return loaded.model.eval()


# ---------------------------------------------------------------------------------------------- from a file
@dataclass
class LoadedModel:
    """A loaded model and what it is.

    ``kind``: "t2l" or "clip" (the frame-averaged baseline). ``identity``: what was loaded, as feature exports record
    it: ``{"kind", "format" ("ours" | "published" | "folder", T2L only), "source", "sha256", "backbone" (ours and
    folders: the frozen CLIP's name or seed, SHA-256, sizes)}``.
    """

    model: nn.Module
    kind: str
    identity: dict

    @property
    def num_frames(self) -> Optional[int]:
        """T of a T2L model (fixed by its temporal tokens); None for the CLIP baseline, which takes any."""
        return self.model.num_frames


def _inspect(name_or_path: PathLike, trust: bool) -> tuple:
    """(kind, format, checkpoint dict or None) of a model source, reading a torch file once (memory-mapped)."""
    from clip.torchscript import is_torchscript_archive
    from utils.checkpoint import is_torch_file, safe_load

    if isinstance(name_or_path, str) and name_or_path in clip.available_models():
        return "clip", None, None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {name_or_path!r} is neither a file or folder nor a CLIP name "
                                f"({', '.join(clip.available_models())})")
    if is_model_folder(path):  # python -m modules.checkpoint export: safetensors + config.json
        return "t2l", "folder", None
    if path.is_dir() or path.suffix == ".safetensors" or is_torchscript_archive(path) or not is_torch_file(path):
        return "clip", None, None  # not a torch file at all: clip.load gives the error that names the formats
    ckpt = safe_load(path, trust=trust, mmap=True)  # a file needing full unpickling: only with trust
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        return "t2l", "ours", ckpt
    if isinstance(ckpt, dict) and is_published(ckpt):
        return "t2l", "published", ckpt
    return "clip", None, None  # CLIP weights (clip.load reads them)


def model_kind(name_or_path: PathLike, trust: bool = False) -> str:
    """"t2l" for a T2L checkpoint (ours or published) or model folder, "clip" for a CLIP name or CLIP weights.

    Looks at the file's keys (memory-mapped where possible). A file that needs full unpickling is only opened with
    ``trust``; otherwise the error says so.
    """
    return _inspect(name_or_path, trust)[0]


def _backbone_record(model: T2L) -> dict:
    return {k: v for k, v in getattr(model.clip, "source_identity", {}).items()
            if k in ("name_or_path", "sha256", "seed", "config")}


def load_model(name_or_path: PathLike, *, trust: bool = False, clip_model: Optional[nn.Module] = None,
               t2l_only: bool = False, num_frames: Optional[int] = None, frames_setting: str = "num_frames",
               frames_fix: Optional[str] = None) -> LoadedModel:
    """Load what ``name_or_path`` holds: a T2L (checkpoint of ours, published checkpoint, model folder) or a CLIP.

    Args:
        name_or_path: a checkpoint file or model folder; or a CLIP name (``clip.available_models()``) or CLIP
            weights in any format ``clip.load`` reads, which give the frame-averaged CLIP baseline.
        trust: allow checkpoints that need full unpickling (they can run code): only files you trust.
        clip_model: the frozen CLIP to put under a T2L of ours instead of rebuilding the recorded one (checked
            against the record), e.g. test.py's seeded random CLIP.
        t2l_only: a T2L or an error (test.py's ``--weights``): a CLIP weights file is refused, naming the file.
        num_frames: the frame count asked for; a T2L trained with another is refused (None: no request).
        frames_setting, frames_fix: how the refusal names the knob and its fix (``{trained}``: the model's count).

    Raises FileNotFoundError, ``modules.CheckpointError``, ``clip.CLIPLoadError``, ``UnsafeCheckpointError`` or
    ValueError naming the file. Logs one line saying what was loaded.
    """
    source = os.fspath(name_or_path)
    path = Path(source).expanduser()
    if t2l_only:
        fmt = "folder" if path.is_dir() else None
        ckpt = None if fmt else read_checkpoint(path, trust=trust)
        kind = "t2l"
    else:
        kind, fmt, ckpt = _inspect(name_or_path, trust)
    if kind == "clip":
        backbone = clip.load(source)
        identity = {"kind": "clip", "source": source, "sha256": getattr(backbone, "source_identity", {}).get("sha256")}
        logger.info("loaded %s: the frozen CLIP, frame-averaged (baseline)", source)
        return LoadedModel(FrameAverageCLIP(backbone), "clip", identity)
    if fmt == "folder":
        model = load_model_folder(path, clip_model=clip_model)
        config = read_folder_config(path)
        sha256, what = config.get("weights_sha256"), f"T2L model folder {source} ({config['weights']} weights"
    else:
        model = t2l_from_checkpoint(ckpt, source, clip_model=clip_model)
        fmt = "ours" if ckpt.get("format") == FORMAT else "published"
        sha256 = clip.file_sha256(path) if path.is_file() else None
        what = (f"{'published ' if fmt == 'published' else ''}T2L checkpoint {source} (epoch {ckpt.get('epoch')}, "
                f"temporal tokens {model.options.temporal_tokens}")
    check_num_frames(source, model.num_frames, num_frames, frames_setting,
                     frames_fix.format(trained=model.num_frames) if frames_fix else None)
    identity = {"kind": "t2l", "format": fmt, "source": source, "sha256": sha256}
    if fmt in ("ours", "folder"):
        # The backbone is part of what the checkpoint means: record it (name, its SHA-256, or random seed).
        identity["backbone"] = _backbone_record(model)
    logger.info("loaded %s, %d frames)", what, model.num_frames)
    return LoadedModel(model, "t2l", identity)

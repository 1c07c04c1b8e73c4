"""T2L checkpoints: the published layout (full fp16 model) and ours (T2L tensors + backbone identity).

Published layout (METHOD.md, "Files a user brings"): ``{"epoch", "model_state_dict", "optimizer_state_dict"}`` where
``model_state_dict`` holds every OpenAI CLIP key plus ``visual.temporal_embedding`` (1, T, D),
``visual.transformer.T_prompt_embeddings`` (L, T, D) and ``{visual.,}transformer.resblocks.{i}.Adapter.D_fc{1,2}``;
keys may carry a ``module.`` prefix.

Ours: a plain dict that ``torch.load(weights_only=True)`` reads: ``{"format": "t2l", "version", "model":
{T2L tensor name: tensor}, "num_frames", "options", "backbone": {"name_or_path", "sha256", "config"}, ...}``;
training checkpoints add optimiser, scheduler, scaler, epoch and RNG states (utils/checkpoint).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from clip import strip_prefixes

from .backbone import build_backbone, check_backbone
from .errors import CheckpointError
from .t2l import T2L, build_t2l

logger = logging.getLogger(__name__)

FORMAT = "t2l"
VERSION = 1

_PUBLISHED_ADAPTER = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.Adapter\.D_fc([12])\.(weight|bias)$")
_OURS_ADAPTER = re.compile(r"^(vision|text)_adapters\.(\d+)\.(down|up)\.(weight|bias)$")
# The temporal tensors: our name -> the published one (the adapters are mapped by the two patterns above).
_TOKENS_TO_PUBLISHED = {"temporal_tokens": "visual.transformer.T_prompt_embeddings",
                        "temporal_embedding": "visual.temporal_embedding"}
_TOKENS_TO_OURS = {v: k for k, v in _TOKENS_TO_PUBLISHED.items()}


def published_to_ours(state_dict: dict) -> tuple[dict, dict]:
    """Split a published ``model_state_dict`` into (OpenAI CLIP state dict, T2L tensors under our names)."""
    clip_sd, t2l_sd = {}, {}
    for key, value in strip_prefixes(state_dict).items():
        m = _PUBLISHED_ADAPTER.match(key)
        if m:
            tower = "vision" if m.group(1) else "text"
            part = "down" if m.group(3) == "1" else "up"
            t2l_sd[f"{tower}_adapters.{m.group(2)}.{part}.{m.group(4)}"] = value
        elif key in _TOKENS_TO_OURS:
            t2l_sd[_TOKENS_TO_OURS[key]] = value
        else:
            clip_sd[key] = value
    return clip_sd, t2l_sd


def ours_to_published(model: T2L) -> dict:
    """The whole model as a published-layout ``model_state_dict`` (fp32; the original code casts as it likes)."""
    sd = {k: v.detach().clone() for k, v in model.clip.state_dict().items()}
    for key, value in model.trainable_state_dict().items():
        m = _OURS_ADAPTER.match(key)
        if m:
            prefix = "visual." if m.group(1) == "vision" else ""
            fc = "D_fc1" if m.group(3) == "down" else "D_fc2"
            sd[f"{prefix}transformer.resblocks.{m.group(2)}.Adapter.{fc}.{m.group(4)}"] = value
        elif key in _TOKENS_TO_PUBLISHED:
            sd[_TOKENS_TO_PUBLISHED[key]] = value
        else:
            raise CheckpointError(f"T2L tensor {key!r} has no place in the published checkpoint layout")
    return sd


def infer_published_options(t2l_sd: dict, num_vision_layers: int) -> tuple[int, dict]:
    """Read (num_frames, T2L options) off the T2L tensors of a published checkpoint."""
    tokens = t2l_sd.get("temporal_tokens")
    emb = t2l_sd.get("temporal_embedding")
    if tokens is not None:
        num_frames = tokens.shape[1]
        mode = "deep" if tokens.shape[0] == num_vision_layers and num_vision_layers > 1 else "shallow"
    elif emb is not None:
        num_frames, mode = emb.shape[1], "none"
    else:
        raise CheckpointError("the checkpoint has neither visual.transformer.T_prompt_embeddings nor "
                              "visual.temporal_embedding, so it is not a T2L checkpoint")
    options: dict[str, Any] = {"temporal_tokens": mode}
    options["vision_adapters"] = any(k.startswith("vision_adapters.") for k in t2l_sd)
    options["text_adapters"] = any(k.startswith("text_adapters.") for k in t2l_sd)
    down = next((v for k, v in t2l_sd.items() if k.endswith(".down.weight")), None)
    if down is not None:
        options["adapter_ratio"] = down.shape[0] / down.shape[1]
    return num_frames, options


def load_t2l_tensors(model: T2L, t2l_sd: dict, source: str = "checkpoint") -> None:
    """Copy T2L tensors into ``model``; any missing, unexpected or mis-shaped tensor is an error naming it."""
    expected = {k: v for k, v in model.named_parameters() if not k.startswith("clip.")}
    missing = sorted(set(expected) - set(t2l_sd))
    unexpected = sorted(set(t2l_sd) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for k in sorted(set(expected) & set(t2l_sd)):
        if tuple(t2l_sd[k].shape) != tuple(expected[k].shape):
            hint = ""
            if k in ("temporal_tokens", "temporal_embedding"):  # say why, for a caller that did not check the frames
                hint = f" (the checkpoint was trained with {t2l_sd[k].shape[1]} frames, the model has " \
                       f"{model.num_frames})"
            problems.append(f"{k}: checkpoint shape {tuple(t2l_sd[k].shape)} != model shape "
                            f"{tuple(expected[k].shape)}{hint}")
    if problems:
        raise CheckpointError(f"{source} does not fit this T2L model: " + "; ".join(problems))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(t2l_sd[k].to(p.dtype))


def make_checkpoint(model: T2L, backbone: Optional[dict] = None, **extra) -> dict:
    """Our checkpoint dict: T2L tensors, frames, options and the frozen backbone's identity (not its weights)."""
    backbone = dict(backbone or getattr(model.clip, "source_identity", None) or {})
    backbone.setdefault("config", model.clip.config.to_dict())
    ckpt = {"format": FORMAT, "version": VERSION, "model": model.trainable_state_dict(),
            "num_frames": model.num_frames, "options": model.options.to_dict(), "backbone": backbone}
    ckpt.update(extra)
    return ckpt


def save_published(model: T2L, path: str | Path, epoch: int = 0, half: bool = True) -> None:
    """Write a published-layout full checkpoint that the original T2L/EZ-CLIP code can read."""
    sd = ours_to_published(model)
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    from utils.checkpoint import atomic_save  # torch.save through the atomic writer of utils.io

    atomic_save({"epoch": epoch, "model_state_dict": sd, "optimizer_state_dict": {}}, path)


def check_num_frames(source: str, trained: int, requested: Optional[int], setting: str = "num_frames",
                     fix: Optional[str] = None) -> None:
    """The one frame-count check: a T2L model holds one temporal token per frame, so it runs with the frame count
    it was trained with. ``requested`` None: nothing asked for. ``setting`` names the knob in the message, ``fix``
    says how to change it (default: set it to the trained count)."""
    if requested is not None and int(requested) != int(trained):
        raise CheckpointError(f"{source} was trained with {trained} frames but {setting} is {requested}; "
                              f"{fix or f'set {setting}={trained}'}")


def read_checkpoint(path: str | Path, trust: bool = False, mmap: bool = False) -> dict:
    """Read a checkpoint file safely (``weights_only=True``, ``utils.checkpoint.safe_load``), with errors that name
    the file. ``mmap``: map the tensors instead of reading them (a look at the keys costs next to nothing)."""
    from utils.checkpoint import safe_load

    obj = safe_load(path, trust=trust, mmap=mmap)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found a {type(obj).__name__}")
    return obj


def is_published(ckpt: dict) -> bool:
    """Whether a checkpoint dict is in the published layout (T2L tensors under ``visual.``, maybe ``module.``)."""
    sd = ckpt.get("model_state_dict", ckpt)
    return isinstance(sd, dict) and any(k.endswith("T_prompt_embeddings") or k.endswith("temporal_embedding")
                                        for k in sd if isinstance(k, str) and k.startswith(("visual.", "module.")))


def load_t2l(path: str | Path, clip_model: Optional[torch.nn.Module] = None, trust: bool = False,
             map_location: str = "cpu", **options) -> T2L:
    """Load a T2L model from our checkpoint, a published one, or a model folder (``modules.model_folder``).

    Published checkpoints carry the whole CLIP; ours carry its identity, and the backbone is loaded with
    ``clip.load(backbone.name_or_path)`` (checked against the recorded SHA-256) unless ``clip_model`` is given.
    ``options`` override T2L options that do not change tensor shapes (``prompt_dropout``, ``drop_path_rate``,
    ``activation_checkpointing``). Missing or unexpected tensors are errors that name them. Scripts load models
    through ``modules.factory``, which also says what was loaded.
    """
    path = Path(path)
    if path.is_dir():  # a model folder (python -m modules.checkpoint export): safetensors + JSON, no pickle
        from .model_folder import load_model_folder

        return load_model_folder(path, clip_model=clip_model, **options)
    return t2l_from_checkpoint(read_checkpoint(path, trust=trust), str(path), clip_model=clip_model, **options)


def t2l_from_checkpoint(ckpt: dict, source: str, clip_model: Optional[torch.nn.Module] = None, **options) -> T2L:
    """The T2L model of a checkpoint dict already read (ours or published); ``source`` names it in errors.

    As :func:`load_t2l` after the read: the factory reads a file once and builds the model from what it read.
    """
    from clip.model import build_model

    if ckpt.get("format") == FORMAT:
        backbone = ckpt.get("backbone") or {}
        if clip_model is None:
            clip_model = build_backbone(backbone, source=source)
        else:
            check_backbone(backbone, clip_model, source=source)
        opts = {**ckpt.get("options", {}), **options}
        model = build_t2l(clip_model, num_frames=int(ckpt["num_frames"]), **opts)
        load_t2l_tensors(model, ckpt["model"], source=source)
        return model
    if not is_published(ckpt):
        raise CheckpointError(
            f"{source} is neither a T2L checkpoint of this project (key 'format': 't2l') nor a published T2L "
            f"checkpoint (a 'model_state_dict' with visual.transformer.T_prompt_embeddings); top-level keys: "
            f"{sorted(map(str, ckpt))[:10]}. A plain CLIP weights file is loaded with clip.load instead.")
    clip_sd, t2l_sd = published_to_ours(ckpt.get("model_state_dict", ckpt))
    if clip_model is None:
        try:
            clip_model = build_model(clip_sd)
        except Exception as e:  # a broken CLIP part gets the file's name
            raise CheckpointError(f"{source}: the CLIP weights in this published checkpoint do not build a CLIP "
                                  f"ViT: {e}") from e
        clip_model.source_identity = {"name_or_path": source, "kind": "published-t2l"}
    num_layers = len(clip_model.visual.transformer.resblocks)
    num_frames, inferred = infer_published_options(t2l_sd, num_layers)
    model = build_t2l(clip_model, num_frames=num_frames, **{**inferred, **options})
    load_t2l_tensors(model, t2l_sd, source=source)
    return model


def init_from_checkpoint(model: T2L, path: str | Path, trust: bool = False) -> None:
    """Start ``model`` (a freshly built T2L) from the T2L tensors of a checkpoint: ours or a published one.

    The frozen CLIP is not taken from the file: it is ``model``'s. A checkpoint of ours must name the same backbone
    (``check_backbone``); a published one carries its CLIP, which must equal ``model``'s (to fp16 rounding, the
    precision the published files are saved in), or the fine-tuned model would not be the published one. Frame
    count, variant and adapter sizes must match the model; every mismatch is an error naming the tensor.
    """
    source = str(path)
    if Path(path).is_dir():  # a model folder: its T2L tensors, trained on the backbone it records
        from .model_folder import read_model_folder

        config, t2l_sd, _ = read_model_folder(path)
        check_backbone(config["backbone"], model.clip, source=source)
        check_num_frames(source, int(config["num_frames"]), model.num_frames, "data.num_frames")
        load_t2l_tensors(model, t2l_sd, source=source)
        logger.info("initialised the T2L tensors from the model folder %s", source)
        return
    ckpt = read_checkpoint(path, trust=trust)
    if ckpt.get("format") == FORMAT:
        check_backbone(ckpt.get("backbone") or {}, model.clip, source=source)
        t2l_sd = ckpt["model"]
        trained_frames = int(ckpt["num_frames"])
    elif is_published(ckpt):
        clip_sd, t2l_sd = published_to_ours(ckpt.get("model_state_dict", ckpt))
        ours = model.clip.state_dict()
        missing = sorted(set(ours) - set(clip_sd))
        if missing:
            raise CheckpointError(f"{source}: its CLIP lacks {', '.join(missing[:5])}: not the CLIP of this model")
        differ = []
        for k, v in ours.items():
            w = clip_sd[k]
            if tuple(w.shape) != tuple(v.shape):
                differ.append(f"{k} (shape {tuple(w.shape)} vs {tuple(v.shape)})")
            elif not torch.allclose(w.float(), v.float(), rtol=2.0 ** -10, atol=1e-7):
                differ.append(f"{k} (max difference {float((w.float() - v.float()).abs().max()):.3g})")
        if differ:
            raise CheckpointError(f"{source}: its frozen CLIP differs from network.pretrained's in {len(differ)} "
                                  f"tensor(s), e.g. {'; '.join(differ[:3])}; set network.pretrained to the CLIP the "
                                  f"checkpoint was trained on")
        trained_frames, _ = infer_published_options(t2l_sd, len(model.clip.visual.transformer.resblocks))
    else:
        raise CheckpointError(f"{source} is neither a T2L checkpoint of this project nor a published T2L checkpoint "
                              f"(top-level keys {sorted(map(str, ckpt))[:10]}); network.init_from takes one of those")
    check_num_frames(source, trained_frames, model.num_frames, "data.num_frames")
    load_t2l_tensors(model, t2l_sd, source=source)
    logger.info("initialised the T2L tensors from %s (epoch %s)", source, ckpt.get("epoch"))


def _convert_main(argv=None) -> int:
    """``python -m modules.checkpoint [convert] OURS.pt PUBLISHED.pth``: write the published full-model layout."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m modules.checkpoint [convert]",
                                description="Convert a T2L checkpoint of ours (or a published one, or a model folder) "
                                            "into the published layout (full fp16 model), readable by the original "
                                            "T2L/EZ-CLIP code.",
                                epilog="example: python -m modules.checkpoint output/k400_zero_shot/last.pt "
                                       "k400_published.pth")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--fp32", action="store_true", help="keep fp32 instead of the published fp16")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (only for trusted files)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    epoch = 0 if Path(args.src).is_dir() else int(read_checkpoint(args.src, trust=args.trust_checkpoint).get("epoch", 0))
    model = load_t2l(args.src, trust=args.trust_checkpoint)
    save_published(model, args.dst, epoch=epoch, half=not args.fp32)
    logger.info("wrote %s (published layout, %s)", args.dst, "fp32" if args.fp32 else "fp16")
    return 0


def _export_main(argv=None) -> int:
    """``python -m modules.checkpoint export CKPT OUT_DIR [--full]``: a shareable model folder (safetensors)."""
    import argparse
    import sys

    from .model_folder import export_model_folder

    p = argparse.ArgumentParser(prog="python -m modules.checkpoint export",
                                description="Write a shareable model folder: model.safetensors (the T2L tensors, or "
                                            "everything with --full), config.json (backbone identity, frames, "
                                            "options) and README.md (a model card). features.load_model(OUT_DIR), "
                                            "predict.py / extract_features.py / search.py --model OUT_DIR and "
                                            "test.py --weights OUT_DIR load it without any pickle.",
                                epilog="example: python -m modules.checkpoint export output/k400_zero_shot/last.pt "
                                       "k400_t2l")
    p.add_argument("ckpt", help="a checkpoint of ours, a published T2L checkpoint, or a model folder")
    p.add_argument("out_dir", help="the folder to write (new, or an earlier model folder with --overwrite)")
    p.add_argument("--full", action="store_true",
                   help="include the frozen CLIP too (a self-contained folder; needed for published checkpoints)")
    p.add_argument("--name", help="the model's name in the card (default: the folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace the model folder already in OUT_DIR")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (only for trusted files)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from utils.checkpoint import UnsafeCheckpointError

    try:
        export_model_folder(args.ckpt, args.out_dir, full=args.full, trust=args.trust_checkpoint,
                            overwrite=args.overwrite, name=args.name)
    except (CheckpointError, UnsafeCheckpointError, FileNotFoundError, ValueError, OSError) as e:
        print(f"python -m modules.checkpoint export: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """``export CKPT OUT_DIR`` writes a model folder; ``[convert] SRC DST`` (the original form) the published layout."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return _export_main(argv[1:])
    if argv and argv[0] == "convert":
        return _convert_main(argv[1:])
    return _convert_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""A shareable T2L model folder: ``model.safetensors``, ``config.json`` and a model card, read without any pickle.

    python -m modules.checkpoint export output/k400_zero_shot/last.pt k400_t2l          # T2L tensors only
    python -m modules.checkpoint export output/k400_zero_shot/last.pt k400_t2l --full   # with the frozen CLIP

Layout of the folder:
  model.safetensors  the T2L tensors under our names (``temporal_tokens``, ``vision_adapters.0.down.weight``, ...);
                     with ``--full`` also every CLIP tensor, prefixed ``clip.`` (OpenAI names after the prefix)
  config.json        ``{"format": "t2l-model", "version", "weights": "t2l" | "full", "weights_sha256",
                     "num_frames", "options", "backbone": {name_or_path, sha256 | seed, config}, "clip_config",
                     "embed_dim", "input_resolution", "trainable_parameters", "source": {...}}``
  README.md          the model card: what it is, the backbone, how it was trained (when the checkpoint says), use

Loading (:func:`load_model_folder`, which ``modules.load_t2l``, ``features.load_model``, predict.py, test.py,
extract_features.py and search.py reach for a folder; train.py's ``network.init_from`` takes its T2L tensors) reads the JSON and the safetensors file and nothing else: a
file in the folder that is not safetensors (a renamed ``.pt`` pickle, say) is refused, never unpickled. A ``t2l``
folder rebuilds its frozen backbone from the record (the seeded random CLIP, or ``clip.load(name)`` checked against
the recorded SHA-256: that is the backbone's own file, read as ``clip.load`` reads it); a ``full`` folder needs
nothing else.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from clip.pretrained import file_sha256

from .backbone import build_backbone, check_backbone
from .checkpoint import load_t2l_tensors
from .errors import CheckpointError
from .t2l import T2L, build_t2l

logger = logging.getLogger(__name__)

__all__ = ["MODEL_FORMAT", "WEIGHTS_FILE", "CONFIG_FILE", "CARD_FILE", "is_model_folder", "export_model_folder",
           "load_model_folder", "read_model_folder", "read_folder_config"]

MODEL_FORMAT = "t2l-model"
MODEL_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
CLIP_PREFIX = "clip."
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")

PathLike = Union[str, os.PathLike]


def is_model_folder(path: PathLike) -> bool:
    """True for a folder whose config.json says it is a T2L model folder (a Hugging Face CLIP folder is not)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == MODEL_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_folder_config(folder: PathLike) -> dict:
    """config.json of a model folder, checked; errors name the file."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a T2L model folder: it has no {CONFIG_FILE}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not the config of a T2L model folder (expected \"format\": "
                              f"\"{MODEL_FORMAT}\")")
    if int(config.get("version", 0)) > MODEL_VERSION:
        raise CheckpointError(f"{path} is a model folder of format version {config['version']}; this code reads up to "
                              f"version {MODEL_VERSION}: update the code")
    for key in ("weights", "num_frames", "options", "backbone"):
        if key not in config:
            raise CheckpointError(f"{path} lacks {key!r}")
    if config["weights"] not in ("t2l", "full"):
        raise CheckpointError(f"{path}: \"weights\" must be \"t2l\" or \"full\", got {config['weights']!r}")
    return config


def _check_safetensors(path: Path) -> None:
    """Refuse anything but a safetensors file, before a byte of it is interpreted (a pickle is never opened)."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(f"{path} is a pickle (a torch.save file), not safetensors: model folders are loaded "
                              f"without unpickling, so it is refused. Export the model again with "
                              f"python -m modules.checkpoint export CKPT {path.parent}")
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 9 or head[8:9] != b"{" or n <= 0 or n > path.stat().st_size - 8:
        raise CheckpointError(f"{path} is not a safetensors file (truncated, or another format); model folders hold "
                              f"safetensors only")


def _read_weights(folder: Path, config: dict) -> dict:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        hint = (f"; {', '.join(others)} {'is' if len(others) == 1 else 'are'} not read: pickles are never loaded "
                f"from a model folder") if others else ""
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}{hint}")
    _check_safetensors(path)
    want = config.get("weights_sha256")
    if want:
        got = file_sha256(path)
        if got != want:
            raise CheckpointError(f"{path} has SHA-256 {got}, but {CONFIG_FILE} records {want}: the weights were "
                                  f"changed or damaged after the export")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({str(e).splitlines()[0][:200]})") from e


def _clip_from_tensors(tensors: dict, config: dict, source: str) -> torch.nn.Module:
    """The frozen CLIP of a ``full`` folder, built from the recorded sizes and loaded key by key."""
    from clip.model import CLIP, CLIPConfig

    sizes = dict(config.get("clip_config") or (config["backbone"].get("config") or {}))
    sizes.pop("vision_positional_std", None)  # an initialisation option of the random CLIP, not a size
    try:
        model = CLIP(CLIPConfig(**sizes)).eval()
    except TypeError as e:
        raise CheckpointError(f"{source}: clip_config does not describe a CLIP ({e})") from e
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: the clip.* tensors do not fit the CLIP of clip_config: "
                              f"{str(e).splitlines()[0][:300]}") from e
    model.source_identity = dict(config["backbone"])
    return model


def read_model_folder(folder: PathLike) -> tuple:
    """(config.json, T2L tensors, CLIP tensors (empty for a ``t2l`` folder)) of a model folder; no pickle is read."""
    folder = Path(folder)
    config = read_folder_config(folder)
    tensors = _read_weights(folder, config)
    clip_sd = {k[len(CLIP_PREFIX):]: v for k, v in tensors.items() if k.startswith(CLIP_PREFIX)}
    t2l_sd = {k: v for k, v in tensors.items() if not k.startswith(CLIP_PREFIX)}
    if config["weights"] == "full" and not clip_sd:
        raise CheckpointError(f"{folder}: {CONFIG_FILE} says the weights are complete, but {WEIGHTS_FILE} holds no "
                              f"clip.* tensors")
    if config["weights"] == "t2l" and clip_sd:
        raise CheckpointError(f"{folder}: {WEIGHTS_FILE} holds clip.* tensors, but {CONFIG_FILE} says T2L tensors only")
    return config, t2l_sd, clip_sd


def load_model_folder(folder: PathLike, clip_model: Optional[torch.nn.Module] = None, **options) -> T2L:
    """The T2L model of a folder written by :func:`export_model_folder`; no pickle is read.

    ``clip_model``: a frozen CLIP to use instead of the folder's (checked against the recorded identity).
    ``options``: T2L options that do not change tensor shapes, as ``load_t2l`` takes them.
    """
    folder = Path(folder)
    source = str(folder)
    config, t2l_sd, clip_sd = read_model_folder(folder)
    backbone = config["backbone"]
    if clip_model is not None:
        check_backbone(backbone, clip_model, source=source)
    elif config["weights"] == "full":
        clip_model = _clip_from_tensors(clip_sd, config, source)
    else:
        clip_model = build_backbone(backbone, source=source)
    model = build_t2l(clip_model, num_frames=int(config["num_frames"]), **{**config["options"], **options})
    load_t2l_tensors(model, t2l_sd, source=f"{source}/{WEIGHTS_FILE}")
    return model


# ---------------------------------------------------------------------------------------------- export
def _contiguous(sd: dict) -> dict:
    # safetensors stores each tensor on its own: no views into shared storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def _card(config: dict, source_name: str, extra: dict) -> str:
    b = config["backbone"]
    if str(b.get("name_or_path", "")).startswith("random"):
        backbone = (f"a RANDOMLY INITIALISED CLIP (seed {b.get('seed', 0)}): a demo or test model, not pretrained "
                    f"weights; its outputs say nothing about real videos")
    else:
        backbone = f"`{b.get('name_or_path')}`" + (f" (SHA-256 `{b['sha256']}`)" if b.get("sha256") else "")
    cc = config.get("clip_config") or {}
    weights = ("T2L tensors only; the frozen CLIP is rebuilt from the backbone record" if config["weights"] == "t2l"
               else "everything: the T2L tensors and the frozen CLIP (`clip.*`)")
    lines = [f"# T2L model `{config.get('name') or source_name}`", "",
             "T2L (Temporal Token Learning) adapts a frozen CLIP to video for zero-shot action recognition: learnable "
             "temporal tokens per frame and block, and adapters in both towers. Exported by "
             "`python -m modules.checkpoint export`.", "",
             "| | |", "| --- | --- |",
             f"| backbone | {backbone} |",
             f"| CLIP sizes | vision {cc.get('vision_layers')} blocks x {cc.get('vision_width')}, patch "
             f"{cc.get('vision_patch_size')}, {cc.get('image_resolution')} px; text {cc.get('transformer_layers')} "
             f"blocks x {cc.get('transformer_width')}; embedding {cc.get('embed_dim')} |",
             f"| frames per clip | {config['num_frames']} |",
             f"| T2L options | {', '.join(f'{k}={v}' for k, v in sorted(config['options'].items()))} |",
             f"| T2L parameters | {config['t2l_parameters']:,}" + (
                 f" ({config['trainable_parameters']:,} trained; the rest is the temporal embedding, kept for the "
                 f"checkpoint layout)" if config['trainable_parameters'] != config['t2l_parameters'] else "") + " |",
             f"| `{WEIGHTS_FILE}` | {weights} (SHA-256 `{config['weights_sha256']}`) |",
             f"| exported from | `{config['source']['file']}`" + (f" (SHA-256 `{config['source']['sha256']}`)"
                                                     if config["source"].get("sha256") else "") + " |"]
    if extra.get("epoch") is not None:
        lines.append(f"| trained for | {int(extra['epoch']) + 1} epoch(s) |")
    for name, best in sorted((extra.get("best") or {}).items()):
        lines.append(f"| best top-1 on {name} | {best.get('top1'):.2f}% (epoch {best.get('epoch')}) |")
    if extra.get("train_list"):
        lines.append(f"| training list | `{extra['train_list']}` |")
    lines += ["", "## Use", "", "From a checkout of the T2L code, at its root:", "", "```bash",
              f"python predict.py video.mp4 --model {source_name} --classes lists/ucf101_descriptions.csv",
              f"python predict.py long.mp4 --model {source_name} --classes CLASSES.csv --window 2s --stride 1s",
              f"python extract_features.py my_videos/ --model {source_name} --out features/mine",
              f"python test.py --config configs/ucf101/UCF_zero_shot_testing.yaml --weights {source_name}",
              "```", "", "```python", "from features import load_model",
              f"m = load_model(\"{source_name}\")   # no pickle is read", "```", "",
              f"Preprocessing at test time: {config['num_frames']} frames (TSN segment middles), short side resized to "
              f"{int((cc.get('image_resolution') or 224) * 256 / 224)}, centre crop {cc.get('image_resolution')}, "
              "CLIP mean/std.", "",
              "## Limits", "",
              "Zero-shot scores depend on the class texts (descriptions or templates) and on how close the videos are "
              "to the training data; see the project's README for the measured numbers and protocols.", ""]
    return "\n".join(lines)


def export_model_folder(src: PathLike, out_dir: PathLike, full: bool = False, trust: bool = False,
                        overwrite: bool = False, name: Optional[str] = None) -> dict:
    """Write the model folder of a checkpoint (ours, a published one, or another model folder); returns config.json.

    ``full``: include the frozen CLIP (needed for published checkpoints, whose CLIP lives in the file). An existing
    non-empty ``out_dir`` is refused unless ``overwrite`` (and then only a model folder is replaced, file by file).
    """
    from utils.io import atomic_write

    from .checkpoint import load_t2l, read_checkpoint, t2l_from_checkpoint

    src, out = Path(src), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} is not empty: choose a new folder, or pass --overwrite to replace the model "
                                  f"folder there")
        if not is_model_folder(out):
            raise CheckpointError(f"{out} is not empty and not a T2L model folder: refusing to write into it")
    extra: dict = {}
    if src.is_file():  # read once: the model and the card's training record come from the same dict
        ckpt = read_checkpoint(src, trust=trust)
        model = t2l_from_checkpoint(ckpt, str(src))
        extra = {"epoch": ckpt.get("epoch"), "best": ckpt.get("best")}
        train_list = ((ckpt.get("config") or {}).get("data") or {}).get("train_list")
        if train_list:
            extra["train_list"] = Path(str(train_list)).name
    else:
        model = load_t2l(src, trust=trust)
    identity = dict(getattr(model.clip, "source_identity", None) or {})
    backbone = {k: v for k, v in identity.items() if k in ("name_or_path", "sha256", "seed", "config")}
    if identity.get("kind") == "published-t2l" or not backbone.get("name_or_path"):
        if not full:
            raise CheckpointError(f"{src}: its frozen CLIP is stored in the checkpoint itself (a published checkpoint) "
                                  f"or is not named, so a T2L-only folder could not rebuild it: export with --full")
        backbone = {"name_or_path": f"the CLIP inside {src.name}"}  # a record only: the weights are in the folder
    backbone.setdefault("config", model.clip.config.to_dict())
    tensors = _contiguous(model.trainable_state_dict())
    if full:
        tensors.update({CLIP_PREFIX + k: v for k, v in _contiguous(model.clip.state_dict()).items()})
    from safetensors.torch import save

    blob = save(tensors, metadata={"format": MODEL_FORMAT, "weights": "full" if full else "t2l"})
    config = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "name": name or out.name,
              "weights": "full" if full else "t2l", "weights_file": WEIGHTS_FILE,
              "weights_sha256": hashlib.sha256(blob).hexdigest(), "num_frames": model.num_frames,
              "options": model.options.to_dict(), "backbone": backbone, "clip_config": model.clip.config.to_dict(),
              "embed_dim": int(model.clip.visual.output_dim),
              "input_resolution": int(model.clip.visual.input_resolution),
              "t2l_parameters": int(sum(v.numel() for v in model.trainable_state_dict().values())),
              "trainable_parameters": int(sum(p.numel() for n, p in model.named_parameters()
                                              if not n.startswith(CLIP_PREFIX) and p.requires_grad)),
              "source": {"file": src.name, "sha256": file_sha256(src) if src.is_file() else None,
                         "epoch": extra.get("epoch")}}
    out.mkdir(parents=True, exist_ok=True)
    files = {WEIGHTS_FILE: blob, CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
             CARD_FILE: _card(config, out.name, extra).encode("utf-8")}
    umask = os.umask(0)
    os.umask(umask)
    for file_name, data in files.items():  # the weights first: a folder whose config is there has its weights
        atomic_write(out / file_name, lambda f: f.write(data))
        os.chmod(out / file_name, 0o666 & ~umask)  # a folder to share: readable as any new file is, not 0600
    logger.info("wrote model folder %s: %s (%d tensors, %.1f MB), %s, %s", out, WEIGHTS_FILE, len(tensors),
                len(blob) / 1e6, CONFIG_FILE, CARD_FILE)
    return config

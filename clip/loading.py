"""Read CLIP weights in any supported format and bring them to OpenAI's layout, then build the model.

The chain, each step small and pure:

1. read: an OpenAI TorchScript archive (its tensors only, never its code: ``clip.torchscript``), a plain state
   dict (``torch.load(weights_only=True)``), safetensors, or a Hugging Face CLIP folder;
2. clean: unwrap ``state_dict`` / ``model`` nesting, strip ``module.`` and ``_orig_mod.``, keep tensors;
3. convert by sentinel keys: Hugging Face names (``vision_model.*``, split q/k/v) are mapped key by key;
   OpenAI and open_clip already share our names; ResNet towers and unknown layouts are refused;
4. drop what is not a weight (OpenAI's ``attn_mask`` buffers and ``input_resolution``-style scalars);
5. check every key and shape against the model the weights describe, then load them.

Every failure is a ``CLIPLoadError`` that names the file and what was expected.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from .errors import CLIPLoadError, short_reason
from .model import CLIP, CLIPConfig, build_model
from utils.checkpoint import UnsafeCheckpointError, safe_load

from .pretrained import available_models, download, file_sha256, get_spec
from .torchscript import is_torchscript_archive, read_torchscript_state_dict

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Keys every OpenAI-layout ViT CLIP has; their presence is how the layout is recognised.
_SENTINELS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
              "token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
# Tensors in OpenAI files that are not weights of the model.
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
# Wrappers a training script may put around the weights, searched in this order.
_NESTING_KEYS = ("state_dict", "model", "module", "model_state_dict")
# What DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") put in front of parameter names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class CLIPWeights:
    """Weights in OpenAI's layout plus what the file says about the model beyond the tensors."""

    state_dict: Dict[str, torch.Tensor]
    source_format: str  # "torchscript", "state_dict", "safetensors" or "huggingface"
    vision_heads: Optional[int] = None  # only Hugging Face configs store head counts
    text_heads: Optional[int] = None
    files: List[Path] = field(default_factory=list)  # the weight files read, for the checksum


# --------------------------------------------------------------------------------------------------- reading


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CLIPLoadError(f"cannot read the safetensors file {path} ({short_reason(err)}); the file may be truncated "
                            f"or not a safetensors file.") from err


def _read_torch(path: Path):
    """A plain state dict through the project's one torch file reader (``utils.checkpoint.safe_load``), its errors
    as ``CLIPLoadError``; a file that needs full unpickling is never trusted here."""
    try:
        return safe_load(path)
    except UnsafeCheckpointError as err:
        raise CLIPLoadError(
            f"refusing to unpickle {path}: it holds objects other than tensors and plain containers "
            f"({short_reason(err.__cause__ or err)}). Expected a state dict of tensors (weights_only loading); re-save "
            f"it with torch.save(model.state_dict(), path) or as safetensors.") from err
    except ValueError as err:
        raise CLIPLoadError(f"{err}. Expected a state dict saved by torch.save, a TorchScript archive, or a "
                            f".safetensors file.") from err


def _read_file(path: Path) -> Tuple[object, str]:
    """One weight file -> (its raw contents, format name)."""
    if path.stat().st_size == 0:
        raise CLIPLoadError(f"{path} is empty (0 bytes); expected CLIP weights. The download or copy may have "
                            f"failed.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), "safetensors"
    if is_torchscript_archive(path):
        return read_torchscript_state_dict(path), "torchscript"
    return _read_torch(path), "state_dict"


def strip_prefixes(state_dict: dict) -> dict:
    """The state dict with every ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefix dropped,
    however they are stacked; the one prefix stripper (CLIP weights here, published T2L checkpoints in modules/)."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped and isinstance(key, str):
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def clean_state_dict(obj, path: PathLike = "<state dict>") -> Dict[str, torch.Tensor]:
    """Unwrap training-checkpoint nesting, strip ``module.``/``_orig_mod.`` prefixes, keep only tensors."""
    for _ in range(3):  # at most a few levels: {"state_dict": {"module": {...}}}
        if not isinstance(obj, dict):
            break
        has_tensors = any(isinstance(v, torch.Tensor) for v in obj.values())
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if has_tensors or inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CLIPLoadError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors (a state dict).")
    out = strip_prefixes({str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    if not out:
        raise CLIPLoadError(f"{path} holds no tensors (top-level keys: {_preview(obj)}); expected CLIP weights.")
    return out


# ------------------------------------------------------------------------------------- Hugging Face layout

_HF_LAYER = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: the Hugging Face name has the typo
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# nn.Linear stores (out, in); OpenAI's projections are matrices applied as x @ P, i.e. (in, out).
_HF_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_HF_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def is_hf_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for Hugging Face ``CLIPModel`` key names."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in state_dict)


def convert_hf_state_dict(state_dict: Dict[str, torch.Tensor], path: PathLike = "<state dict>"
                          ) -> Dict[str, torch.Tensor]:
    """Hugging Face ``CLIPModel`` weights -> OpenAI layout; q/k/v projections are concatenated into in_proj.

    Raises ``CLIPLoadError`` listing any key it does not know, rather than dropping it.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _HF_IGNORED:
            continue
        if key in _HF_NAMES:
            out[_HF_NAMES[key]] = value
            continue
        if key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            unknown.append(key)
            continue
        tower, layer, module, param = match.groups()
        prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((prefix, param), {})[module[-6]] = value  # "q", "k" or "v"
        elif module in _HF_BLOCK_NAMES:
            out[f"{prefix}{_HF_BLOCK_NAMES[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CLIPLoadError(f"{path}: {len(unknown)} Hugging Face keys have no counterpart in OpenAI's CLIP "
                            f"(e.g. {', '.join(unknown[:5])}); expected a plain CLIPModel (ViT towers, no extra "
                            f"heads).")
    for (prefix, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CLIPLoadError(f"{path}: the attention of {prefix.rstrip('.')} has {sorted(parts)} projections "
                                f"({param}), expected q, k and v.")
        # OpenAI's fused in_proj stacks q, k, v along the output dimension.
        out[f"{prefix}attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CLIPLoadError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}); expected a Hugging Face "
                            f"config.") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CLIPLoadError(f"cannot read {path} ({err}).") from err
    if not isinstance(data, dict):
        raise CLIPLoadError(f"{path} holds a JSON {type(data).__name__}, expected an object.")
    return data


def _hf_heads(config_path: Path) -> Tuple[Optional[int], Optional[int]]:
    """(vision_heads, text_heads) from a Hugging Face CLIP config.json, after checking it is a CLIP we can run."""
    config = _read_json(config_path)
    model_type = config.get("model_type", "clip")
    if model_type != "clip":
        raise CLIPLoadError(f"{config_path} describes a {model_type!r} model; expected a CLIP model "
                            f"(model_type 'clip').")
    heads = []
    for tower in ("vision_config", "text_config"):
        sub = config.get(tower) or {}
        if not isinstance(sub, dict):
            raise CLIPLoadError(f"{config_path}: '{tower}' is a {type(sub).__name__}, expected an object.")
        # Defaults are Hugging Face's, which are OpenAI's.
        act = sub.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise CLIPLoadError(f"{config_path}: {tower}.hidden_act is {act!r}; this CLIP implements OpenAI's "
                                f"'quick_gelu' only, so these weights would give wrong features.")
        eps = sub.get("layer_norm_eps", 1e-5)
        if abs(float(eps) - 1e-5) > 1e-12:
            raise CLIPLoadError(f"{config_path}: {tower}.layer_norm_eps is {eps}; this CLIP uses 1e-5.")
        n = sub.get("num_attention_heads")
        heads.append(int(n) if n is not None else None)
    return heads[0], heads[1]


def _hf_weight_files(folder: Path) -> List[Path]:
    for name in _HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in _HF_INDEX_FILES:
        index = folder / name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CLIPLoadError(f"{index} has no 'weight_map' object naming the shard of every weight.")
            shards = sorted({str(v) for v in weight_map.values()})
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CLIPLoadError(f"{index} names shards that are missing from {folder}: {', '.join(missing)}.")
            return [folder / s for s in shards]
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise CLIPLoadError(f"the Hugging Face folder {folder} has no weights: expected {' or '.join(_HF_WEIGHT_FILES)} "
                        f"(or a sharded index {_HF_INDEX_FILES[0]}) next to config.json; it holds: "
                        f"{', '.join(present) or 'nothing'}.")


def _read_hf_folder(folder: Path) -> CLIPWeights:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CLIPLoadError(f"{folder} is a folder but has no config.json; expected a Hugging Face CLIP folder "
                            f"(config.json + {' or '.join(_HF_WEIGHT_FILES)}) or the path of a weight file.")
    vision_heads, text_heads = _hf_heads(config_path)
    files = _hf_weight_files(folder)
    raw: Dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(clean_state_dict(_read_file(f)[0], f))
    if not is_hf_layout(raw):
        raise CLIPLoadError(f"{files[0]} in the Hugging Face folder {folder} has no vision_model.*/text_model.* "
                            f"keys (found e.g. {_preview(raw)}); expected the weights of a CLIPModel.")
    sd = convert_hf_state_dict(raw, files[0] if len(files) == 1 else folder)
    return CLIPWeights(sd, "huggingface", vision_heads, text_heads, files)


# ------------------------------------------------------------------------------------------- all formats


def _preview(keys, n: int = 5) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} keys)" if len(keys) > n else "")


def _to_openai_layout(sd: Dict[str, torch.Tensor], path: Path, fmt: str) -> CLIPWeights:
    """Recognise the layout by its sentinel keys and convert it; refuse what is not a ViT CLIP."""
    if is_hf_layout(sd):
        config_path = path.parent / "config.json"
        vision_heads, text_heads = _hf_heads(config_path) if config_path.is_file() else (None, None)
        return CLIPWeights(convert_hf_state_dict(sd, path), "huggingface", vision_heads, text_heads, [path])
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise CLIPLoadError(f"{path} holds a ResNet CLIP (visual.layer1.*/visual.attnpool.* keys); only the "
                            f"ViT CLIPs ({', '.join(available_models())}) are supported.")
    if any(k.startswith("visual.trunk.") for k in sd):
        raise CLIPLoadError(f"{path} holds an open_clip model with a timm image tower (visual.trunk.*); only "
                            f"OpenAI-style ViT CLIPs are supported.")
    missing = [k for k in _SENTINELS if k not in sd]
    if missing:
        raise CLIPLoadError(
            f"{path} does not hold a ViT CLIP in a known layout: it lacks {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''} (its keys: {_preview(sd)}). Expected OpenAI/open_clip names "
            f"(visual.conv1.weight, transformer.resblocks.0.attn.in_proj_weight, ...) or Hugging Face CLIPModel "
            f"names (vision_model.*, text_model.*).")
    sd = {k: v for k, v in sd.items() if k not in _NON_WEIGHTS and k.rsplit(".", 1)[-1] != "attn_mask"}
    return CLIPWeights(sd, fmt, files=[path])


def read_weights(path: PathLike) -> CLIPWeights:
    """Read CLIP weights from a file or Hugging Face folder into OpenAI's layout, with any head counts stored.

    Supported: OpenAI TorchScript archives (read without running their code), state dicts (``.pt``, ``.pth``,
    ``.bin``; OpenAI/open_clip names, possibly nested under ``state_dict``/``model`` and prefixed ``module.``),
    ``.safetensors``, and Hugging Face CLIP folders or files. Raises ``CLIPLoadError`` otherwise.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CLIPLoadError(f"CLIP weights not found: {path} does not exist. Expected a weight file, a Hugging "
                            f"Face CLIP folder, or one of the names {', '.join(available_models())}.")
    if path.is_dir():
        return _read_hf_folder(path)
    raw, fmt = _read_file(path)
    return _to_openai_layout(clean_state_dict(raw, path), path, fmt)


def load_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The weights of any supported file or folder as an OpenAI-layout state dict (see ``read_weights``)."""
    return read_weights(path).state_dict


# ------------------------------------------------------------------------------------------------ building


def build_from_weights(weights: CLIPWeights, source: PathLike, vision_heads: Optional[int] = None,
                       text_heads: Optional[int] = None) -> CLIP:
    """Build the model the weights describe and load them, after checking every key and shape.

    Head counts: the arguments, else those stored with the weights (Hugging Face config), else width // 64.
    """
    sd = weights.state_dict
    vision_heads = vision_heads or weights.vision_heads
    text_heads = text_heads or weights.text_heads
    try:
        config = CLIPConfig.from_state_dict(sd, vision_heads=vision_heads, text_heads=text_heads)
    except (KeyError, IndexError) as err:
        raise CLIPLoadError(f"{source}: cannot read the model sizes off the weights (missing or malformed "
                            f"{err}); expected a complete ViT CLIP state dict.") from err
    tokens = sd["visual.positional_embedding"].shape[0] - 1
    if round(tokens ** 0.5) ** 2 != tokens:
        raise CLIPLoadError(f"{source}: visual.positional_embedding has {tokens} patch positions, which is not a "
                            f"square grid; expected (grid**2 + 1, width).")
    try:
        with torch.device("meta"):
            reference = CLIP(config)
    except ValueError as err:  # e.g. a width not divisible by the head count
        raise CLIPLoadError(f"{source}: the weights describe a model that cannot be built ({err}).") from err
    expected = reference.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing {_preview(missing, 4)}" if missing else "",
                 f"unexpected {_preview(unexpected, 4)}" if unexpected else "",
                 f"wrong shapes: {'; '.join(wrong[:3])}" if wrong else ""]
        raise CLIPLoadError(f"{source}: the weights do not fit the ViT CLIP they describe ({config.vision_layers} "
                            f"vision / {config.transformer_layers} text layers): "
                            f"{'; '.join(p for p in parts if p)}. Expected a plain OpenAI-style CLIP (no layer "
                            f"scale, no extra heads).")
    return build_model(sd, vision_heads=config.vision_heads, text_heads=config.transformer_heads)


def _source_sha256(weights: CLIPWeights) -> str:
    if len(weights.files) == 1:
        return file_sha256(weights.files[0])
    # Sharded weights: hash of the shards' hashes, in file-name order.
    return hashlib.sha256("".join(file_sha256(f) for f in weights.files).encode()).hexdigest()


def load(name_or_path: PathLike, device: Union[str, torch.device] = "cpu",
         download_root: Optional[PathLike] = None, jit: bool = False, *,
         vision_heads: Optional[int] = None, text_heads: Optional[int] = None) -> CLIP:
    """A CLIP model (fp32, eval mode, on ``device``) from a released name or a weight file/folder.

    ``name_or_path``: one of ``available_models()`` (downloaded once into ``download_root``, ``$T2L_CLIP_CACHE``
    or ``~/.cache/clip``, and checked against the SHA-256 in its address), or any format ``read_weights``
    accepts. The model gets ``source_identity = {"name_or_path": ..., "sha256": ...}`` so checkpoints can
    record which backbone they were trained on. ``jit=True`` is refused: TorchScript code is never run.

    Example::

        model = clip.load("ViT-B/16")
        model = clip.load("weights/openclip_vitb16.pt", device="cuda")
    """
    if jit:
        raise ValueError("clip.load(jit=True) is not supported: archives are read for their tensors only, "
                         "their TorchScript code is never run; use jit=False")
    if isinstance(name_or_path, str) and name_or_path in available_models():
        path = download(name_or_path, download_root)
        sha256 = get_spec(name_or_path).sha256  # verified by download()
        weights = read_weights(path)
    else:
        path = Path(name_or_path).expanduser()
        if isinstance(name_or_path, str) and not path.exists() and re.fullmatch(r"(ViT|RN)[-\w/@]*", name_or_path):
            raise CLIPLoadError(f"unknown CLIP model name {name_or_path!r} (and no such file); known names: "
                                f"{', '.join(available_models())}.")
        weights = read_weights(path)
        sha256 = _source_sha256(weights)
    model = build_from_weights(weights, path, vision_heads=vision_heads, text_heads=text_heads)
    model.source_identity = {"name_or_path": str(name_or_path), "sha256": sha256}
    logger.info("loaded CLIP %s (%s, %s) with %d parameters", name_or_path, weights.source_format,
                sha256[:12], sum(p.numel() for p in model.parameters()))
    return model.to(device)

"""A faithful CLIP (ViT towers) for T2L: model, BPE tokenizer, and weight loading from every common format.

    import clip
    model = clip.load("ViT-B/16")                 # or a path: TorchScript .pt, state dict, safetensors, HF folder
    tokens = clip.tokenize(["a photo of a dog"])  # (1, 77) int64
    text = model.encode_text(tokens)              # (1, 512)

Importing this package reads no file and touches no network.
"""
from .errors import CLIPLoadError
from .loading import CLIPWeights, build_from_weights, clean_state_dict, convert_hf_state_dict, load, \
    load_state_dict, read_weights, strip_prefixes
from .model import CLIP, CLIPConfig, build_model
from .pretrained import available_models, cache_dir, download, file_sha256, model_config
from .tokenizer import SimpleTokenizer, get_tokenizer, tokenize

# The normalisation the OpenAI weights were trained with (RGB, on images scaled to [0, 1]).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "CLIP", "CLIPConfig", "CLIPLoadError", "CLIPWeights", "IMAGE_MEAN", "IMAGE_STD", "SimpleTokenizer",
    "available_models", "build_from_weights", "build_model", "cache_dir", "clean_state_dict",
    "convert_hf_state_dict", "download", "file_sha256", "get_tokenizer", "load", "load_state_dict",
    "model_config", "read_weights", "strip_prefixes", "tokenize",
]

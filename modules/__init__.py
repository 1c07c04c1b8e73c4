"""T2L: Temporal Token Learning and adapters on a frozen CLIP, its losses, class texts, checkpoints and the model
factory (``modules.factory``: every script builds or loads its model there)."""
from .backbone import random_clip
from .checkpoint import CheckpointError, load_t2l, make_checkpoint, ours_to_published, published_to_ours, save_published
from .losses import T2LLoss, alignment_loss, tfd_loss
from .t2l import T2L, T2LOptions, build_t2l, convert_to_fp16_like_published
from .text import TEMPLATES, class_texts, read_descriptions, tokenize_class_texts

__all__ = [
    "T2L", "T2LOptions", "build_t2l", "convert_to_fp16_like_published", "load_t2l", "make_checkpoint", "save_published", "ours_to_published",
    "published_to_ours", "random_clip", "CheckpointError", "alignment_loss", "tfd_loss", "T2LLoss", "TEMPLATES",
    "class_texts", "read_descriptions", "tokenize_class_texts",
]

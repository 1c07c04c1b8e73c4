"""Class texts -> token ids: one description per class (default) or a set of prompt templates.

The texts of a class set are tokenised once; training picks each sample's text by label, testing encodes all
of them once per evaluation.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)

# 16 prompt templates for action names (METHOD.md "Class texts"); "{}" is the class name.
TEMPLATES = (
    "a photo of action {}.",
    "a picture of action {}.",
    "human action of {}.",
    "{}, an action.",
    "{}, this is an action.",
    "{}, a video of action.",
    "playing action of {}.",
    "{}",
    "playing a kind of action, {}.",
    "doing a kind of action, {}.",
    "look, the human is {}.",
    "can you recognize the action of {}?",
    "video classification of {}.",
    "a video of {}.",
    "The man is {}.",
    "The woman is {}.",
)


def readable_name(name: str) -> str:
    """Class names as words: HMDB's ``brush_hair`` -> ``brush hair``; other names are kept as they are."""
    return name.replace("_", " ").strip()


def read_descriptions(path: str | Path) -> dict[str, str]:
    """Read a descriptions CSV (header ``SNo,Class Name,<description column>``) -> {class name: description}.

    Errors name the file and the line: a missing column, an empty description, a class described twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class descriptions file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or len(header) < 3 or header[1].strip() != "Class Name":
            raise ValueError(f"{path}:1: expected the header 'SNo,Class Name,<description>', got {header}")
        out: dict[str, str] = {}
        for line_no, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{line_no}: expected 3 columns (SNo, Class Name, description), got {row}")
            name, text = row[1].strip(), row[2].strip()
            if not text:
                raise ValueError(f"{path}:{line_no}: empty description for class {name!r}")
            if name in out:
                raise ValueError(f"{path}:{line_no}: class {name!r} is described twice")
            out[name] = text
    return out


def class_texts(class_names: Sequence[str], descriptions: Optional[dict[str, str]] = None,
                mode: str = "descriptions", source: str = "descriptions") -> list[list[str]]:
    """The texts of each class: ``texts[v][k]`` is view v of class k.

    mode "descriptions": one view, the class's description; a class without one falls back to the first
    template (a single view holds one text per class) and a warning names it.
    mode "templates": 16 views, one per template; training picks one view per sample, testing averages the
    class probabilities over the views.
    """
    names = list(class_names)
    if mode == "templates":
        return [[template.format(readable_name(n)) for n in names] for template in TEMPLATES]
    if mode != "descriptions":
        raise ValueError(f"class text mode must be 'descriptions' or 'templates', got {mode!r}")
    descriptions = descriptions or {}
    missing = [n for n in names if n not in descriptions]
    if missing and len(missing) == len(names) and descriptions:
        raise ValueError(f"{source}: none of the {len(names)} classes has a description; the file's names "
                         f"(e.g. {sorted(descriptions)[:3]}) do not match the class list's (e.g. {names[:3]})")
    if missing:
        logger.warning("%s: %d class(es) have no description and use the template %r instead: %s", source,
                       len(missing), TEMPLATES[0], ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    unused = sorted(set(descriptions) - set(names))
    if unused:
        logger.warning("%s: %d description(s) match no class in the class list: %s", source, len(unused),
                       ", ".join(unused[:20]) + (" ..." if len(unused) > 20 else ""))
    return [[descriptions.get(n) or TEMPLATES[0].format(readable_name(n)) for n in names]]


# Sources whose over-long texts were already reported: a training run tokenises its evaluation sets every epoch.
_TRUNCATION_WARNED: set = set()


def tokenize_class_texts(texts: list[list[str]], context_length: int = 77, names: Optional[Sequence[str]] = None,
                         source: Optional[str] = None) -> torch.Tensor:
    """texts[v][k] -> token ids (V, K, context_length); texts longer than the context are truncated.

    Truncation is warned once per ``source`` (the descriptions file), naming the classes (``names[k]``) whose text
    was cut and how long it was.
    """
    import clip  # imported here so that modules/ imports without the tokenizer's vocabulary being read

    V, K = len(texts), len(texts[0])
    flat = [t for view in texts for t in view]
    tokens = clip.tokenize(flat, context_length=context_length, truncate=True)
    key = source or "texts"
    if key not in _TRUNCATION_WARNED:
        # Only a text that filled the whole context can have been cut; count those exactly.
        tok = clip.get_tokenizer()
        cut = [(i, n) for i in torch.nonzero(tokens[:, -1]).flatten().tolist()
               if (n := len(tok.encode(flat[i])) + 2) > context_length]
        if cut:
            _TRUNCATION_WARNED.add(key)
            what = [f"{names[i % K] if names is not None else repr(flat[i][:40])} ({n} tokens)" for i, n in cut]
            logger.warning("%s: %d text(s) are longer than CLIP's %d tokens and are cut to fit: %s", key, len(cut),
                           context_length, ", ".join(what[:20]) + (" ..." if len(what) > 20 else ""))
    return tokens.view(V, K, context_length)

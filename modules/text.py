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

# The 16 prompt templates of the published T2L code, word for word (METHOD.md "Class texts"); "{}" is the class
# name with underscores read as spaces. They end without a period. Capitals do not matter: the tokenizer lowercases.
TEMPLATES = (
    "a photo of action {}",
    "a picture of action {}",
    "Human action of {}",
    "{}, an action",
    "{} this is an action",
    "{}, a video of action",
    "Playing action of {}",
    "{}",
    "Playing a kind of action, {}",
    "Doing a kind of action, {}",
    "Look, the human is {}",
    "Can you recognize the action of {}?",
    "Video classification of {}",
    "A video of {}",
    "The man is {}",
    "The woman is {}",
)

# The description column of the published description CSVs (``SNo,Class Name,GPT3 discription``). The published
# code reads that column with its line breaks removed (not replaced by spaces), so "...remove.\n\n2." becomes
# "...remove.2."; files with this header are read the same way, so that their tokens are the published ones.
PUBLISHED_DESCRIPTION_COLUMN = "GPT3 discription"


def readable_name(name: str) -> str:
    """Class names as words: HMDB's ``brush_hair`` -> ``brush hair``; other names are kept as they are."""
    return name.replace("_", " ").strip()


def name_key(name: str) -> str:
    """What two spellings of one class name share: ``brush_hair``, ``Brush Hair`` and ``brush  hair`` match."""
    return " ".join(name.replace("_", " ").lower().split())


def read_descriptions(path: str | Path) -> dict[str, str]:
    """Read a descriptions CSV (header ``SNo,Class Name,<description column>``) -> {class name: description}.

    Errors name the file and the line: a missing column, an empty description, a class described twice (also
    under another spelling, ``brush_hair`` / ``brush hair``). In a published description CSV (third column
    ``GPT3 discription``) line breaks are removed as the published code removes them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class descriptions file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or len(header) < 3 or header[1].strip() != "Class Name":
            raise ValueError(f"{path}:1: expected the header 'SNo,Class Name,<description>', got {header}")
        published = header[2].strip() == PUBLISHED_DESCRIPTION_COLUMN
        out: dict[str, str] = {}
        keys: dict[str, tuple[str, int]] = {}
        for row in reader:
            line_no = reader.line_num  # the line a (possibly multi-line, quoted) row ends on
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{line_no}: expected 3 columns (SNo, Class Name, description), got {row}")
            name = row[1].strip()
            text = (row[2].replace("\n", "") if published else row[2]).strip()
            if not text:
                raise ValueError(f"{path}:{line_no}: empty description for class {name!r}")
            if name_key(name) in keys:
                other, other_line = keys[name_key(name)]
                raise ValueError(f"{path}:{line_no}: class {name!r} is described twice (line {other_line}: "
                                 f"{other!r})")
            keys[name_key(name)] = (name, line_no)
            out[name] = text
    return out


def class_texts(class_names: Sequence[str], descriptions: Optional[dict[str, str]] = None,
                mode: str = "descriptions", source: str = "descriptions",
                missing: str = "error") -> list[list[str]]:
    """The texts of each class: ``texts[v][k]`` is view v of class k.

    mode "descriptions": one view, the class's description. Class names are matched to the descriptions' names
    ignoring case and ``_`` versus spaces (``brush_hair`` finds ``brush hair``). A class without a description is
    an error naming it (``missing="error"``, the default: the published code never mixes descriptions and
    templates); with ``missing="template"`` it gets the first template instead and a warning names it.
    mode "templates": 16 views, one per template; training picks one view per sample, testing averages the
    class probabilities over the views.
    """
    names = list(class_names)
    if mode == "templates":
        return [[template.format(readable_name(n)) for n in names] for template in TEMPLATES]
    if mode != "descriptions":
        raise ValueError(f"class text mode must be 'descriptions' or 'templates', got {mode!r}")
    if missing not in ("error", "template"):
        raise ValueError(f"missing must be 'error' or 'template', got {missing!r}")
    by_key = {name_key(n): text for n, text in (descriptions or {}).items()}
    missing_names = [n for n in names if name_key(n) not in by_key]
    if missing_names and len(missing_names) == len(names) and by_key:
        raise ValueError(f"{source}: none of the {len(names)} classes has a description; the file's names "
                         f"(e.g. {sorted(descriptions)[:3]}) do not match the class list's (e.g. {names[:3]})")
    listed = ", ".join(missing_names[:20]) + (" ..." if len(missing_names) > 20 else "")
    if missing_names and missing == "error":
        raise ValueError(f"{source}: {len(missing_names)} of {len(names)} classes have no description: {listed}. "
                         f"Add them, or set data.missing_descriptions: template to use the template "
                         f"{TEMPLATES[0]!r} for them (the published code never mixes the two)")
    if missing_names:
        logger.warning("%s: %d class(es) have no description and use the template %r instead: %s", source,
                       len(missing_names), TEMPLATES[0], listed)
    unused = sorted(set(by_key) - {name_key(n) for n in names})
    if unused:
        logger.warning("%s: %d description(s) match no class in the class list: %s", source, len(unused),
                       ", ".join(unused[:20]) + (" ..." if len(unused) > 20 else ""))
    return [[by_key.get(name_key(n)) or TEMPLATES[0].format(readable_name(n)) for n in names]]


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

"""Checks of the class lists and class descriptions under ``lists/``.

Every dataset key has ``lists/<key>_classes.csv`` (``id,name``) and
``lists/<key>_descriptions.csv`` (``SNo,Class Name,Description``). The tests make sure
that the two files agree, that every description is real text, and that CLIP's
77-token context holds each description without truncation (a truncated prompt
silently changes the text embedding a class is matched against).

Run ``python tests/test_class_files.py`` to print per-dataset counts and token lengths.
"""

import csv
import re
from pathlib import Path

import pytest

LISTS_DIR = Path(__file__).resolve().parent.parent / "lists"

# Dataset key -> number of classes.
EXPECTED_COUNTS = {
    "ucf101": 101,
    "hmdb51": 51,
    "kinetics_400": 400,
    "kinetics_600": 600,
    "ssv2": 174,
}
DATASETS = list(EXPECTED_COUNTS)

CONTEXT_LENGTH = 77
SOT_ID = 49406
EOT_ID = 49407
# Long enough that no plausible description is cut, so the true token count can be read off.
PROBE_CONTEXT_LENGTH = 256
# A real description of an action needs more than a handful of words.
MIN_WORDS = 5


def _read_csv(path, header):
    """Return the data rows of ``path`` as lists of strings, after checking its header.

    Raises ``AssertionError`` naming the file (and line) when the file is missing, the header
    differs from ``header`` or a row has the wrong number of fields.
    """
    assert path.is_file(), f"{path}: file is missing"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows, f"{path}: file is empty, expected header {','.join(header)}"
    assert rows[0] == header, f"{path}:1: header is {rows[0]}, expected {header}"
    for line, row in enumerate(rows[1:], start=2):
        assert len(row) == len(header), (
            f"{path}:{line}: {len(row)} fields, expected {len(header)} ({','.join(header)})"
        )
    return rows[1:]


def read_class_list(key):
    """Return the class names of ``lists/<key>_classes.csv`` in id order, checking ids are 0..K-1."""
    path = LISTS_DIR / f"{key}_classes.csv"
    rows = _read_csv(path, ["id", "name"])
    names = []
    for line, (class_id, name) in enumerate(rows, start=2):
        assert class_id == str(len(names)), f"{path}:{line}: id {class_id!r}, expected {len(names)}"
        assert name.strip() == name and name, f"{path}:{line}: empty or padded name {name!r}"
        names.append(name)
    return names


def read_descriptions(key):
    """Return ``[(sno, class_name, description), ...]`` from ``lists/<key>_descriptions.csv``."""
    path = LISTS_DIR / f"{key}_descriptions.csv"
    return [tuple(row) for row in _read_csv(path, ["SNo", "Class Name", "Description"])]


def _normalise(text):
    """Lower-case words of ``text`` with CamelCase, underscores and punctuation split away."""
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)  # ApplyEyeMakeup -> Apply Eye Makeup
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def token_counts(texts):
    """Return the CLIP token count of each text, SOT and EOT included, without truncation.

    Uses the project's own ``clip.tokenize``. Tokenising into a context much longer than 77
    keeps long texts whole, so the count (position of EOT + 1) is the true length.
    """
    from clip import tokenize

    ids = tokenize(texts, context_length=PROBE_CONTEXT_LENGTH, truncate=False)  # (N, 256)
    counts = []
    for text, row in zip(texts, ids.tolist()):
        assert row[0] == SOT_ID, f"encoding of {text!r} does not start with SOT"
        assert EOT_ID in row, f"encoding of {text!r} has no EOT"
        counts.append(row.index(EOT_ID) + 1)
    return counts


@pytest.mark.parametrize("key", DATASETS)
def test_class_list(key):
    names = read_class_list(key)
    assert len(names) == EXPECTED_COUNTS[key], f"{key}: {len(names)} classes, expected {EXPECTED_COUNTS[key]}"
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"{key}: duplicate class names {duplicates}"


@pytest.mark.parametrize("key", DATASETS)
def test_descriptions_match_class_list(key):
    names = read_class_list(key)
    rows = read_descriptions(key)
    path = LISTS_DIR / f"{key}_descriptions.csv"
    assert [r[1] for r in rows] == names, (
        f"{path}: 'Class Name' column differs from {key}_classes.csv "
        f"(missing {sorted(set(names) - {r[1] for r in rows})[:5]}, "
        f"extra {sorted({r[1] for r in rows} - set(names))[:5]}, or out of order)"
    )
    for line, (sno, _, _) in enumerate(rows, start=2):
        assert sno == str(line - 2), f"{path}:{line}: SNo {sno!r}, expected {line - 2}"


@pytest.mark.parametrize("key", DATASETS)
def test_descriptions_are_real_text(key):
    path = LISTS_DIR / f"{key}_descriptions.csv"
    seen = {}
    for line, (_, name, desc) in enumerate(read_descriptions(key), start=2):
        assert desc.strip(), f"{path}:{line}: empty description for {name!r}"
        norm = _normalise(desc)
        assert norm != _normalise(name), f"{path}:{line}: description of {name!r} only repeats the name"
        assert len(norm.split()) >= MIN_WORDS, (
            f"{path}:{line}: description of {name!r} has fewer than {MIN_WORDS} words: {desc!r}"
        )
        assert norm not in seen, f"{path}:{line}: description of {name!r} duplicates line {seen[norm]}"
        seen[norm] = line


@pytest.mark.parametrize("key", DATASETS)
def test_descriptions_fit_clip_context(key):
    from clip import tokenize

    path = LISTS_DIR / f"{key}_descriptions.csv"
    rows = read_descriptions(key)
    texts = [r[2] for r in rows]
    counts = token_counts(texts)
    too_long = [(line, name, n) for line, ((_, name, _), n) in enumerate(zip(rows, counts), start=2)
                if n > CONTEXT_LENGTH]
    assert not too_long, f"{path}: descriptions over {CONTEXT_LENGTH} tokens (line, class, tokens): {too_long[:10]}"
    # The call the model makes must accept every text as is and end each one in EOT.
    ids = tokenize(texts, context_length=CONTEXT_LENGTH, truncate=False)  # (N, 77)
    assert ids.shape == (len(texts), CONTEXT_LENGTH)
    for text, row, n in zip(texts, ids.tolist(), counts):
        assert row[n - 1] == EOT_ID and all(t == 0 for t in row[n:]), f"bad encoding of {text!r}"


def test_kinetics_600_new_220():
    new = read_class_list("kinetics_600_new_220")
    k400 = set(read_class_list("kinetics_400"))
    k600 = read_class_list("kinetics_600")
    assert len(new) == 220, f"kinetics_600_new_220: {len(new)} classes, expected 220"
    assert len(set(new)) == 220, "kinetics_600_new_220: duplicate class names"
    missing = [n for n in new if n not in k600]
    assert not missing, f"kinetics_600_new_220: classes not in Kinetics-600: {missing[:10]}"
    old = [n for n in new if n in k400]
    assert not old, f"kinetics_600_new_220: classes already in Kinetics-400: {old[:10]}"
    positions = [k600.index(n) for n in new]
    assert positions == sorted(positions), "kinetics_600_new_220: not in Kinetics-600 order"


def description_stats():
    """Return ``{key: (num_descriptions, mean_tokens, max_tokens)}``; ``None`` where the file is missing."""
    stats = {}
    for key in DATASETS:
        if not (LISTS_DIR / f"{key}_descriptions.csv").is_file():
            stats[key] = None
            continue
        counts = token_counts([r[2] for r in read_descriptions(key)])
        stats[key] = (len(counts), sum(counts) / len(counts), max(counts))
    return stats


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(LISTS_DIR.parent))  # run as a script: make the repository's clip importable
    print(f"{'dataset':<14}{'classes':>8}{'mean tokens':>13}{'max tokens':>12}")
    for key, row in description_stats().items():
        if row is None:
            print(f"{key:<14}{'descriptions file missing':>33}")
        else:
            n, mean, longest = row
            print(f"{key:<14}{n:>8}{mean:>13.1f}{longest:>12}")


def test_a_description_longer_than_the_context_is_warned_once_per_file_naming_the_class(caplog):
    from modules import text as text_module
    from modules import tokenize_class_texts

    names = ["juggling", "archery", "rowing"]
    long_text = "A person throws and catches several balls in a steady rhythm, " * 8  # about 98 tokens
    texts = [["Balls fly up and down.", long_text, "Oars pull a boat through water."]]
    text_module._TRUNCATION_WARNED.discard("long.csv")
    with caplog.at_level("WARNING", logger="modules.text"):
        tokens = tokenize_class_texts(texts, names=names, source="long.csv")
        tokenize_class_texts(texts, names=names, source="long.csv")  # the next epoch's evaluation: said already
    warnings = [r.getMessage() for r in caplog.records if "longer than CLIP" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert re.match(r"long.csv: 1 text\(s\) are longer than CLIP's 77 tokens and are cut to fit: archery \(\d+ "
                    r"tokens\)$", warnings[0])
    assert tokens.shape == (1, 3, 77) and int(tokens[0, 1, -1]) == 49407  # cut, EOT kept last

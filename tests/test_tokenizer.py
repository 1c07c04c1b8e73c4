"""clip.tokenize: ids identical to open_clip's tokenizer, truncation keeping EOT, cleaning, errors."""
from __future__ import annotations

import random

import pytest
import torch

import clip
from clip.tokenizer import SimpleTokenizer, clean_text

SOT, EOT = 49406, 49407

_FRAGMENTS = [
    # words, case, contractions (straight and curly apostrophes)
    "a photo of a dog", "Playing GUITAR", "It's", "we'LL", "they'd", "I'm", "you've", "don\u2019t", "O'Neil's",
    "it'\u017f",
    "ApplyEyeMakeup", "passing American football (in game)", "Approaching something with your camera",
    # accents, combining marks, other Latin scripts
    "caf\u00e9", "cafe\u0301", "na\u00efve", "Stra\u00dfe", "\u00c5ngstr\u00f6m", "\u0141\u00f3d\u017a",
    "se\u00f1or", "gar\u00e7on", "\u00e6\u00f8\u00e5",
    # HTML entities, single and double escaped
    "&amp;", "&amp;amp;", "&lt;b&gt;", "&quot;quoted&quot;", "&#39;", "&#x27;", "&nbsp;", "fish &amp; chips",
    # emoji, ZWJ sequences, skin tones, flags
    "\U0001F600", "\U0001F44D\U0001F3FD", "\U0001F468\u200D\U0001F469\u200D\U0001F467", "\U0001F1EB\U0001F1F7",
    "\u2764\ufe0f", "\U0001F3C3\u200D\u2640\ufe0f",
    # numbers in several forms
    "123", "3.14159", "1,000,000", "2024-01-31", "\u00bd", "x\u00b2", "\u0663\u0664", "\u2460", "007",
    # punctuation runs
    "!!!", "?!?", "...", "---", "((nested))", "#hashtag", "@user", "$9.99", "100%", "a/b\\c", "~~~***",
    "\u2014", "\u00ab\u00bb", "\u201cquote\u201d",
    # CJK and other scripts
    "\u4e2d\u6587\u5b57", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\ud55c\uad6d\uc5b4",
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "\u05e2\u05d1\u05e8\u05d9\u05ea", "\u0939\u093f\u0928\u094d\u0926\u0940", "\u0e44\u0e17\u0e22",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    # mojibake that ftfy repairs, odd characters
    "\u00c3\u00a9t\u00c3\u00a9", "\ufb01ne", "\u2126", "\u212a", "\u0130stanbul", "\u00a0", "\u200b", "\ufeff", "\x07",
]
_SEPARATORS = [" ", "  ", "\t", "\n", "\r\n", " \u00a0 ", "\u2003", "\u3000", "", "   \n\t  ", ", ", "-"]


def _varied_strings(n: int, seed: int = 0) -> list:
    """n seeded strings mixing the fragments above; every 10th is far past 77 tokens."""
    rng = random.Random(seed)
    out = ["", " ", "\n\t", "<|endoftext|>", "<|startoftext|> hello", "A" * 300]
    while len(out) < n:
        k = rng.randint(1, 12) if len(out) % 10 else rng.randint(60, 160)
        parts = []
        for _ in range(k):
            frag = rng.choice(_FRAGMENTS)
            if rng.random() < 0.2:
                frag = frag.upper() if rng.random() < 0.5 else frag.title()
            parts.append(frag)
            parts.append(rng.choice(_SEPARATORS))
        if rng.random() < 0.1:  # random code points, including unassigned and private-use ones
            points = [rng.randint(0x20, 0x2FFFF) for _ in range(rng.randint(1, 8))]
            # Lone surrogates are not text (they cannot be UTF-8 encoded); skip them.
            parts.append("".join(chr(c) for c in points if not 0xD800 <= c <= 0xDFFF))
        out.append("".join(parts))
    return out


def test_same_ids_as_open_clip_on_varied_strings():
    open_clip = pytest.importorskip("open_clip")
    texts = _varied_strings(1200)
    assert sum(len(t) > 600 for t in texts) >= 100  # the long ones really are long
    ours, theirs = clip.tokenize(texts), open_clip.tokenize(texts)
    mismatched = [t for t, a, b in zip(texts, ours, theirs) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} strings differ, e.g. {mismatched[:3]!r}"


def test_known_ids_and_layout():
    tokens = clip.tokenize(["a photo of a dog.", "a photo of a dog."], context_length=77)
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    # ids from OpenAI's vocabulary: "a"=320, "photo"=1125, "of"=539, "dog"=1929, "."=269
    assert tokens[0, :8].tolist() == [SOT, 320, 1125, 539, 320, 1929, 269, EOT]
    assert (tokens[0, 8:] == 0).all()
    assert torch.equal(clip.tokenize("a photo of a dog."), tokens[:1])  # a single string gives one row


def test_truncation_keeps_eot_last():
    text = "jump " * 200
    full = [SOT] + clip.get_tokenizer().encode(text) + [EOT]
    assert len(full) > 77
    tokens = clip.tokenize(text)[0]
    assert tokens[0] == SOT and tokens[-1] == EOT
    assert (tokens != 0).all()
    assert tokens[:-1].tolist() == full[:76]
    short = clip.tokenize(text, context_length=10)[0]
    assert short.tolist() == full[:9] + [EOT]


def test_truncate_false_raises_naming_the_text():
    with pytest.raises(ValueError, match=r"too long|more than the context length") as err:
        clip.tokenize(["short", "very long text " * 40], truncate=False)
    assert "very long text" in str(err.value) and "text 1" in str(err.value)
    assert clip.tokenize("fits easily", truncate=False)[0, 0] == SOT  # short texts are unaffected


def test_cleaning_unescapes_collapses_whitespace_and_lowercases():
    assert clean_text("  Fish &amp;amp; CHIPS\n\t here ") == "fish & chips here"
    assert torch.equal(clip.tokenize("A  Dog\n\tRUNS"), clip.tokenize("a dog runs"))
    assert torch.equal(clip.tokenize("rock &amp; roll"), clip.tokenize("rock & roll"))


def test_decode_round_trip():
    tok = clip.get_tokenizer()
    assert tok.decode(clip.tokenize("a man is playing the guitar")[0]) == "a man is playing the guitar"
    assert tok.decode(tok.encode("Caf\u00e9 \u4e2d\u6587")) == "caf\u00e9 \u4e2d\u6587"


def test_bad_input():
    with pytest.raises(TypeError, match="position 1"):
        clip.tokenize(["ok", 3])
    with pytest.raises(ValueError, match="context_length"):
        clip.tokenize("x", context_length=1)


def test_broken_vocabulary_file_is_named(tmp_path):
    bad = tmp_path / "vocab.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="vocab.txt.gz"):
        SimpleTokenizer(bad)

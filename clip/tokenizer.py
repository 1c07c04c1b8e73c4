"""CLIP's byte-level BPE tokenizer, giving the ids the OpenAI weights were trained on.

The vocabulary (``bpe_simple_vocab_16e6.txt.gz``, next to this file) is a list of merges. Encoding a text:
clean it (ftfy, HTML unescaping, whitespace collapse, lower case), split it into words, numbers and punctuation
runs with one regular expression, map each piece's UTF-8 bytes to printable characters, merge greedily by
merge rank, and look the merged pieces up. ``tokenize`` wraps that in start/end-of-text ids and pads to the
context length with zeros.

A literal ``<|endoftext|>`` inside a text is encoded as ordinary characters, not as the end-of-text id (as
open_clip does), so a class name or description can never end the text early.
"""
from __future__ import annotations

import functools
import gzip
import html
import logging
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import ftfy
import regex
import torch

logger = logging.getLogger(__name__)

DEFAULT_VOCAB = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

# The released vocabulary: 256 byte symbols, the same 256 with the end-of-word mark, 48,894 merges, and the two
# special tokens; 49,408 ids in all. The merges file holds more lines than were used in training.
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"

# Words are runs of letters, numbers are split digit by digit, every other non-space run is one piece;
# English contractions are pieces of their own. The text is already lower-case, but IGNORECASE still matters
# through case folding (a long s "\u017f" matches the "s" of "'s"), so it stays, as in the reference tokenizer.
_SPLIT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def _byte_symbols() -> dict:
    """Byte value -> one printable character, in the order the vocabulary lists them.

    Bytes that are already visible Latin-1 characters stand for themselves; the others (control characters,
    space, soft hyphen...) are moved to code points from 256 upwards, so no symbol is whitespace and the BPE can
    treat every byte as a letter. The vocabulary lists the visible bytes first, then the moved ones in byte order;
    the dict keeps that insertion order.
    """
    visible = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
               + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    symbols = {b: chr(b) for b in visible}
    moved = [b for b in range(256) if b not in symbols]
    for i, b in enumerate(moved):
        symbols[b] = chr(256 + i)
    return symbols


def clean_text(text: str) -> str:
    """The cleaning CLIP was trained with: fix mojibake, unescape HTML (twice), collapse whitespace, lower-case."""
    text = ftfy.fix_text(text)
    # Twice, because scraped captions are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    text = " ".join(text.split())
    return text.lower()


class SimpleTokenizer:
    """CLIP's BPE tokenizer: ``encode(text) -> ids`` without start/end tokens, and ``decode(ids) -> text``."""

    def __init__(self, vocab_path: Union[str, Path] = DEFAULT_VOCAB):
        vocab_path = Path(vocab_path)
        try:
            with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the BPE vocabulary {vocab_path}: {err}; expected the gzipped merges "
                             f"file bpe_simple_vocab_16e6.txt.gz shipped with clip/") from err
        # Line 0 is a version header; each following line is one merge "a b", most frequent first.
        merge_lines = lines[1:1 + _NUM_MERGES]
        if len(merge_lines) != _NUM_MERGES:
            raise ValueError(f"BPE vocabulary {vocab_path} has {len(merge_lines)} merges, expected {_NUM_MERGES}")
        merges = []
        for lineno, line in enumerate(merge_lines, start=2):
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"{vocab_path}, line {lineno}: expected two symbols separated by a space, "
                                 f"got {line!r}")
            merges.append(pair)

        byte_symbols = _byte_symbols()
        self.byte_table = [byte_symbols[b] for b in range(256)]
        self.byte_of_symbol = {sym: b for b, sym in byte_symbols.items()}
        symbols = list(byte_symbols.values())
        vocab = symbols + [s + _END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [SOT_TEXT, EOT_TEXT]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.decoder = vocab
        self.merges = merges
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.sot_token = self.encoder[SOT_TEXT]
        self.eot_token = self.encoder[EOT_TEXT]
        self.vocab_size = len(vocab)
        # Per-instance cache of word -> merged pieces; words repeat a lot across class names and prompts.
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    def _bpe_uncached(self, word: str) -> tuple:
        """Merge the symbols of one byte-mapped word, lowest merge rank first, until no known pair is left."""
        parts = list(word[:-1]) + [word[-1] + _END_OF_WORD]
        while len(parts) > 1:
            ranks = [self.merge_rank.get(pair) for pair in zip(parts, parts[1:])]
            known = [r for r in ranks if r is not None]
            if not known:
                break
            first, second = self.merges[min(known)]
            # Merge every non-overlapping occurrence of the best pair, left to right.
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> List[int]:
        """Text -> BPE ids, without the start/end-of-text ids."""
        ids: List[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            word = "".join(self.byte_table[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """BPE ids -> text (start/end-of-text ids and padding zeros are dropped); words are space-separated."""
        pieces = [self.decoder[int(i)] for i in ids if int(i) not in (0, self.sot_token, self.eot_token)]
        symbols = "".join(pieces)
        data = bytearray()
        for chunk in symbols.split(_END_OF_WORD):
            data.extend(self.byte_of_symbol[c] for c in chunk)
            data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer over the bundled vocabulary (built once, on first use: about a second)."""
    return SimpleTokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Texts -> token ids (N, context_length), int64: [SOT] + BPE ids + [EOT], zero-padded.

    A text longer than the context is cut to ``context_length`` ids with EOT kept as the last one when
    ``truncate`` is true (the text tower reads its embedding at EOT); with ``truncate=False`` it raises a
    ``ValueError`` naming the text and its length.
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must leave room for the start and end tokens, got {context_length}")
    tok = get_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects strings, got {type(text).__name__} at position {row}: {text!r}")
        ids = [tok.sot_token] + tok.encode(text) + [tok.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {row} is {len(ids)} tokens long (with start/end tokens), more than the "
                                 f"context length {context_length}: {text!r}")
            ids = ids[:context_length - 1] + [tok.eot_token]
        result[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result

"""Character vocabulary for multilingual CTC, text normalisation and error rates.

The vocabulary covers lower-case Latin letters with the diacritics of English, German, Spanish, French, Italian
and Portuguese, the apostrophe and the space; CTC's blank is id 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import torch
import torchaudio.functional as AF
from torch import Tensor

BLANK = "<blank>"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIACRITICS = "àáâãäçèéêëìíîïñòóôõöùúûüýÿßæœ"
DEFAULT_SYMBOLS = (BLANK, " ", "'", *LETTERS, *DIACRITICS)
_SEPARATORS = re.compile(r"[\s\-‐–—,;:.!?¡¿\"()\[\]«»“”„/]+")


def normalize_text(text: str) -> str:
    """Lower-case, NFC, typographic apostrophes to ``'``, punctuation and hyphens to single spaces."""
    text = unicodedata.normalize("NFC", text).lower().replace("’", "'").replace("`", "'")
    return _SEPARATORS.sub(" ", text).strip()


class CharVocab:
    """Characters <-> ids; id 0 is the CTC blank."""

    def __init__(self, symbols: Sequence[str] = DEFAULT_SYMBOLS) -> None:
        if not symbols or symbols[0] != BLANK:
            raise ValueError(f"symbols must start with the blank {BLANK!r}, got {list(symbols)[:3]}")
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols must be unique")
        self.symbols = tuple(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` that are not in the vocabulary (sorted, unique)."""
        return sorted({c for c in text if c not in self.index or c == BLANK})

    def encode(self, text: str) -> list[int]:
        """Ids of a normalised text; ValueError naming the characters outside the vocabulary."""
        bad = self.unknown(text)
        if bad:
            raise ValueError(f"text {text!r} has characters outside the vocabulary: {bad}")
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != 0)


def ctc_greedy_decode(log_probs_BLV: Tensor, lengths_B: Tensor, blank: int = 0) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    best_BL = log_probs_BLV.argmax(-1).cpu()
    out = []
    for b, length in enumerate(lengths_B.tolist()):
        path = best_BL[b, :length]
        if path.numel():
            keep = torch.ones_like(path, dtype=torch.bool)
            keep[1:] = path[1:] != path[:-1]
            path = path[keep]
        out.append([int(i) for i in path.tolist() if i != blank])
    return out


def edit_counts(hyp: str, ref: str) -> tuple[int, int, int, int]:
    """(character edits, reference characters, word edits, reference words) of one hypothesis."""
    ref_words, hyp_words = ref.split(), hyp.split()
    return AF.edit_distance(ref, hyp), len(ref), AF.edit_distance(ref_words, hyp_words), len(ref_words)

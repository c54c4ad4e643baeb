"""Tokenizers for small models, built offline from a word list (the embedded model's and the tests').

Both follow the real FLUX tokenizers' formats: a CLIP byte-level BPE (vocab.json + merges.txt) and a
T5-style Unigram (`<pad>`=0, `</s>`=1, `<unk>`=2), with every word of the list a single token.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from itertools import pairwise
from pathlib import Path

from transformers import T5TokenizerFast

# Words a shapes-world caption (and a few everyday prompts) use; each becomes a single token in
# both tokenizers so the tiny models see whole words, like the real ones do for common English.
WORDS: tuple[str, ...] = tuple(
    "a an the of and with in on at to is are this that it its".split()
    + "small large big tiny huge medium".split()
    + "red green blue yellow purple orange white black gray grey pink brown".split()
    + "circle square triangle cross shape shapes disk dot plus".split()
    + "center centre left right top bottom middle corner".split()
    + "background color colour colored solid plain image picture photo drawing".split()
    + "cat dog tree house sky sun car man woman person apple table".split()
)

# CLIP's special tokens sit at the very end of its vocabulary (49406 and 49407 in the real one):
# CLIPTextModel's pooler finds the end-of-text token by id, and some configs by argmax.
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: printable bytes stand for themselves, the rest are shifted
    past 255 so that every byte has a visible, non-whitespace character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE learning on the word list (each word once), run until every word is one symbol.

    CLIP marks the end of a word by fusing `</w>` onto its last character, so `red` starts as
    `r e d</w>` and ends as `red</w>`. Ties are broken by the pair itself so the result is stable.
    """
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for p in pieces.values() for pair in pairwise(p))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, p in pieces.items():
            out, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == best:
                    out.append(p[i] + p[i + 1])
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[word] = out


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = WORDS) -> int:
    """Write vocab.json / merges.txt / tokenizer_config.json for a CLIP BPE tokenizer; returns the
    vocabulary size. Every byte is in the vocabulary, bare and with `</w>`, so no input is unknown."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = _learn_merges(sorted(set(words)))
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for token in [*tokens, CLIP_BOS, CLIP_EOS]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS,
        "unk_token": CLIP_EOS,
        "pad_token": CLIP_EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def build_t5_tokenizer(words: tuple[str, ...] = WORDS) -> T5TokenizerFast:
    """A T5-style Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, then whole words (`▁red`), then single
    characters with and without the word-start marker so any ASCII text can be spelled out."""
    # Unigram picks the segmentation with the highest total log-probability: a whole word at -3
    # beats spelling it out at -9 or less per character.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + w, -3.0) for w in sorted(set(words))]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [("▁" + c, -9.0) for c in chars] + [(c, -10.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)

"""Tokenizers for checkpoints we make: byte-level BPE trained by `tokenizers` on text every Python
install ships (its standard library), BOS = 0 and EOS = 1. Used by the random-checkpoint writer,
by builds of presets, and by tools/train_demo.py (which trains on its own train split)."""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>"
MAX_VOCAB = 32000  # presets' tokenizers stop here; larger vocabularies keep the rest of their ids unused


def corpus_files(max_bytes: int = 2_000_000) -> list[Path]:
    """Python standard library sources, sorted by name: text that is on every machine, offline."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(stdlib.glob("*.py")):
        files.append(f)
        total += f.stat().st_size
        if total >= max_bytes:
            break
    return files


def train_bpe(files: Iterable[Path], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `files`: BOS = 0, EOS = 1, at most vocab_size tokens
    (deterministic for the same files)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    return tok


@functools.lru_cache(maxsize=4)
def _default_tokenizer_json(vocab_size: int) -> str:
    return train_bpe(corpus_files(), vocab_size).to_str()


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """The tokenizer of a preset with `vocab_size` ids, trained on `corpus_files()` (cached per size)."""
    return Tokenizer.from_str(_default_tokenizer_json(min(vocab_size, MAX_VOCAB)))

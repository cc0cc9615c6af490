"""Tokenizers: train a byte-level BPE on the corpus, or load any Hugging Face tokenizer folder.

Byte-level BPE is lossless (every byte sequence round-trips), which keeps the shard round-trip test exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rung.errors import DataError

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]  # document separator + ChatML turns for served chat


def train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def load_tokenizer_folder(folder: str | Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer folder {folder} has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises plain Exception subclasses from Rust
        raise DataError(f"cannot load tokenizer {path}: {err}") from None


def eos_id(tokenizer: Tokenizer) -> int:
    """The document separator: rung's EOS, else the first special token the tokenizer declares as end of text."""
    for candidate in (EOS, "</s>", "<eos>", "<|end_of_text|>"):
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    raise DataError(f"tokenizer has no end-of-text token (looked for {EOS}, </s>, <eos>, <|end_of_text|>)")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

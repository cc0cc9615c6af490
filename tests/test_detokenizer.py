"""Incremental detokenization: multi-byte characters split across byte-level tokens never surface half-decoded,
and stop strings spanning several tokens are held back and cut, with a real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rung.serving.engine.detokenizer import TextStream


class Decoder:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False, **_options):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text):
        return self.tokenizer.encode(text).ids


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(["hello world, the end of the story. stop here"] * 50, trainer)
    return Decoder(tokenizer)


def stream_all(decoder: Decoder, text: str, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(decoder, stop)
    deltas = [stream.add(token) for token in decoder.encode(text)]
    if not stream.stopped:
        deltas.append(stream.finish())
    return deltas, stream


def test_multibyte_characters_split_across_tokens_never_surface_broken(decoder):
    text = "héllo → wörld ✓ 日本 🎉 end"
    ids = decoder.encode(text)
    assert len(ids) > len(text.encode()) / 2  # bytes of the non-ASCII characters are separate tokens
    deltas, _ = stream_all(decoder, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens completed no character and released nothing


def test_stop_string_spanning_tokens_is_cut_and_never_leaks(decoder):
    text = "hello world, the end of the story"
    deltas, stream = stream_all(decoder, text, stop=["the end"])
    assert stream.stopped and "".join(deltas) == "hello world, "
    for i in range(1, len(deltas) + 1):  # no prefix of the output ever showed any part of the stop string
        assert "the e" not in "".join(deltas[:i])


def test_held_back_prefix_is_released_when_the_stop_string_does_not_complete(decoder):
    deltas, stream = stream_all(decoder, "the story. stop here", stop=["story time", "stop now"])
    assert not stream.stopped and "".join(deltas) == "the story. stop here"


def test_earliest_of_several_stop_strings_wins(decoder):
    deltas, stream = stream_all(decoder, "hello world, the end", stop=["the end", "world"])
    assert stream.stopped and "".join(deltas) == "hello "


@pytest.fixture(scope="module")
def hf_tokenizer(decoder):
    """The same BPE as a transformers tokenizer with special tokens, as served model folders have."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=decoder.tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>", "eos_token": "<|eot|>"})
    return tokenizer


def stream_ids(tokenizer, ids: list[int], stop=(), **options) -> tuple[str, TextStream]:
    stream = TextStream(tokenizer, stop, **options)
    text = "".join(stream.add(token) for token in ids)
    return text + ("" if stream.stopped else stream.finish()), stream


def test_special_tokens_are_left_out_of_the_text_and_of_stop_matching_by_default(hf_tokenizer):
    eot, pad = hf_tokenizer.convert_tokens_to_ids(["<|eot|>", "<|pad|>"])
    ids = hf_tokenizer("hello")["input_ids"] + [eot, pad] + hf_tokenizer(" world")["input_ids"] + [eot]
    text, _ = stream_ids(hf_tokenizer, ids)
    assert text == "hello world"
    text, stream = stream_ids(hf_tokenizer, ids, stop=["<|eot|>"])
    assert text == "hello world" and not stream.stopped  # nothing to match: the special token is not text
    kept, _ = stream_ids(hf_tokenizer, ids, skip_special_tokens=False)
    assert kept.startswith("hello<|eot|>") and kept.count("<|eot|>") == 2 and "<|pad|>" in kept
    text, stream = stream_ids(hf_tokenizer, ids, stop=["<|eot|>"], skip_special_tokens=False)
    assert text == "hello" and stream.stopped  # kept, they can stop a request

"""Tiny random checkpoints in the official transformers layouts, each with a working tokenizer
saved beside it: written by the model classes' own `save_pretrained`, with no downloads."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

from hub_sae.models.hf import default_model_path

TINY_LAYERS = 4
"""Blocks of every tiny model."""


def pydoc_word_tokenizer(specials: dict[str, str], words: int = 2000) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over pydoc's most common words; `specials` maps the tokenizer's
    role names (eos_token, mask_token, ...) to their strings, which come first in the vocabulary."""
    from pydoc_data.topics import topics

    counts = Counter(re.findall(r"\w+|[^\w\s]", " ".join(topics.values())))
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials.values(), "[UNK]"]))}
    for word, _ in counts.most_common(words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **specials)


@cache
def pydoc_byte_bpe(size: int = 1024) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of a byte-level BPE trained on pydoc, `<|endoftext|>` its id 0."""
    from pydoc_data.topics import topics

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(topics.values(), trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], tuple(tuple(merge) for merge in model["merges"])


def write_tiny_bert(path: Path) -> Path:
    """A BertForMaskedLM (with its head) and the embedded MiniLM's BERT tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_modernbert(path: Path) -> Path:
    """A ModernBertForMaskedLM (with its head) and a word-level tokenizer with [CLS] [SEP] [MASK]."""
    tokenizer = pydoc_word_tokenizer(
        {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    )
    ids = tokenizer.convert_tokens_to_ids
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2,
        max_position_embeddings=128,
        local_attention=16,
        pad_token_id=ids("[PAD]"),
        bos_token_id=ids("[CLS]"),
        cls_token_id=ids("[CLS]"),
        eos_token_id=ids("[SEP]"),
        sep_token_id=ids("[SEP]"),
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ModernBertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_qwen2(path: Path) -> Path:
    """A Qwen2ForCausalLM and a Qwen2Tokenizer (byte-level BPE over pydoc) shaped like Qwen2.5's:
    `<|endoftext|>` is EOS and pad, there is no BOS and no mask token."""
    vocab, merges = pydoc_byte_bpe()
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

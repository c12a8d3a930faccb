"""Tiny random checkpoints in the official layout of each family, for tests (no downloads)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
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
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

from hub_sae.models.hf import default_model_path

QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5's chat template (as Dream-v0-Instruct-7B ships it), without the tool-calling branches."""

DREAM_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
DREAM_WORDS = [*DREAM_SPECIAL, "[UNK]", "system", "user", "assistant", "You", "are", "a"]
DREAM_WORDS += ["helpful", ".", "hello", "world", "the", "cat", "sat", "on", "mat"]
"""The tiny Dream tokenizer's vocabulary: token id = index."""


def edit_shard(path: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> str:
    """Apply `edit` to the tensors of the shard (listed in the index) holding `name`, in place;
    returns the shard's file name."""
    from safetensors.torch import load_file, save_file

    shard = (
        path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    )
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard.name


def save_word_tokenizer(
    path: Path,
    words: list[str],
    special: list[str],
    config: dict | None = None,
    prefix: str | None = None,
    **tokens: str,
) -> None:
    """A whitespace WordLevel tokenizer (token id = index in `words`) saved as tokenizer.json and
    tokenizer_config.json; `special` tokens split out of any text, `prefix` (e.g. BOS) starts every
    encoding made with special tokens, `tokens` name bos/eos/pad/mask, and `config` entries (e.g. a
    chat_template, auto_map) are written into tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in special])
    if prefix:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{prefix} $A", special_tokens=[(prefix, words.index(prefix))]
        )
    PreTrainedTokenizerFast(tokenizer_object=backend, **tokens).save_pretrained(path)
    if config:
        file = path / "tokenizer_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **config}, indent=2))


def write_tiny_dream(path: Path, seed: int = 0, shard_size: int = 20_000, **config) -> Path:
    """A random Dream (3 layers, d 32, 4 heads over 2 KV heads) in the official layout: config.json
    (model_type Dream, auto_map to remote code that must never run), weights under the official
    names in safetensors shards with model.safetensors.index.json, and a tokenizer with `<|mask|>`
    and Qwen's chat template. `config` overrides DreamConfig fields."""
    from hub_sae.models.dream import DreamConfig, DreamModel, save_dream_model

    ids = {w: i for i, w in enumerate(DREAM_WORDS)}
    eos = ids["<|endoftext|>"]
    defaults = dict(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        mask_token_id=ids["<|mask|>"],
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(seed)
    model = DreamModel(DreamConfig(**{**defaults, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    save_dream_model(model, path, max_shard_size=shard_size)
    remote = {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    }
    file = path / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "auto_map": remote}, indent=2))
    save_word_tokenizer(
        path,
        DREAM_WORDS,
        DREAM_SPECIAL,
        config={
            "chat_template": QWEN_CHAT_TEMPLATE,
            "tokenizer_class": "DreamTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        },
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="<|mask|>",
    )
    return path


TINY_LAYERS = 4
"""Blocks of the tiny BERT, ModernBERT and Qwen2."""
ROLES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
"""Tokenizer roles of the tiny ModernBERT's special tokens, in order."""


def pydoc_words(n: int = 2000) -> list[str]:
    """The `n` most common words and punctuation marks of pydoc, most common first."""
    from pydoc_data.topics import topics

    counts = Counter(re.findall(r"\w+|[^\w\s]", " ".join(topics.values())))
    return [word for word, _ in counts.most_common(n)]


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
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [*special, *pydoc_words()]
    save_word_tokenizer(path, words, special, **dict(zip(ROLES, special, strict=True)))
    ids = {token: i for i, token in enumerate(special)}
    config = ModernBertConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2,
        max_position_embeddings=128,
        local_attention=16,
        pad_token_id=ids["[PAD]"],
        bos_token_id=ids["[CLS]"],
        cls_token_id=ids["[CLS]"],
        eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ModernBertForMaskedLM(config).save_pretrained(path)
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

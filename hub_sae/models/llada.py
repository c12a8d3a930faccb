"""LLaDA-8B-Base in plain PyTorch: loads the official safetensors checkpoint without remote code.

    x = wte(input_ids)
    for each block:  x = x + attn_out(attention(rope(q), rope(k), v))  on attn_norm(x), not causal
                     x = x + ff_out(silu(ff_proj(h)) * up_proj(h))     with h = ff_norm(x)
    logits = ff_out(ln_f(x))

Parameter names match the checkpoint (`model.transformer.blocks.{i}.q_proj.weight`, ...). Each block
returns its output (resid_post), so a forward hook on `model.blocks[i]` can read or replace it.
Positions are 0..T-1 as in LLaDA's own code: pad on the right.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hub_sae.models import BaseModel
from hub_sae.models.native import (
    RMSNorm,
    apply_rope,
    attend,
    checkpoint_dir,
    load_tokenizer,
    load_weights,
    read_config,
    rope_cos_sin,
    save_checkpoint,
)

_SUPPORTED = {
    "block_type": "llama",
    "include_bias": False,
    "include_qkv_bias": False,
    "weight_tying": False,
    "alibi": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "layer_norm_type": "rms",
    "activation_type": "silu",
}
"""Options of LLaDA's config.json this implementation covers, with the only value it supports."""


@dataclass
class LLaDAConfig:
    """LLaDA's config.json, under its own field names (unknown keys are ignored by `from_dict`)."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means n_heads."""
    mlp_hidden_size: int = 12288
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    """Rows of `wte` and of the output head `ff_out`; None means vocab_size."""
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int | None = 126081
    """Kept so that `to_dict` writes config.json back whole; hub-sae never pads with it."""
    max_sequence_length: int = 4096

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) and "
                f"n_heads by n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def n_embeddings(self) -> int:
        """Rows of the embedding and of the output head."""
        return self.embedding_size or self.vocab_size

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LLaDAConfig:
        """Build from a config.json dict; raises on architecture options this code lacks."""
        for key, value in _SUPPORTED.items():
            if key in config and config[key] != value:
                raise ValueError(
                    f"config.json has {key}={config[key]!r}; hub-sae's LLaDA runs only {value!r}"
                )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict (with `model_type` so `family` recognises the folder)."""
        return {"model_type": "llada", "architectures": ["LLaDAModelLM"], **asdict(self)}


class LLaDABlock(nn.Module):
    """One pre-norm transformer block: bidirectional attention then a SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def attention(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        """Multi-head attention over all positions; `mask` [B, 1, 1, T] is True at real keys."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attend(q, k, v, mask)
        return self.attn_out(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None = None) -> Tensor:
        """The block's output (resid_post) for input x [B, T, d]."""
        x = x + self.attention(self.attn_norm(x), rope, mask)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModelLM(nn.Module):
    """LLaDA masked-diffusion LM; `forward(input_ids, attention_mask)` returns logits [B, T, V]."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.n_embeddings, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.n_embeddings, bias=False),
            }
        )

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return self.model.transformer.blocks

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, T, embedding_size]; `attention_mask` [B, T] is 1 at tokens, 0 at padding."""
        t = self.model.transformer
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        mask = None
        if attention_mask is not None and not attention_mask.bool().all():
            mask = attention_mask.bool()[:, None, None, :]
        x = t.wte(input_ids)
        for block in t.blocks:
            x = block(x, rope, mask)
        return t.ff_out(t.ln_f(x))


def load_llada_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> LLaDAModelLM:
    """Load a LLaDA checkpoint (folder or Hub id) shard by shard into a model built on `meta`.

    Every tensor is checked against the model: an unexpected, mis-shaped or missing tensor raises
    an error naming it and its file.
    """
    path = checkpoint_dir(name_or_path)
    config = LLaDAConfig.from_dict(read_config(path, "LLaDA"))
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    load_weights(model, path, "LLaDA", dtype, device)
    return model.eval()


def save_llada_model(
    model: LLaDAModelLM, save_directory: str | Path, max_shard_size: int | str = "5GB"
) -> None:
    """Write config.json and the weights as safetensors shards (+ index when there are several)."""
    save_checkpoint(model.state_dict(), model.config.to_dict(), save_directory, max_shard_size)


def load_llada(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """LLaDA (folder or Hub id, e.g. GSAI-ML/LLaDA-8B-Base) and its tokenizer as a BaseModel."""
    path = checkpoint_dir(name_or_path)
    tokenizer = load_tokenizer(path, "GSAI-ML/LLaDA-8B-Base")
    model = load_llada_model(path, dtype=dtype, device=device)
    config = model.config
    return BaseModel(
        name=str(name_or_path),
        model=model,
        tokenizer=tokenizer,
        blocks=model.blocks,
        mask_token_id=config.mask_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=config.eos_token_id,
        has_lm_head=True,
        max_length=config.max_sequence_length,
        family="llada",
    )

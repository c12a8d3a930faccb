"""Dream (Dream-org/Dream-v0-Base-7B, -Instruct-7B) in plain PyTorch, without remote code.

A Qwen2.5 decoder whose attention is not causal:

    x = embed_tokens(input_ids)
    for each layer:  x = x + o_proj(attention(rope(q), rope(k), v))  on input_layernorm(x)
                     x = x + down_proj(silu(gate_proj(h)) * up_proj(h))
                         with h = post_attention_layernorm(x)
    logits = lm_head(norm(x))        unshifted: the logits at i predict token i + 1

q/k/v projections carry a bias, keys and values have fewer heads (grouped-query attention), RoPE
turns pairs (i, i + d/2) with angles computed in float32 and cast to the activations' dtype as in
Qwen2. A padding mask m [B, T] lets a query and a key meet only when both are real
(`m[:, None, None, :] & m[:, None, :, None]`), positions count real tokens (`cumsum(m) - 1`, pads
at 1), and the attention output of a padding query is 0. Parameter names match the checkpoint
(`model.layers.{i}.self_attn.q_proj.weight`, ...); each layer returns its output (resid_post), so a
forward hook on `model.blocks[i]` can read or replace it.
"""

from __future__ import annotations

import math
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

EXAMPLE = "Dream-org/Dream-v0-Base-7B"
_SUPPORTED = {"hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False}
"""Options of Dream's config.json this implementation covers, with the only value it supports."""


@dataclass
class DreamConfig:
    """Dream's config.json under its own keys; the defaults are Dream-v0-Base-7B's."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    mask_token_id: int = 151666
    bos_token_id: int = 151643
    eos_token_id: int = 151643
    pad_token_id: int = 151643

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        sizes += ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        bad = [f"{n}={getattr(self, n)!r}" for n in sizes if not _whole(getattr(self, n), 1)]
        if bad:
            raise ValueError(f"config.json needs positive whole numbers: {', '.join(bad)}")
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if self.hidden_size % heads or heads % kv or (self.hidden_size // heads) % 2:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({heads}) into an even head width, and num_attention_heads by "
                f"num_key_value_heads ({kv})"
            )
        theta, eps = self.rope_theta, self.rms_norm_eps
        if not (_real(theta) and 0 < theta < math.inf and _real(eps) and 0 <= eps < 1):
            raise ValueError(
                f"config.json needs rope_theta > 0 (has {self.rope_theta!r}) and rms_norm_eps in "
                f"[0, 1) (has {self.rms_norm_eps!r})"
            )
        ids = ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
        bad = [
            f"{n}={getattr(self, n)!r}"
            for n in ids
            if not (_whole(getattr(self, n)) and 0 <= getattr(self, n) < self.vocab_size)
        ]
        if bad:
            raise ValueError(f"config.json has token ids outside the vocabulary: {', '.join(bad)}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DreamConfig:
        """Build from a config.json dict; raises on architecture options this code lacks."""
        for key, value in _SUPPORTED.items():
            if config.get(key, value) != value:
                raise ValueError(
                    f"config.json has {key}={config[key]!r}; hub-sae's Dream runs only {value!r}"
                )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict, with the official `model_type` and `architectures`."""
        return {
            "model_type": "Dream",
            "architectures": ["DreamModel"],
            **_SUPPORTED,
            **asdict(self),
        }


def _whole(value: object, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class DreamAttention(nn.Module):
    """Bidirectional grouped-query attention with RoPE and biased q/k/v projections."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], real: Tensor | None) -> Tensor:
        """Attention over x [B, T, d]; `real` [B, T] is True at tokens (None: no padding)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope, upcast=False), apply_rope(k, *rope, upcast=False)
        if real is None:
            out = attend(q, k, v, None)
        else:  # padding queries see no key: their output is 0 (never NaN, on any backend)
            both = real[:, None, None, :] & real[:, None, :, None]
            out = attend(q, k, v, both).masked_fill(~real[:, None, :, None], 0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DreamMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """The MLP's output for x [B, T, d]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamLayer(nn.Module):
    """One pre-norm decoder layer: bidirectional attention then the MLP."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], real: Tensor | None = None) -> Tensor:
        """The layer's output (resid_post) for input x [B, T, d]."""
        x = x + self.self_attn(self.input_layernorm(x), rope, real)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamModel(nn.Module):
    """Dream masked-diffusion LM; `forward(input_ids, attention_mask)` returns its own logits."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(
            DreamLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self.model.layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Unshifted logits [B, T, vocab_size] (row i predicts token i + 1); `attention_mask`
        [B, T] is 1 at tokens, 0 at padding (left, right or both)."""
        B, T = input_ids.shape
        real = None
        if attention_mask is not None and not attention_mask.bool().all():
            real = attention_mask.bool()
            positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        rope = (cos[:, None], sin[:, None])  # [B, 1, T, hd]: the same for every head
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, rope, real)
        return self.lm_head(self.model.norm(x))


def load_dream_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> DreamModel:
    """Load a Dream checkpoint (folder or Hub id) shard by shard into a model built on `meta`.

    Every tensor is checked against the model: an unexpected, mis-shaped or missing tensor raises
    an error naming it and its file.
    """
    path = checkpoint_dir(name_or_path)
    config = DreamConfig.from_dict(read_config(path, "Dream"))
    with torch.device("meta"):
        model = DreamModel(config)
    tied = frozenset({"lm_head.weight"} if config.tie_word_embeddings else ())
    load_weights(model, path, "Dream", dtype, device, skip=tied)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def save_dream_model(
    model: DreamModel, save_directory: str | Path, max_shard_size: int | str = "5GB"
) -> None:
    """Write config.json and the weights (official names) as safetensors shards (+ index)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_checkpoint(state, model.config.to_dict(), save_directory, max_shard_size)


def _load_tokenizer(path: Path):
    """tokenizer.json when there is one; else Qwen2's byte-level BPE from vocab.json and
    merges.txt (the official repos ship those for their remote `DreamTokenizer`, a Qwen2 copy)."""
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path, EXAMPLE)
    if not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        raise FileNotFoundError(
            f"{path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt): copy "
            f"tokenizer_config.json, vocab.json and merges.txt from {EXAMPLE}"
        )
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(path)


def load_dream(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Dream (folder or Hub id, e.g. Dream-org/Dream-v0-Base-7B) and its tokenizer as a BaseModel.

    The mask, BOS and EOS ids come from config.json (151666, 151643, 151643 for Dream-v0).
    """
    path = checkpoint_dir(name_or_path)
    tokenizer = _load_tokenizer(path)
    model = load_dream_model(path, dtype=dtype, device=device)
    config = model.config
    return BaseModel(
        name=str(name_or_path),
        model=model,
        tokenizer=tokenizer,
        blocks=model.blocks,
        mask_token_id=config.mask_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        has_lm_head=True,
        max_length=config.max_position_embeddings,
        family="dream",
    )

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

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from torch import Tensor, nn

from hub_sae.io import HubOptions, local_path, write_json
from hub_sae.models import BaseModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

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


class RMSNorm(nn.Module):
    """RMS norm with a weight and no bias, normalised in float32 as in LLaDA."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        """x / rms(x) * weight, in x's dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """float32 [T, hd] cos and sin: pair (i, i + hd/2) at position t turns t / theta^(2i/hd)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x [B, H, T, head_dim] in float32, returned in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


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
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
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
        rope = rope_cos_sin(
            input_ids.shape[1], self.config.head_dim, self.config.rope_theta, input_ids.device
        )
        mask = None
        if attention_mask is not None and not attention_mask.bool().all():
            mask = attention_mask.bool()[:, None, None, :]
        x = t.wte(input_ids)
        for block in t.blocks:
            x = block(x, rope, mask)
        return t.ff_out(t.ln_f(x))


def _local_dir(name_or_path: str | Path) -> Path:
    """A local checkpoint folder, downloading `name_or_path` from the Hub when it is a repo id."""
    path = local_path(name_or_path)
    if path is not None:
        return path
    return HubOptions().snapshot(
        str(name_or_path), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]
    )


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files of a checkpoint folder and the index's tensor -> file map (or {})."""
    if (path / INDEX_FILE).is_file():
        weight_map: dict[str, str] = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))], weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], {}
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_llada_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> LLaDAModelLM:
    """Load a LLaDA checkpoint (folder or Hub id) shard by shard into a model built on `meta`.

    Every tensor is checked against the model: an unexpected, mis-shaped or missing tensor raises
    an error naming it and its file.
    """
    path = _local_dir(name_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: a LLaDA checkpoint folder holds config.json and "
            f"{SINGLE_FILE} or {INDEX_FILE} with its shards"
        )
    config = LLaDAConfig.from_dict(json.loads(config_file.read_text()))
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    files, weight_map = _shard_files(path)
    loaded: set[str] = set()
    for file in files:
        shard = {}
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name not in expected:
                    raise ValueError(f"{file.name} holds {name}, which LLaDA has no parameter for")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ValueError(
                        f"{name} in {file.name} has shape {list(shape)}; the config expects "
                        f"{list(expected[name])}"
                    )
                shard[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        model.load_state_dict(shard, strict=False, assign=True)
        loaded |= shard.keys()
    missing = [n for n in expected if n not in loaded]
    if missing:
        read = ", ".join(f.name for f in files)
        lines = [f"{n} {list(expected[n])}: not in {weight_map.get(n, read)}" for n in missing]
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) of the model: " + "; ".join(lines))
    return model.eval()


def save_llada_model(
    model: LLaDAModelLM, save_directory: str | Path, max_shard_size: int | str = "5GB"
) -> None:
    """Write config.json and the weights as safetensors shards (+ index when there are several)."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    write_json(save_directory / "config.json", model.config.to_dict())
    save_torch_state_dict(model.state_dict(), save_directory, max_shard_size=max_shard_size)


def load_llada(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """LLaDA (folder or Hub id, e.g. GSAI-ML/LLaDA-8B-Base) and its tokenizer as a BaseModel."""
    from transformers import PreTrainedTokenizerFast

    path = _local_dir(name_or_path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json: copy tokenizer.json and tokenizer_config.json from the "
            "original checkpoint, e.g. GSAI-ML/LLaDA-8B-Base"
        )
    model = load_llada_model(path, dtype=dtype, device=device)
    # Not AutoTokenizer: it reads config.json, whose auto_map asks to run LLaDA's remote code.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
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

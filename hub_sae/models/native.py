"""Pieces shared by hub-sae's own model code (llada.py, dream.py): RMSNorm, RoPE, attention, and
loading or saving an official safetensors checkpoint (one file, or shards with an index)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from torch import Tensor, nn

from hub_sae.io import HubOptions, local_path, write_json
from hub_sae.models import _read_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class RMSNorm(nn.Module):
    """RMS norm with a weight and no bias, normalised in float32 (LLaDA, Qwen2/Dream)."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        """x / rms(x) * weight, in x's dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """float32 cos and sin [*positions.shape, head_dim]: pair (i, i + hd/2) at position t turns
    by t / theta^(2i/hd)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    angles = positions.float()[..., None] * (1.0 / theta**exponents)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, upcast: bool = True) -> Tensor:
    """Rotate-half RoPE on x [..., head_dim], returned in x's dtype: in float32 when `upcast`
    (LLaDA), else in x's dtype with cos and sin cast to it (Qwen2, hence Dream)."""
    if upcast:
        y = x.float()
    else:
        y, cos, sin = x, cos.to(x.dtype), sin.to(x.dtype)
    y1, y2 = y.chunk(2, dim=-1)
    return (y * cos + torch.cat((-y2, y1), dim=-1) * sin).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Bidirectional softmax attention of q [B, H, T, hd] over k, v [B, KV, T, hd] (grouped-query
    when KV < H); `mask` is a bool mask broadcastable to [B, H, T, T], True where allowed."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)


def checkpoint_dir(name_or_path: str | Path) -> Path:
    """A local checkpoint folder, downloading `name_or_path` from the Hub when it is a repo id."""
    path = local_path(name_or_path)
    if path is not None:
        return path
    return HubOptions().snapshot(
        str(name_or_path),
        allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "merges.txt"],
    )


def read_config(path: Path, what: str) -> dict:
    """The config.json dict of checkpoint folder `path` (`what` names the model for the error)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: a {what} checkpoint folder holds config.json and "
            f"{SINGLE_FILE} or {INDEX_FILE} with its shards"
        )
    return _read_config(path / "config.json")


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files of a checkpoint folder and the index's tensor -> file map (or {})."""
    if (path / INDEX_FILE).is_file():
        weight_map = _read_config(path / INDEX_FILE).get("weight_map")
        # shard names are plain file names in `path` (hub caches link them to blobs elsewhere)
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f not in ("", ".", "..") and Path(f).name == f
            for f in weight_map.values()
        ):
            raise ValueError(
                f"{path / INDEX_FILE} needs a weight_map of tensor name -> shard file in {path}"
            )
        return [path / f for f in sorted(set(weight_map.values()))], weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], {}
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_weights(
    model: nn.Module,
    path: Path,
    what: str,
    dtype: torch.dtype,
    device: str | torch.device,
    skip: frozenset[str] = frozenset(),
) -> None:
    """Fill `model` (built on `meta`) from the safetensors of `path`, shard by shard.

    Every tensor is checked against the model: an unexpected, mis-shaped or missing tensor raises
    an error naming it and its file. Parameters in `skip` (e.g. a tied head) are not read.
    """
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items() if n not in skip}
    files, weight_map = _shard_files(path)
    loaded: set[str] = set()
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{INDEX_FILE} in {path} names {file.name}, which is missing")
        shard = {}
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name not in expected:
                    raise ValueError(f"{file.name} holds {name}, which {what} has no parameter for")
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


def save_checkpoint(
    state_dict: dict[str, Tensor],
    config: dict,
    save_directory: str | Path,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write config.json and the weights as safetensors shards (+ index when there are several)."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    write_json(save_directory / "config.json", config)
    save_torch_state_dict(state_dict, save_directory, max_shard_size=max_shard_size)


def load_tokenizer(path: Path, example: str):
    """The tokenizer of checkpoint folder `path` from its tokenizer.json, without remote code
    (not AutoTokenizer: it reads config.json, whose auto_map asks to run the checkpoint's code)."""
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json: copy tokenizer.json and tokenizer_config.json from "
            f"the original checkpoint, e.g. {example}"
        )
    return PreTrainedTokenizerFast.from_pretrained(path)

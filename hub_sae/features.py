"""Per-latent statistics for exploring a suite: firing frequency and top-activating contexts.

Stored as `features.safetensors` beside each SAE's weights:

    frequency     [d_sae]                       share of the scanned tokens on which the latent fired
    top_values    [d_sae, n_top]                its largest activations, descending (0: unused slot)
    top_tokens    [d_sae, n_top]                the clean token at each example (-1: unused slot)
    top_contexts  [d_sae, n_top, 2 * window + 1] the corrupted input ids around it, the example at
                                                index `window` (-1: outside the sequence or unused)

The metadata holds `tokens` (how many positions were scanned), `window`, `policy` and `corpus`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from hub_sae.activations import harvest_text
from hub_sae.data import DataConfig
from hub_sae.io import write_atomic
from hub_sae.masking import Corruption
from hub_sae.models import BaseModel

if TYPE_CHECKING:  # sae.py loads through formats.py, which reads suites: no import back
    from hub_sae.sae import TopKSAE

FEATURES_FILE = "features.safetensors"


class FeatureStats(NamedTuple):
    frequency: Tensor
    top_values: Tensor
    top_tokens: Tensor
    top_contexts: Tensor
    tokens: int
    window: int


def _windows(input_ids: Tensor, positions: Tensor, window: int) -> Tensor:
    """[n, 2 * window + 1] ids around each (batch, position) row of `positions`, -1 off the edge."""
    padded = torch.nn.functional.pad(input_ids, (window, window), value=-1)
    offsets = torch.arange(2 * window + 1, device=input_ids.device)
    return padded[positions[:, :1], positions[:, 1:] + offsets]


@torch.no_grad()
def collect_features(
    base: BaseModel,
    saes: Mapping[object, TopKSAE],
    policy: str,
    corruption: Corruption,
    data: DataConfig,
    max_tokens: int,
    n_top: int = 8,
    window: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict[object, FeatureStats]:
    """Scan up to `max_tokens` policy-selected positions of `data` and keep each latent's top examples.

    `saes` maps any key (e.g. (layer, k)) to an SAE taking raw activations of block `sae.layer`;
    all layers are read from one forward per batch. `progress` shows a tqdm bar over the positions.
    """
    layers = sorted({sae.require_resid_post("collect_features").layer for sae in saes.values()})
    d = {key: sae.d_sae for key, sae in saes.items()}
    counts = {key: torch.zeros(d[key]) for key in saes}
    values = {key: torch.zeros(d[key], n_top) for key in saes}
    tokens = {key: torch.full((d[key], n_top), -1, dtype=torch.long) for key in saes}
    contexts = {
        key: torch.full((d[key], n_top, 2 * window + 1), -1, dtype=torch.long) for key in saes
    }
    seen = 0
    label = "top contexts" if progress else None
    for _, _, h in harvest_text(
        base, data, layers, policy, corruption, max_tokens, seed, progress=label
    ):
        n = len(h.token_ids)
        ids = h.token_ids.cpu()
        windows = _windows(h.batch.input_ids, h.positions, window).cpu()
        for key, sae in saes.items():
            enc = sae.encode(h.acts[sae.layer].to(sae.W_dec.device, sae.W_dec.dtype))
            acts, idx = enc.top_acts.float().cpu(), enc.top_indices.cpu()
            fired = acts > 0
            counts[key].index_add_(0, idx[fired], torch.ones(int(fired.sum())))
            # Candidates per latent: each (row, slot) entry is one example of latent idx[row, slot].
            rows = torch.arange(n)[:, None].expand_as(idx)[fired]
            lat, val = idx[fired], acts[fired]
            order = torch.argsort(val, descending=True)
            lat, val, rows = lat[order], val[order], rows[order]
            # Rank of each candidate among its latent's candidates (they are sorted by value).
            order = torch.argsort(lat, stable=True)
            lat, val, rows = lat[order], val[order], rows[order]
            first = torch.searchsorted(lat, lat, right=False)
            rank = torch.arange(len(lat)) - first
            keep = rank < n_top
            lat, val, rows = lat[keep], val[keep], rows[keep]
            merged_v = torch.cat([values[key], torch.zeros(d[key], n_top)], dim=1)
            merged_t = torch.cat(
                [tokens[key], torch.full((d[key], n_top), -1, dtype=torch.long)], dim=1
            )
            merged_c = torch.cat(
                [contexts[key], torch.full((d[key], n_top, 2 * window + 1), -1, dtype=torch.long)],
                dim=1,
            )
            slot = n_top + rank[keep]
            merged_v[lat, slot] = val
            merged_t[lat, slot] = ids[rows]
            merged_c[lat, slot] = windows[rows]
            best = torch.argsort(merged_v, dim=1, descending=True, stable=True)[:, :n_top]
            values[key] = merged_v.gather(1, best)
            tokens[key] = merged_t.gather(1, best)
            contexts[key] = merged_c.gather(1, best[..., None].expand(-1, -1, 2 * window + 1))
        seen += n
    if seen == 0:
        raise ValueError(
            f"no {policy!r} positions in {data.corpus!r} ({data.split}); give more text."
        )
    return {
        key: FeatureStats(counts[key] / seen, values[key], tokens[key], contexts[key], seen, window)
        for key in saes
    }


def save_features(
    path: str | Path, stats: FeatureStats, metadata: dict[str, str] | None = None
) -> None:
    """Write `stats` to `path` atomically."""
    path = Path(path)
    tensors = {
        "frequency": stats.frequency.float().contiguous(),
        "top_values": stats.top_values.float().contiguous(),
        "top_tokens": stats.top_tokens.long().contiguous(),
        "top_contexts": stats.top_contexts.long().contiguous(),
    }
    meta = {**(metadata or {}), "tokens": str(stats.tokens), "window": str(stats.window)}
    write_atomic(path, save(tensors, metadata=meta))


def load_features(path: str | Path) -> FeatureStats:
    """Read a features.safetensors file written by `save_features`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; train the suite with hub-sae to get feature statistics."
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    t = load_file(str(path))
    missing = {"frequency", "top_values", "top_tokens", "top_contexts"} - set(t)
    if missing or "tokens" not in meta or "window" not in meta:
        raise ValueError(
            f"{path} lacks {sorted(missing) or 'its tokens/window metadata'}; regenerate it."
        )
    return FeatureStats(
        t["frequency"],
        t["top_values"],
        t["top_tokens"],
        t["top_contexts"],
        int(meta["tokens"]),
        int(meta["window"]),
    )

"""Write a suite's latent activations as EleutherAI delphi's latent cache, for auto-interpretation.

The layout is the one eai-delphi 0.1.3's `LatentCache.save_splits` / `save_config` write and
`delphi.latents.LatentDataset` reads, one folder per SAE named by its sparsify hookpoint:

    layers.{L}/{start}_{end}.safetensors   latents start..end (end inclusive), n_splits of them
        activations  [N] float16            every non-zero activation of those latents
        locations    [N, 3] uint16|uint32   (context, position, latent - start), sorted
        tokens       [contexts, ctx_len]    the CLEAN token ids (the whole array, in every shard)
        masked       [contexts, ctx_len]    bool: the mask token replaced this token in the input
        mask_ratio   [contexts] float32     the mask probability t the context was corrupted with
    layers.{L}/config.json                 delphi's CacheConfig + model_name, and `hub_sae`: the
                                           suite, layer, k, policy and corruption

(inside one `k_{k}/` folder per k when the suite has several). The base model reads text whose
tokens are masked under the suite's corruption; activations are recorded at the positions the
suite's policy selects (for `mask`, the masked ones) and nowhere else, so delphi's windows show
the clean text and count every other position as not firing. delphi ignores the extra tensors.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.numpy import save
from torch import Tensor
from tqdm.auto import tqdm

from hub_sae.activations import harvest_text
from hub_sae.cards import HUB_IDS
from hub_sae.data import DataConfig
from hub_sae.io import is_int, new_folder, write_folder, write_json
from hub_sae.masking import check_policy
from hub_sae.models import BaseModel, family, load_base_model
from hub_sae.sae import TopKSAE
from hub_sae.suite import SUITE_FILE, SuiteInfo, layer_folders, read_suite


@dataclass
class DelphiExport:
    """What text the cache is built from and how it is cut."""

    max_tokens: int | None = None
    """Tokens of text to read, in whole contexts (default: the suite's eval_tokens)."""
    n_splits: int = 5
    """Shards per SAE, by latent range (delphi's default)."""
    device: str = "cpu"
    """Where the base model and the SAEs run."""
    corpus: str | None = None
    """Text to read (default: the corpus the suite was evaluated on)."""
    split: str | None = None
    """Its split (default: the suite's held-out split)."""
    seed: int = 0
    """Seed of the document order and the masks."""


def split_edges(d_sae: int, n_splits: int) -> list[tuple[int, int]]:
    """(start, end) of each shard, end inclusive: delphi's `_generate_split_indices`."""
    bounds = torch.linspace(0, d_sae, steps=n_splits + 1).long().tolist()
    return [(start, end - 1) for start, end in pairwise(bounds)]


def _check(options: DelphiExport, info: SuiteInfo) -> int:
    """The number of contexts to read; a ValueError naming the option and the fix."""
    n, d_sae = options.n_splits, info.d_sae
    if not is_int(n) or not 1 <= n <= d_sae:
        raise ValueError(
            f"--n-splits must be a whole number from 1 to d_sae ({d_sae}, one latent per shard), "
            f"not {n!r}."
        )
    max_tokens = info.eval_tokens if options.max_tokens is None else options.max_tokens
    ctx_len = info.heldout().ctx_len
    if not is_int(max_tokens) or max_tokens < ctx_len:
        raise ValueError(
            f"--max-tokens must be a whole number of at least one context ({ctx_len} tokens), "
            f"not {max_tokens!r}."
        )
    return max_tokens // ctx_len


def _pick(
    info: SuiteInfo, folders: dict[tuple[int, int], Path], layer: int | None, k: int | None
) -> dict[tuple[int, int], Path]:
    """The SAE folders `layer` and `k` pick (None: all), ordered by k then layer."""
    picked = {
        key: folder
        for key, folder in folders.items()
        if layer in (None, key[0]) and k in (None, key[1])
    }
    if not picked:
        raise ValueError(
            f"the suite has no SAE for layer {layer} and k {k}; its layers are {info.layers} "
            f"and its ks {info.ks}."
        )
    return dict(sorted(picked.items(), key=lambda item: (item[0][1], item[0][0])))


def _fired(sae: TopKSAE, acts: Tensor, positions: Tensor, first_row: int) -> tuple[Tensor, Tensor]:
    """(locations [N, 3] int32 (context, position, latent), activations [N] float16) of the
    non-zero latents of `acts` [n, d_in], in delphi's order: by context, position, latent."""
    enc = sae.encode(acts.to(sae.device, sae.dtype))
    latents, order = enc.top_indices.sort(dim=-1)
    values = enc.top_acts.gather(-1, order)
    fired = values > 0
    where = positions.to(fired.device)[:, None, :].expand(-1, sae.k, -1)[fired]
    where[:, 0] += first_row
    locations = torch.cat([where, latents[fired][:, None]], dim=1).to("cpu", torch.int32)
    activations = values[fired].to("cpu", torch.float16)
    if not torch.isfinite(activations).all():
        raise ValueError(
            f"layer {sae.layer} k {sae.k}: an activation exceeds float16's range (65504), which "
            "delphi's cache stores; this SAE or its base model gives unusable activations."
        )
    return locations, activations


def _shard(locations: Tensor, start: int) -> np.ndarray:
    """Locations relative to `start`, as uint16 when every entry fits (delphi's choice), else
    uint32."""
    relative = locations.numpy().astype(np.int64)
    relative[:, 2] -= start
    fits = len(relative) == 0 or relative.max() < 2**16
    return relative.astype(np.uint16 if fits else np.uint32)


class Scan(NamedTuple):
    """What `scan` recorded: each SAE's entries per shard, and the contexts they come from."""

    entries: dict[tuple[int, int], list[tuple[Tensor, Tensor]]]
    """(layer, k) -> per shard, (locations [N, 3] int32 absolute, activations [N] float16)."""
    tokens: Tensor
    """[contexts, ctx_len] the clean token ids."""
    masked: Tensor
    """[contexts, ctx_len] bool: masked in the model's input."""
    mask_ratio: Tensor
    """[contexts] the mask probability of each context."""


@torch.no_grad()
def scan(
    base: BaseModel,
    saes: dict[tuple[int, int], TopKSAE],
    info: SuiteInfo,
    data: DataConfig,
    rows: int,
    n_splits: int,
    seed: int = 0,
) -> Scan:
    """Read up to `rows` contexts of `data`, corrupted under the suite's policy and corruption,
    and record every SAE's non-zero activations at the selected positions, by latent shard.

    One forward per batch serves every SAE; entries stream into per-shard lists, 14 bytes per
    activation (an int32 location triple and a float16): at most k per selected position (k = 32
    on the 27 % masked positions of 1M tokens: ~120 MB per SAE), plus the tokens.
    """
    ends = {
        key: torch.tensor([end for _, end in split_edges(sae.d_sae, n_splits)])
        for key, sae in saes.items()
    }
    entries = {key: [([], []) for _ in range(n_splits)] for key in saes}
    tokens, masked, ratios = [], [], []
    layers = sorted({layer for layer, _ in saes})
    batches = harvest_text(
        base, data, layers, info.policy, info.corruption, rows * data.ctx_len, seed
    )
    with tqdm(total=rows, desc="delphi cache", unit="ctx") as bar:
        for input_ids, _, h in batches:
            first, n = bar.n, min(len(input_ids), rows - bar.n)
            kept = h.positions[:, 0] < n
            tokens.append(input_ids[:n].cpu())
            masked.append(h.batch.is_masked[:n].cpu())
            ratios.append(h.batch.p[:n].float().cpu())
            for (layer, k), sae in saes.items():
                locations, values = _fired(sae, h.acts[layer][kept], h.positions[kept], first)
                shard = torch.bucketize(locations[:, 2].contiguous(), ends[layer, k])
                for i, (locs, vals) in enumerate(entries[layer, k]):
                    locs.append(locations[shard == i])
                    vals.append(values[shard == i])
            bar.update(n)
            if bar.n >= rows:
                break
    if not tokens:
        raise ValueError(
            f"{data.corpus!r} ({data.split}) holds less than one batch of {data.batch_size} x "
            f"{data.ctx_len} tokens; give a larger corpus with --corpus."
        )
    for shards in entries.values():  # one shard's pieces at a time: never twice the entries
        for i, (locs, vals) in enumerate(shards):
            shards[i] = (torch.cat(locs), torch.cat(vals))
    return Scan(entries, torch.cat(tokens), torch.cat(masked), torch.cat(ratios))


def _write_hookpoint(
    folder: Path, result: Scan, key: tuple[int, int], edges: list[tuple[int, int]], config: dict
) -> None:
    """One SAE's shards and config.json in `folder`, as delphi's save_splits / save_config."""
    folder.mkdir(parents=True)
    common = {
        "tokens": result.tokens.numpy(),
        "masked": result.masked.numpy(),
        "mask_ratio": result.mask_ratio.numpy(),
    }
    for (start, end), (locations, values) in zip(edges, result.entries[key], strict=True):
        shard = {"locations": _shard(locations, start), "activations": values.numpy(), **common}
        (folder / f"{start}_{end}.safetensors").write_bytes(save(shard))
    write_json(folder / "config.json", config)


def export_delphi(
    suite: str | Path,
    out: str | Path,
    layer: int | None = None,
    k: int | None = None,
    options: DelphiExport | None = None,
) -> list[Path]:
    """Write delphi's latent cache of a local suite's SAEs (all, or those `layer` / `k` pick)
    into the new folder `out`; returns the hookpoint folders written."""
    options = options or DelphiExport()
    root = Path(suite).expanduser()
    if not (root / SUITE_FILE).is_file():
        raise FileNotFoundError(
            f"{root} is not a local hub-sae suite (no {SUITE_FILE}): the delphi export reads the "
            "base model, policy and corruption from it. Give a suite folder (download a hub "
            "suite with `hf download REPO --local-dir DIR`)."
        )
    info = read_suite(root)
    check_policy(info.policy, family(info.base_model))
    rows = _check(options, info)
    folders = _pick(info, layer_folders(root, info), layer, k)
    data = info.heldout(options.corpus, options.split, options.seed)
    with new_folder(out) as target:
        saes = {
            key: TopKSAE.from_pretrained(folder, device=options.device).eval()
            for key, folder in folders.items()
        }
        for sae in saes.values():
            sae.require_resid_post("the delphi export")
        base = load_base_model(info.base_model, getattr(torch, info.dtype), options.device)
        result = scan(base, saes, info, data, rows, options.n_splits, options.seed)
        contexts = len(result.tokens)
        if contexts < rows:
            other = " (or its training text, --split train)" if data.split != "train" else ""
            print(
                f"note: {data.corpus!r} ({data.split}) has {contexts:,} contexts of "
                f"{data.ctx_len} tokens in full batches, fewer than --max-tokens asks for: "
                f"exported them all. For more examples per latent give a larger corpus with "
                f"--corpus{other}.",
                file=sys.stderr,
            )
        cache_config = {
            "dataset_repo": data.corpus,
            "dataset_split": data.split,
            "dataset_name": "",
            "dataset_column": data.text_field,
            "batch_size": data.batch_size,
            "cache_ctx_len": data.ctx_len,
            "n_tokens": contexts * data.ctx_len,
            "n_splits": options.n_splits,
            "model_name": HUB_IDS.get(info.base_model, info.base_model),
        }
        several_k = len({sae_k for _, sae_k in saes}) > 1
        written: list[Path] = []

        def fill(tmp: Path) -> None:
            for (sae_layer, sae_k), sae in saes.items():
                run = tmp / f"k_{sae_k}" if several_k else tmp
                folder = run / f"layers.{sae_layer}"
                hub_sae = {
                    "suite": str(root),
                    "layer": sae_layer,
                    "k": sae_k,
                    "hookpoint": sae.hookpoint,
                    "policy": info.policy,
                    "corruption": asdict(info.corruption),
                    "seed": options.seed,
                    "recorded": f"activations at the positions policy {info.policy!r} selects "
                    "only; each shard's `masked` [contexts, ctx_len] marks the masked tokens and "
                    "`mask_ratio` [contexts] the mask probability t of each context",
                }
                edges = split_edges(sae.d_sae, options.n_splits)
                config = {**cache_config, "hub_sae": hub_sae}
                _write_hookpoint(folder, result, (sae_layer, sae_k), edges, config)
                written.append(Path(out) / folder.relative_to(tmp))

        write_folder(target, fill)
    return written

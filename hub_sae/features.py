"""Per-latent statistics for feature pages: frequencies, activation histogram, examples by band,
logit effects.

Stored as `features.safetensors` beside each SAE's weights (F = d_sae, L = 2 * window + 1,
H = histogram bins, T = masking-ratio bins, E = 1 + bands example bands, S = slots, N = logit
tokens). Version 2 (metadata `version` "2"):

    frequency           [F] f32       share of the policy's scanned positions where the latent fired
    mean_activation     [F] f32       its mean activation where it fired there (0: never fired)
    histogram           [F, H] i64    its non-zero activations at the policy's positions, counted in
                                      the fixed log-spaced bins of `hist_edges` (below the first
                                      edge: bin 0; above the last: bin H - 1)
    hist_edges          [H + 1] f32   HIST_EDGES
    frequency_by_t      [F, T] f32    firing share at the policy's positions of the sequences whose
                                      masking ratio t lies in bin [t_edges[i], t_edges[i + 1])
                                      (t below / above the edges: the end bins)
    positions_by_t      [T] i64       the policy's positions scanned in each t bin
    t_edges             [T + 1] f32   hub_sae.masking.T_BINS' edges
    frequency_masked    [F] f32       firing share at every masked position (0 when none was seen)
    frequency_unmasked  [F] f32       firing share at every unmasked real position but BOS
    example_values      [F, E, S] f32 each example's activation, descending within a band (0: unused)
    example_ids         [F, E, S, L] i32  the CLEAN token ids around it, the example at index
                                      `window` (-1: outside the sequence, a pad, or unused)
    example_masked      [F, E, S, L] bool  which of those positions held the mask token in the
                                      model's input
    example_t           [F, E, S] f32 the masking ratio t of the example's sequence
    logit_top_ids, logit_top_values        [F, N] i64 / f32   the tokens its decoder row promotes,
    logit_bottom_ids, logit_bottom_values  [F, N] i64 / f32   and suppresses, strongest first

The metadata holds `version`, `tokens` (policy positions scanned), `positions_masked`,
`positions_unmasked`, `window`, `bands`, `slots`, `policy`, `corpus`, `base_model` and
`logit_effects` (how they were computed; the logit tensors are absent without an LM head).

Examples: band 0 holds the latent's top S activations. Band b in 1..bands holds S activations drawn
uniformly at random from quantile range [1 - b / bands, 1 - (b - 1) / bands] of its non-zero
activations (band 1: the highest); "drawn from" at the resolution of the reservoir bins (POOL
histogram bins each): every activation in the reservoir bins that hold the band's lowest and
highest ranked activations, and those between, is a candidate, unless a top example or a higher
band already shows it (bands share their boundary bins; an example is shown once, so a band
next to a shown one can hold fewer than S). Only the policy's positions give
examples, histogram, mean and frequency_by_t; the masked / unmasked shares read every real
position but BOS of the same corrupted batches.

One pass, memory flat in the number of tokens: per latent, the scan keeps counters, the top-S
heap, and for each of R = H / POOL reservoir bins a reservoir of S examples with uniform random
keys (the S largest keys seen in that bin). The S largest keys among a band's bins are a uniform
sample of the band without replacement, and they are all in those bins' reservoirs, so the bands
are picked exactly at the end. Kept per SAE: `state_bytes(F, window, slots)`
= F * (8 * (H + T + 4) + (1 + R) * S * (16 + 5 * L)) bytes: 16384 latents with window 8 and
5 slots (LLaDA's d_sae 16384): 305 MB per SAE, 1.8 GB for 6 layers; 1536 latents: 29 MB.

Logit effects: head(W_dec[f]) - head(0) over the token ids the tokenizer can write, with `head`
the base model's final norm + LM head (the fitted unmasking head for the embedded MiniLM); the
head at 0 is subtracted so the biases every latent shares cancel.

Version 1 files (no `version`: frequency, top_values, top_tokens, top_contexts holding the
corrupted input) load as one band of examples whose ids are that corrupted input with the clean
token at the example; every version-2-only field is None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from hub_sae.activations import capture
from hub_sae.data import DataConfig, token_batches
from hub_sae.io import write_atomic
from hub_sae.masking import T_BINS, Corruption, corrupt, select_positions
from hub_sae.models import BaseModel, vocab_limit

if TYPE_CHECKING:  # sae.py loads through formats.py, which reads suites: no import back
    from hub_sae.sae import TopKSAE

FEATURES_FILE = "features.safetensors"
VERSION = 2
HIST_EDGES = torch.logspace(-3, 3, 73)
"""Activation histogram edges: 72 log-spaced bins, 12 a decade, from 1e-3 to 1e3."""
POOL = 2
"""Histogram bins per reservoir bin (the resolution of the quantile bands)."""
LOGIT_TOKENS = 10
FEATURE_TOKENS = 32_768
"""Policy positions scanned when a suite names no feature_tokens."""
LIMITS = {"window": (0, 32), "bands": (1, 16), "slots": (1, 32)}
"""Inclusive bounds of the scan's sizes (they set its memory)."""

_V1 = ("frequency", "top_values", "top_tokens", "top_contexts")
_V2 = (
    "frequency",
    "mean_activation",
    "histogram",
    "hist_edges",
    "frequency_by_t",
    "positions_by_t",
    "t_edges",
    "frequency_masked",
    "frequency_unmasked",
    "example_values",
    "example_ids",
    "example_masked",
    "example_t",
)
_LOGITS = ("logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values")
_COUNTS = ("tokens", "positions_masked", "positions_unmasked")


@dataclass(frozen=True)
class FeatureStats:
    """One SAE's feature statistics (see the module docstring); v2-only fields are None in v1."""

    frequency: Tensor
    example_values: Tensor
    example_ids: Tensor
    tokens: int
    window: int
    version: int = VERSION
    policy: str | None = None
    corpus: str | None = None
    mean_activation: Tensor | None = None
    histogram: Tensor | None = None
    hist_edges: Tensor | None = None
    frequency_by_t: Tensor | None = None
    positions_by_t: Tensor | None = None
    t_edges: Tensor | None = None
    frequency_masked: Tensor | None = None
    frequency_unmasked: Tensor | None = None
    positions_masked: int | None = None
    positions_unmasked: int | None = None
    example_masked: Tensor | None = None
    example_t: Tensor | None = None
    logit_top_ids: Tensor | None = None
    logit_top_values: Tensor | None = None
    logit_bottom_ids: Tensor | None = None
    logit_bottom_values: Tensor | None = None

    @property
    def bands(self) -> int:
        """Quantile bands beside the top examples (0 in a version 1 file)."""
        return self.example_values.shape[1] - 1

    @property
    def top_values(self) -> Tensor:
        """[F, S] the top activations (band 0), descending."""
        return self.example_values[:, 0]

    @property
    def top_tokens(self) -> Tensor:
        """[F, S] the clean token at each top example (-1: unused slot)."""
        return self.example_ids[:, 0, :, self.window].long()

    @property
    def top_contexts(self) -> Tensor:
        """[F, S, L] the ids around each top example (clean in version 2)."""
        return self.example_ids[:, 0].long()


def state_bytes(d_sae: int, window: int, slots: int) -> int:
    """Bytes the scan keeps per SAE: counters, the top-S heap and the reservoirs."""
    bins = len(HIST_EDGES) - 1
    length = 2 * window + 1
    counters = 8 * (bins + len(_t_edges()) - 1 + 4)
    return d_sae * (counters + (1 + bins // POOL) * slots * (12 + 5 * length))


def check_sizes(window: int, bands: int, slots: int) -> None:
    """Refuse sizes outside LIMITS, naming the bound."""
    for name, value in (("window", window), ("bands", bands), ("slots", slots)):
        low, high = LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(
                f"feature {name} must be a whole number in {low}..{high} (it bounds the scan's "
                f"memory); got {value!r}."
            )


def _t_edges() -> Tensor:

    return torch.tensor([T_BINS[0][0], *(high for _, high in T_BINS)])


def _windows(ids: Tensor, positions: Tensor, window: int, fill: int | bool) -> Tensor:
    """[n, 2 * window + 1] entries of `ids` [B, T] around each (batch, position) row, `fill` off
    the edge."""
    padded = torch.nn.functional.pad(ids, (window, window), value=fill)
    offsets = torch.arange(2 * window + 1, device=ids.device)
    return padded[positions[:, :1], positions[:, 1:] + offsets]


class _Slots:
    """Per group, the `size` candidates of largest key seen so far and their example."""

    def __init__(self, groups: int, size: int, length: int):
        self.key = torch.full((groups, size), float("-inf"))
        self.value = torch.zeros(groups, size)
        self.t = torch.zeros(groups, size)
        self.ids = torch.full((groups, size, length), -1, dtype=torch.int32)
        self.masked = torch.zeros(groups, size, length, dtype=torch.bool)

    def offer(self, group: Tensor, key: Tensor, value: Tensor, example: _Examples, row: Tensor):
        """Candidates: `group`, `key`, `value` per candidate, its example at `row` of `example`.
        A winning candidate takes the slot of an entry it pushes out; the others stay put."""
        size = self.key.shape[1]
        order = torch.argsort(key, descending=True)
        order = order[torch.argsort(group[order], stable=True)]
        group, key, value, row = group[order], key[order], value[order], row[order]
        first = torch.searchsorted(group, group)
        rank = torch.arange(len(group)) - first
        keep = rank < size  # only a group's `size` best candidates can enter
        group, key, value, row, rank = group[keep], key[keep], value[keep], row[keep], rank[keep]
        first = torch.searchsorted(group, group)
        touched, local = torch.unique_consecutive(group, return_inverse=True)
        keys = torch.cat([self.key[touched], torch.full((len(touched), size), float("-inf"))], 1)
        keys[local, size + rank] = key
        win = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, keys.topk(size, 1).indices, True)
        # each group's freed slots first, then the kept ones
        free = (~win[:, :size]).int().argsort(dim=1, descending=True, stable=True)
        won = win[local, size + rank]
        before = torch.cumsum(won, 0) - won.long()  # winners ahead in the flat order
        nth = before - before[first]  # ... and in the candidate's group
        group, local, nth, row = group[won], local[won], nth[won], row[won]
        slot = free[local, nth]
        self.key[group, slot] = key[won]
        self.value[group, slot] = value[won]
        self.t[group, slot] = example.t[row]
        self.ids[group, slot] = example.ids[row]
        self.masked[group, slot] = example.masked[row]


@dataclass
class _Examples:
    """The examples of a batch's policy rows: clean window ids, masked flags, t."""

    ids: Tensor
    masked: Tensor
    t: Tensor


class _Scan:
    """The running state of one SAE's feature scan (see the module docstring)."""

    def __init__(self, d_sae: int, window: int, slots: int, n_t: int):
        bins = len(HIST_EDGES) - 1
        self.fired = torch.zeros(d_sae, dtype=torch.long)
        self.sum = torch.zeros(d_sae, dtype=torch.float64)
        self.histogram = torch.zeros(d_sae, bins, dtype=torch.long)
        self.by_t = torch.zeros(d_sae, n_t, dtype=torch.long)
        self.masked = torch.zeros(d_sae, dtype=torch.long)
        self.unmasked = torch.zeros(d_sae, dtype=torch.long)
        length = 2 * window + 1
        self.top = _Slots(d_sae, slots, length)
        self.reservoir = _Slots(d_sae * (bins // POOL), slots, length)

    def add(
        self,
        acts: Tensor,
        latents: Tensor,
        policy_row: Tensor,
        masked_row: Tensor,
        t_bin: Tensor,
        example: _Examples,
        generator: torch.Generator,
    ) -> None:
        """One batch: `acts`/`latents` [n, k] of every scanned row; the policy rows' examples."""
        d_sae, n_t = self.by_t.shape
        fired = acts > 0
        rows = torch.arange(len(acts))[:, None].expand_as(acts)
        for counter, where in ((self.masked, masked_row), (self.unmasked, ~masked_row)):
            counter += torch.bincount(latents[fired & where[:, None]], minlength=d_sae)
        fired &= policy_row[:, None]
        lat, val, rows = latents[fired], acts[fired], rows[fired]
        self.fired += torch.bincount(lat, minlength=d_sae)
        self.sum.index_add_(0, lat, val.double())
        bins = self.histogram.shape[1]
        h = torch.bucketize(val, HIST_EDGES[1:-1], right=True)
        self.histogram.view(-1).index_add_(0, lat * bins + h, torch.ones_like(lat))
        self.by_t.view(-1).index_add_(0, lat * n_t + t_bin[rows], torch.ones_like(lat))
        # example rows are numbered among the policy rows
        example_row = (torch.cumsum(policy_row, 0) - 1)[rows]
        self.top.offer(lat, val, val, example, example_row)
        key = torch.rand(len(lat), generator=generator)
        self.reservoir.offer(lat * (bins // POOL) + h // POOL, key, val, example, example_row)

    def bands(self, bands: int) -> dict[str, Tensor]:
        """value, t, ids, masked [F, 1 + bands, S, ...]: band 0 (the top examples) and the
        quantile bands, each sorted by value, unused slots 0 (ids -1)."""
        d_sae, slots = self.top.key.shape
        pools = self.histogram.shape[1] // POOL
        cum = self.histogram.cumsum(1)
        n = cum[:, -1:]
        keys = self.reservoir.key.view(d_sae, pools * slots)
        pool_of = torch.arange(pools).repeat_interleave(slots)
        chosen, index = [self.top.key], [torch.arange(slots).expand(d_sae, -1)]
        # an example is shown once: not in a band when it is a top one (same activation), nor in
        # two bands whose reservoir bins overlap
        values = self.reservoir.value.view(d_sae, pools * slots)
        tops = self.top.value.masked_fill(torch.isinf(self.top.key), float("nan"))
        taken = (values[:, :, None] == tops[:, None, :]).any(-1)
        for b in range(1, bands + 1):
            low, high = n * (bands - b) // bands, n * (bands - b + 1) // bands  # ranks [low, high)
            first = torch.searchsorted(cum, low, right=True) // POOL
            last = torch.searchsorted(cum, (high - 1).clamp(min=0), right=True) // POOL
            inside = (pool_of >= first) & (pool_of <= last) & (high > low) & ~taken
            top = keys.masked_fill(~inside, float("-inf")).topk(slots, dim=1)
            taken.scatter_(
                1, top.indices, torch.isfinite(top.values) | taken.gather(1, top.indices)
            )
            chosen.append(top.values)
            index.append(top.indices)
        unused = torch.isinf(torch.stack(chosen, 1))
        out = {}
        for name in ("value", "t", "ids", "masked"):
            top, pooled = getattr(self.top, name), getattr(self.reservoir, name)
            pooled = pooled.view(d_sae, pools * slots, *top.shape[2:])
            parts = [_take(top if b == 0 else pooled, idx, 1) for b, idx in enumerate(index)]
            x = torch.stack(parts, 1)
            out[name] = x.masked_fill(_expand(unused, x), -1 if name == "ids" else 0)
        order = out["value"].argsort(dim=2, descending=True, stable=True)
        return {name: _take(x, order, 2) for name, x in out.items()}


def _expand(index: Tensor, like: Tensor) -> Tensor:
    """`index` with trailing dimensions of size 1 up to `like`'s rank."""
    return index.view(*index.shape, *[1] * (like.dim() - index.dim()))


def _take(x: Tensor, index: Tensor, dim: int) -> Tensor:
    """x gathered along `dim` by `index` (x's shape up to dim + 1), trailing dimensions kept."""
    index = _expand(index, x)
    return x.gather(dim, index.expand(*index.shape[: dim + 1], *x.shape[dim + 1 :]))


def unembed(base: BaseModel) -> nn.Module | None:
    """The model's final norm + output head (residual -> logits), or None without an LM head."""
    if not base.has_lm_head:
        return None
    inner = getattr(base.model, "model", None)
    transformer = getattr(inner, "transformer", None)
    if transformer is not None and "ln_f" in transformer:  # native LLaDA
        return nn.Sequential(transformer.ln_f, transformer.ff_out)
    if hasattr(inner, "norm") and hasattr(base.model, "lm_head"):  # Dream, HF decoders (Qwen2)
        return nn.Sequential(inner.norm, base.model.lm_head)
    if hasattr(inner, "final_norm") and hasattr(base.model, "head"):  # ModernBERT
        return nn.Sequential(inner.final_norm, base.model.head, base.model.decoder)
    for name in ("cls", "lm_head"):  # BERT-style and RoBERTa-style masked-LM heads
        if hasattr(base.model, name):
            return getattr(base.model, name)
    return base.model.get_output_embeddings()


@torch.no_grad()
def logit_effects(head: nn.Module, sae: TopKSAE, vocab: int, n: int = LOGIT_TOKENS) -> dict:
    """The `n` token ids (< `vocab`) each decoder row promotes and suppresses most, with values:
    head(W_dec[f]) - head(0) (module docstring)."""
    param = next(head.parameters())
    zero = head(torch.zeros(1, sae.d_in, device=param.device, dtype=param.dtype)).float()[0]
    out: dict[str, list[Tensor]] = {name: [] for name in _LOGITS}
    for rows in sae.W_dec.split(64):
        logits = head(rows.to(param.device, param.dtype)).float()[:, :vocab] - zero[:vocab]
        n = min(n, logits.shape[1])
        for side, sign in (("top", 1), ("bottom", -1)):
            values, ids = logits.mul_(sign).topk(n, dim=1)  # the second pass negates back
            out[f"logit_{side}_ids"].append(ids.cpu())
            out[f"logit_{side}_values"].append(values.cpu().mul_(sign))
    return {name: torch.cat(parts) for name, parts in out.items()}


def _logit_fields(base: BaseModel, saes: Mapping[object, TopKSAE]) -> dict[object, dict]:
    """Each SAE's logit effects, through the fitted head for the embedded MiniLM ({} without one)."""
    from hub_sae.models.unmasking import with_unmasking_head

    head = unembed(with_unmasking_head(base))
    if head is None:
        return {key: {} for key in saes}
    return {key: logit_effects(head, sae, vocab_limit(base)) for key, sae in saes.items()}


@torch.no_grad()
def collect_features(
    base: BaseModel,
    saes: Mapping[object, TopKSAE],
    policy: str,
    corruption: Corruption,
    data: DataConfig,
    max_tokens: int,
    window: int = 8,
    bands: int = 4,
    slots: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict[object, FeatureStats]:
    """Scan up to `max_tokens` policy-selected positions of `data` in one pass, the statistics of
    the module docstring for every latent.

    `saes` maps any key (e.g. (layer, k)) to an SAE taking raw activations of block `sae.layer`;
    all layers are read from one forward per batch. `progress` shows a tqdm bar over the positions.
    """
    from tqdm.auto import tqdm

    check_sizes(window, bands, slots)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number >= 1; got {max_tokens!r}.")
    layers = sorted({sae.require_resid_post("collect_features").layer for sae in saes.values()})
    t_edges = _t_edges()
    scans = {key: _Scan(sae.d_sae, window, slots, len(t_edges) - 1) for key, sae in saes.items()}
    counts = {"tokens": 0, "positions_masked": 0, "positions_unmasked": 0}
    by_t = torch.zeros(len(t_edges) - 1, dtype=torch.long)
    device_gen = torch.Generator(base.device).manual_seed(seed)
    key_gen = torch.Generator().manual_seed(seed)
    batches = token_batches(data, base.tokenizer, base.bos_token_id, base.eos_token_id)
    with tqdm(total=max_tokens, desc="features", unit="pos", disable=not progress) as bar:
        for input_ids, attention_mask in batches:
            input_ids, attention_mask = input_ids.to(base.device), attention_mask.to(base.device)
            batch = corrupt(
                input_ids, attention_mask, base.mask_token_id, policy, corruption, device_gen
            )
            real = select_positions(batch.is_masked, attention_mask, "all")
            # the last batch stops before the policy position past max_tokens
            policy_row = batch.selected[real]
            before = torch.cumsum(policy_row, 0) - policy_row.long()
            real[real.clone()] = before < max_tokens - counts["tokens"]
            positions = real.nonzero()
            policy_row = batch.selected[real].cpu()
            masked_row = batch.is_masked[real].cpu()
            t = batch.p.float().cpu()[positions[:, 0].cpu()]
            t_bin = torch.bucketize(t, t_edges[1:-1], right=True)
            clean = input_ids.masked_fill(attention_mask == 0, -1)
            picked = positions[policy_row.to(positions.device)]
            example = _Examples(
                _windows(clean, picked, window, -1).int().cpu(),
                _windows(batch.is_masked, picked, window, False).cpu(),
                t[policy_row],
            )
            acts = capture(base, batch.input_ids, attention_mask, layers, real)
            for key, sae in saes.items():
                enc = sae.encode(acts[sae.layer].to(sae.W_dec.device, sae.W_dec.dtype))
                scans[key].add(
                    enc.top_acts.float().cpu(),
                    enc.top_indices.cpu(),
                    policy_row,
                    masked_row,
                    t_bin,
                    example,
                    key_gen,
                )
            n = int(policy_row.sum())
            counts["tokens"] += n
            counts["positions_masked"] += int(masked_row.sum())
            counts["positions_unmasked"] += int((~masked_row).sum())
            by_t += torch.bincount(t_bin[policy_row], minlength=len(by_t))
            bar.update(n)
            if counts["tokens"] >= max_tokens:
                break
    if counts["tokens"] == 0:
        raise ValueError(
            f"no {policy!r} positions in {data.corpus!r} ({data.split}); give more text."
        )
    logits = _logit_fields(base, saes)
    return {
        key: _stats(scan, bands, window, counts, by_t, t_edges, policy, data.corpus, logits[key])
        for key, scan in scans.items()
    }


def _share(count: Tensor, total: Tensor | int) -> Tensor:
    """count / total as float32, 0 where total is 0."""
    total = torch.as_tensor(total, dtype=torch.float64)
    return torch.where(total > 0, count / total.clamp(min=1), 0.0).float()


def _stats(
    scan: _Scan,
    bands: int,
    window: int,
    counts: dict[str, int],
    by_t: Tensor,
    t_edges: Tensor,
    policy: str,
    corpus: str,
    logits: dict[str, Tensor],
) -> FeatureStats:
    picked = scan.bands(bands)
    return FeatureStats(
        frequency=_share(scan.fired, counts["tokens"]),
        example_values=picked["value"],
        example_ids=picked["ids"],
        tokens=counts["tokens"],
        window=window,
        policy=policy,
        corpus=corpus,
        mean_activation=_share(scan.sum, scan.fired),
        histogram=scan.histogram,
        hist_edges=HIST_EDGES.float(),
        frequency_by_t=_share(scan.by_t, by_t),
        positions_by_t=by_t.clone(),
        t_edges=t_edges.float(),
        frequency_masked=_share(scan.masked, counts["positions_masked"]),
        frequency_unmasked=_share(scan.unmasked, counts["positions_unmasked"]),
        positions_masked=counts["positions_masked"],
        positions_unmasked=counts["positions_unmasked"],
        example_masked=picked["masked"],
        example_t=picked["t"],
        **logits,
    )


def save_features(
    path: str | Path, stats: FeatureStats, metadata: dict[str, str] | None = None
) -> None:
    """Write version-2 `stats` to `path` atomically (`metadata` adds e.g. base_model)."""
    if stats.version != VERSION:
        raise ValueError(
            f"only version {VERSION} feature statistics are written; these are version "
            f"{stats.version}: regenerate them with `hub-sae features SUITE`."
        )
    names = _V2[1:] + (_LOGITS if stats.logit_top_ids is not None else ())
    tensors = {name: getattr(stats, name).contiguous() for name in ("frequency", *names)}
    meta = {
        **(metadata or {}),
        "version": str(VERSION),
        "window": str(stats.window),
        "bands": str(stats.bands),
        "slots": str(stats.example_values.shape[2]),
        "policy": str(stats.policy),
        "corpus": str(stats.corpus),
        "logit_effects": "head(W_dec[f]) - head(0), head: final norm + LM head"
        if stats.logit_top_ids is not None
        else "none: the base model has no LM head",
        **{name: str(getattr(stats, name)) for name in _COUNTS},
    }
    write_atomic(Path(path), save(tensors, metadata=meta))


def _bad(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid {FEATURES_FILE}: {problem}; regenerate it with "
        "`hub-sae features SUITE`."
    )


def _count(path: Path, meta: dict[str, str], name: str) -> int:
    text = meta.get(name, "")
    if not text.isdigit():
        raise _bad(path, f"its metadata {name!r} is {text or 'missing'}, not a count")
    return int(text)


def load_features(path: str | Path) -> FeatureStats:
    """Read a features.safetensors file of version 1 or 2 (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; write feature statistics with `hub-sae features SUITE`."
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise _bad(path, f"safetensors cannot read it ({e})") from None
    version = meta.get("version", "1")
    if version not in ("1", str(VERSION)):
        raise ValueError(
            f"{path} holds feature statistics version {version!r}; this hub-sae reads versions 1 "
            f"and {VERSION}: upgrade hub-sae."
        )
    window = _count(path, meta, "window")
    required = _V1 if version == "1" else _V2 + (_LOGITS if _LOGITS[0] in t else ())
    missing = [name for name in required if name not in t]
    if missing:
        raise _bad(path, f"version {version} needs the tensors {missing}")
    if version == "1":
        return _from_v1(path, t, _count(path, meta, "tokens"), window, meta.get("policy"))
    stats = FeatureStats(
        **{name: t[name] for name in required},
        **{name: _count(path, meta, name) for name in _COUNTS},
        window=window,
        policy=meta.get("policy"),
        corpus=meta.get("corpus"),
    )
    _check_shapes(path, stats)
    return stats


def _from_v1(
    path: Path, t: dict[str, Tensor], tokens: int, window: int, policy: str | None
) -> FeatureStats:
    """A version 1 file as one band: the corrupted contexts with the clean token at the example."""
    f, slots = t["top_values"].shape
    if t["frequency"].shape != (f,) or t["top_contexts"].shape != (f, slots, 2 * window + 1):
        raise _bad(path, "its tensors' shapes disagree with each other and with its window")
    ids = t["top_contexts"].clone()
    ids[..., window] = t["top_tokens"]
    return FeatureStats(
        frequency=t["frequency"].float(),
        example_values=t["top_values"].float()[:, None],
        example_ids=ids.int()[:, None],
        tokens=tokens,
        window=window,
        version=1,
        policy=policy,
    )


def _check_shapes(path: Path, s: FeatureStats) -> None:
    """Every tensor's shape against d_sae, the bins, bands, slots and window of the file."""
    f = len(s.frequency)
    e, slots = s.example_values.shape[1:] if s.example_values.dim() == 3 else (0, 0)
    h, n_t = len(s.hist_edges) - 1, len(s.t_edges) - 1
    length = 2 * s.window + 1
    expected = {
        "frequency": (f,),
        "mean_activation": (f,),
        "histogram": (f, h),
        "frequency_by_t": (f, n_t),
        "positions_by_t": (n_t,),
        "frequency_masked": (f,),
        "frequency_unmasked": (f,),
        "example_values": (f, e, slots),
        "example_ids": (f, e, slots, length),
        "example_masked": (f, e, slots, length),
        "example_t": (f, e, slots),
    }
    if s.logit_top_ids is not None:
        n = s.logit_top_ids.shape[-1]
        expected.update(dict.fromkeys(_LOGITS, (f, n)))
    wrong = [
        f"{name} {tuple(getattr(s, name).shape)} (expected {shape})"
        for name, shape in expected.items()
        if tuple(getattr(s, name).shape) != shape
    ]
    if wrong or e < 1 or h < 1 or n_t < 1:
        raise _bad(path, "shapes " + (", ".join(wrong) or "without bins, bands or slots"))

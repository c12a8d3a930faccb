"""Held-out evaluation of SAEs: FVU, L0, dead latents, density, spliced losses, and all of it by
masking ratio t. `METRICS` names each number of metrics.json and says what it means.

Two spliced losses, never to be confused:
- `policy_splice_*` (hub-sae's): block L's output at the policy's positions only is replaced by the
  reconstruction (and, for reference, by zeros); masked-token cross entropy weighted 1/t.
- `dlm_scope_delta_lm_*` (DLM-Scope's definition, comparable with their paper): the reconstruction
  replaces block L's output at ALL positions; `mask`: cross entropy at masked positions weighted
  1/t, `unmask`: at unmasked positions weighted 1/(1 - t); minus the same without the SAE,
  averaged over t in the training range [0.05, 0.5].
An autoregressive model (family ar) runs the clean policy only: its spliced loss is next-token
cross entropy (`next_token_*`) and it has no metrics by t. Every cross entropy scores token j with
`BaseModel.align`ed logits, i.e. with the logits at j - 1 for shifted families (Dream, ar).
Models without an LM head get the cosine and relative MSE of their final hidden state instead; the
embedded default (MiniLM) gets a fitted unmasking head (`models.unmasking`) so it has losses.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hub_sae.activations import capture, harvest_text, splice
from hub_sae.data import DataConfig, token_batches
from hub_sae.io import read_json_object
from hub_sae.masking import T_BINS, CorruptedBatch, Corruption, check_policy, corrupt
from hub_sae.models import BaseModel, family, load_base_model
from hub_sae.models.unmasking import with_unmasking_head
from hub_sae.sae import TopKSAE

if TYPE_CHECKING:
    from hub_sae.suite import SuiteInfo

SUMMARY_FILE = "metrics.json"
"""The suite-level summary `hub-sae eval` writes at the root (per-SAE metrics stay in layer folders)."""


class Metric(NamedTuple):
    """A number of metrics.json: its key, a short label for tables and what it measures."""

    key: str
    label: str
    fmt: str
    meaning: str


METRICS = (
    Metric("fvu", "FVU", ".3f", "fraction of variance unexplained at the policy's positions"),
    Metric("variance_explained", "variance explained", ".3f", "1 - FVU"),
    Metric("l0", "L0", ".1f", "active latents per position"),
    Metric("dead_share", "dead latents", ".1%", "share of latents that never fired held out"),
    Metric(
        "dlm_scope_delta_lm_mask",
        "DLM-Scope delta LM (mask)",
        ".4f",
        "DLM-Scope's spliced loss: reconstruction at ALL positions, masked-token cross entropy "
        "weighted 1/t, minus the clean one; mean over t in [0.05, 0.5]",
    ),
    Metric(
        "dlm_scope_delta_lm_unmask",
        "DLM-Scope delta LM (unmask)",
        ".4f",
        "as above at the unmasked positions, weighted 1/(1 - t)",
    ),
    Metric(
        "policy_splice_delta_ce",
        "delta CE (policy splice)",
        ".4f",
        "hub-sae's spliced loss: reconstruction at the policy's positions only, masked-token "
        "cross entropy weighted 1/t, minus the clean one",
    ),
    Metric(
        "policy_splice_loss_recovered",
        "loss recovered (policy splice)",
        ".3f",
        "share of the zero-ablation loss increase that the policy splice avoids",
    ),
    Metric(
        "next_token_delta_ce",
        "delta next-token CE",
        ".4f",
        "autoregressive models (clean policy): next-token cross entropy over every real token but "
        "the first, with the reconstruction spliced in at all of them, minus the clean one",
    ),
    Metric(
        "next_token_loss_recovered",
        "loss recovered (next token)",
        ".3f",
        "autoregressive models: share of the zero-ablation next-token loss increase the splice avoids",
    ),
    Metric(
        "output_recovered",
        "output recovered (policy splice)",
        ".3f",
        "models without an LM head: 1 - relative MSE of the final hidden state, spliced vs zeroed",
    ),
    Metric(
        "cosine_spliced",
        "cosine to clean output (policy splice)",
        ".4f",
        "models without an LM head: cosine of the spliced final hidden state to the clean one",
    ),
)
TRAINING_RANGE = (0.05, 0.5)

DENSITY_BINS = torch.linspace(-6, 0, 13)
"""log10 firing-frequency bin edges of the density histogram (never-firing latents counted apart)."""


class _Moments:
    """Running sums for FVU: squared error, sum of x, sum of ||x||^2."""

    def __init__(self, d: int):
        self.n, self.sq_err, self.sum, self.sum_sq = (
            0,
            0.0,
            torch.zeros(d, dtype=torch.float64),
            0.0,
        )

    def add(self, x: Tensor, x_hat: Tensor) -> None:
        x64 = x.double()
        self.n += len(x)
        self.sq_err += (x64 - x_hat.double()).pow(2).sum().item()
        self.sum += x64.sum(0).cpu()
        self.sum_sq += x64.pow(2).sum().item()

    def fvu(self) -> float:
        if self.n < 2:
            return math.nan
        total = self.sum_sq - self.sum.pow(2).sum().item() / self.n
        return self.sq_err / total


def _token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """[B, T] cross entropy of each target token under aligned logits (row j scores token j)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return ce.view_as(targets)


def masked_lm_loss(logits: Tensor, targets: Tensor, batch: CorruptedBatch) -> Tensor:
    """LLaDA's objective: cross entropy on masked tokens weighted 1/p, averaged over real tokens.

    `logits` are aligned (`BaseModel.align`): row j scores token j."""
    weights = batch.is_masked.float() / batch.p.clamp_min(1e-6)[:, None]
    return (_token_ce(logits, targets) * weights).sum() / targets.numel()


def unmasked_lm_loss(logits: Tensor, targets: Tensor, batch: CorruptedBatch) -> Tensor:
    """DLM-Scope's unmask variant: cross entropy on visible tokens but BOS weighted 1/(1 - p).

    `logits` are aligned (`BaseModel.align`): row j scores token j."""
    visible = ~batch.is_masked
    visible[:, 0] = False
    weights = visible.float() / (1 - batch.p).clamp_min(1e-6)[:, None]
    return (_token_ce(logits, targets) * weights).sum() / targets.numel()


def next_token_loss(logits: Tensor, targets: Tensor, batch: CorruptedBatch) -> Tensor:
    """An autoregressive model's loss: mean cross entropy over the selected tokens (every real
    token but the first under the clean policy), each predicted by aligned logits from the
    position before it."""
    selected = batch.selected.to(logits.device)
    return _token_ce(logits, targets)[selected].mean()


def predictions(base: BaseModel, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """`base.run`: logits aligned so row j scores token j (`BaseModel.align`), or without an LM
    head the final hidden state."""
    out = base.run(input_ids, attention_mask)
    return base.align(out) if base.has_lm_head else out


def _spliced(
    base: BaseModel, layer: int, fn: Callable[[Tensor], Tensor], batch: CorruptedBatch, mask: Tensor
) -> Tensor:
    """`predictions` of the corrupted batch with block `layer`'s output replaced by `fn` of it."""
    with splice(base, layer, fn):
        return predictions(base, batch.input_ids, mask)


@torch.no_grad()
def zero_ablated(
    base: BaseModel, layer: int, batch: CorruptedBatch, attention_mask: Tensor
) -> Tensor:
    """`predictions` with block `layer`'s output zeroed at the selected positions."""
    selected = batch.selected
    return _spliced(
        base, layer, lambda h: h.masked_fill(selected[..., None], 0), batch, attention_mask
    )


@torch.no_grad()
def splice_outputs(
    base: BaseModel,
    sae: TopKSAE,
    batch: CorruptedBatch,
    attention_mask: Tensor,
    clean: Tensor | None = None,
    zero: Tensor | None = None,
) -> dict[str, Tensor]:
    """The model's `predictions` clean, with the SAE spliced in at the selected positions, and
    zero-ablated. `clean` and `zero` (`zero_ablated` at the SAE's layer), when given, are this
    batch's, computed once for several SAEs: reused, not run again."""
    selected = batch.selected

    def with_reconstruction(h: Tensor) -> Tensor:
        h = h.clone()
        h[selected] = sae(h[selected].to(sae.device)).reconstruction.to(h.dtype)
        return h

    return {
        "clean": predictions(base, batch.input_ids, attention_mask) if clean is None else clean,
        "spliced": _spliced(base, sae.layer, with_reconstruction, batch, attention_mask),
        "zero": zero_ablated(base, sae.layer, batch, attention_mask) if zero is None else zero,
    }


def _splice_metrics(
    base: BaseModel,
    saes: dict[tuple[int, int], TopKSAE],
    batches: list[tuple[Tensor, Tensor, CorruptedBatch]],
    progress: bool = False,
) -> dict[tuple[int, int], dict]:
    """Spliced metrics per SAE. Per batch, one clean run serves every SAE and one zero-ablated
    run every k of a layer; each SAE adds its own spliced run."""
    sums: dict[tuple[int, int], dict[str, float]] = {key: {} for key in saes}
    layers = sorted({layer for layer, _ in saes})
    for input_ids, attention_mask, batch in tqdm(
        batches, desc="spliced runs", unit="batch", disable=not progress
    ):
        clean = predictions(base, batch.input_ids, attention_mask)
        for layer in layers:
            zero = zero_ablated(base, layer, batch, attention_mask)
            for key in (key for key in saes if key[0] == layer):
                out = splice_outputs(base, saes[key], batch, attention_mask, clean, zero)
                _add_splice_terms(sums[key], base, out, input_ids, attention_mask, batch)
    return {key: _splice_summary(values, len(batches)) for key, values in sums.items()}


def _add_splice_terms(
    sums: dict[str, float],
    base: BaseModel,
    out: dict[str, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    batch: CorruptedBatch,
) -> None:
    """Add one batch's spliced losses (or, without an LM head, output similarities) to `sums`."""

    def add(name: str, value: Tensor | float) -> None:
        sums[name] = sums.get(name, 0.0) + float(value)

    if base.has_lm_head:
        ar = base.family == "ar"
        prefix, loss = ("next_token", next_token_loss) if ar else ("policy_splice", masked_lm_loss)
        if (batch.selected if ar else batch.is_masked).any():
            for name, logits in out.items():
                add(f"{prefix}_ce_{name}", loss(logits, input_ids, batch))
    else:
        real = attention_mask.bool()
        clean = out["clean"][real].float()
        for name in ("spliced", "zero"):
            other = out[name][real].float()
            add(f"cosine_{name}", F.cosine_similarity(other, clean, dim=-1).mean())
            add(f"rel_mse_{name}", (other - clean).pow(2).sum() / clean.pow(2).sum())


def _splice_summary(sums: dict[str, float], n: int) -> dict:
    """Means over `n` batches and the derived numbers: delta CE, loss and output recovered."""
    metrics = {name: value / n for name, value in sums.items()}
    for prefix in ("policy_splice", "next_token"):
        if f"{prefix}_ce_clean" not in metrics:
            continue
        clean, spliced, zero = (metrics[f"{prefix}_ce_{r}"] for r in ("clean", "spliced", "zero"))
        gap = zero - clean
        metrics[f"{prefix}_loss_recovered"] = (zero - spliced) / gap if gap else math.nan
        metrics[f"{prefix}_delta_ce"] = spliced - clean
    if "rel_mse_zero" in metrics:
        metrics["output_recovered"] = 1 - metrics["rel_mse_spliced"] / metrics["rel_mse_zero"]
    return metrics


def _predictions_and_blocks(
    base: BaseModel, input_ids: Tensor, attention_mask: Tensor, layers: list[int]
) -> tuple[Tensor, dict[int, Tensor]]:
    """`predictions` and, read from the same forward, the outputs [B, T, d] of `layers`' blocks
    (what `capture` would return, without a forward of its own)."""
    acts: dict[int, Tensor] = {}

    def record(layer: int) -> Callable[[Tensor], Tensor]:
        def fn(h: Tensor) -> Tensor:
            acts[layer] = h.clone()
            return h

        return fn

    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(splice(base, layer, record(layer)))
        out = predictions(base, input_ids, attention_mask)
    return out, acts


class _BinSums:
    """Running sums of one SAE in one t bin, per position group (masked / unmasked)."""

    GROUPS = ("masked", "unmasked")

    def __init__(self, d: int):
        self.moments = {g: _Moments(d) for g in self.GROUPS}
        self.active = dict.fromkeys(self.GROUPS, 0.0)
        self.delta = {"mask": 0.0, "unmask": 0.0}
        self.t: list[float] = []

    def row(self, t_min: float, t_max: float) -> dict:
        n = len(self.t)
        row = {"t_min": t_min, "t_max": t_max, "t_mean": sum(self.t) / n}
        for g in self.GROUPS:
            tokens = self.moments[g].n
            row[f"{g}_tokens"] = tokens
            row[f"fvu_{g}"] = self.moments[g].fvu()
            row[f"l0_{g}"] = self.active[g] / tokens if tokens else math.nan
        row.update({f"dlm_scope_delta_lm_{v}": d / n for v, d in self.delta.items()})
        return row


@torch.no_grad()
def evaluate_by_t(
    base: BaseModel,
    saes: dict[tuple[int, int], TopKSAE],
    data: DataConfig,
    batches_per_bin: int = 1,
    seed: int = 0,
    bins: tuple[tuple[float, float], ...] = T_BINS,
) -> dict[tuple[int, int], list[dict]]:
    """Per SAE and bin of the masking ratio t: FVU and L0 at masked and at unmasked positions and
    DLM-Scope's spliced losses (with an LM head).

    Every bin reads the same `batches_per_bin` held-out batches, masked with one t ~ U(bin) per
    batch; the SAEs see every real position but BOS, whatever their training policy. An
    autoregressive model never saw masked inputs: it has no metrics by t.
    """
    if base.family == "ar":
        raise ValueError(
            f"{base.name} is autoregressive (family ar), never trained on masked inputs: metrics by "
            "masking ratio t mean nothing for it; evaluate it with by_t_batches=0"
        )
    batches = list(
        itertools.islice(
            token_batches(data, base.tokenizer, base.bos_token_id, base.eos_token_id),
            batches_per_bin,
        )
    )
    if not batches:
        raise ValueError(f"no held-out batch from {data.corpus!r} ({data.split}) to bin by t.")
    layers = sorted({layer for layer, _ in saes})
    generator = torch.Generator(base.device).manual_seed(seed)
    rows: dict[tuple[int, int], list[dict]] = {key: [] for key in saes}
    for t_min, t_max in bins:
        sums = {key: _BinSums(sae.d_in) for key, sae in saes.items()}
        for input_ids, attention_mask in batches:
            input_ids, attention_mask = input_ids.to(base.device), attention_mask.to(base.device)
            batch = corrupt(
                input_ids,
                attention_mask,
                base.mask_token_id,
                "all",
                Corruption(t_min=t_min, t_max=t_max),
                generator,
            )
            if base.has_lm_head:  # the clean run also yields the activations
                clean, acts = _predictions_and_blocks(base, batch.input_ids, attention_mask, layers)
            else:
                clean, acts = None, capture(base, batch.input_ids, attention_mask, layers)
            groups = {"masked": batch.is_masked, "unmasked": batch.selected & ~batch.is_masked}
            for (layer, k), sae in saes.items():
                h = acts[layer]
                out = sae(h.flatten(0, 1).to(sae.device, sae.dtype))
                recon = out.reconstruction.view_as(h).to(h.dtype)
                active = (out.latents.top_acts > 0).sum(-1).view(h.shape[:2]).cpu()
                bin_sums = sums[layer, k]
                bin_sums.t.append(float(batch.p[0]))
                for group, where in groups.items():
                    bin_sums.moments[group].add(h[where], recon[where])
                    bin_sums.active[group] += float(active[where.cpu()].sum())
                if clean is None:
                    continue
                with splice(base, layer, lambda _, recon=recon: recon):
                    spliced = predictions(base, batch.input_ids, attention_mask)
                for variant, loss in (("mask", masked_lm_loss), ("unmask", unmasked_lm_loss)):
                    delta = loss(spliced, input_ids, batch) - loss(clean, input_ids, batch)
                    bin_sums.delta[variant] += float(delta)
        for key, bin_sums in sums.items():
            row = bin_sums.row(t_min, t_max)
            if not base.has_lm_head:
                row = {name: v for name, v in row.items() if not name.startswith("dlm_scope")}
            rows[key].append(row)
    return rows


def by_t_summary(rows: list[dict]) -> dict[str, float]:
    """DLM-Scope's delta LM over the training range: the mean of the bins inside it."""
    inside = [
        r for r in rows if TRAINING_RANGE[0] <= r["t_min"] and r["t_max"] <= TRAINING_RANGE[1]
    ]
    return {
        key: sum(r[key] for r in inside) / len(inside)
        for key in ("dlm_scope_delta_lm_mask", "dlm_scope_delta_lm_unmask")
        if inside and key in inside[0]
    }


def density_histogram(frequency: Tensor) -> dict:
    """Histogram of log10 firing frequency; latents that never fired are counted as `never`."""
    fired = frequency[frequency > 0]
    counts = torch.histogram(fired.log10().clamp(-6, 0).double(), bins=DENSITY_BINS.double()).hist
    return {
        "log10_edges": DENSITY_BINS.tolist(),
        "counts": counts.long().tolist(),
        "never": int((frequency == 0).sum()),
    }


@torch.no_grad()
def evaluate_suite(
    base: BaseModel,
    saes: dict[tuple[int, int], TopKSAE],
    policy: str,
    corruption: Corruption,
    data: DataConfig,
    max_tokens: int,
    seed: int = 0,
    splice_batches: int = 4,
    by_t_batches: int = 1,
    progress: bool = True,
) -> dict[tuple[int, int], dict]:
    """Metrics per (layer, k) on held-out text; one base-model forward feeds every layer's SAEs.

    The embedded default gets its fitted unmasking head first (cached after the first fit), so
    its spliced losses are cross entropies; `by_t_batches` batches feed each t bin (0 and
    autoregressive models: none); `progress` shows tqdm bars over the held-out positions and the
    spliced runs.
    """
    for sae in saes.values():
        sae.require_resid_post("SAE-spliced evaluation")
    check_policy(policy, base.family)
    base = with_unmasking_head(base)
    layers = sorted({layer for layer, _ in saes})
    moments = {key: _Moments(sae.d_in) for key, sae in saes.items()}
    counts = {key: torch.zeros(sae.d_sae) for key, sae in saes.items()}
    l0 = dict.fromkeys(saes, 0.0)
    kept: list[tuple[Tensor, Tensor, CorruptedBatch]] = []
    tokens = 0
    for input_ids, attention_mask, h in harvest_text(
        base,
        data,
        layers,
        policy,
        corruption,
        max_tokens,
        seed,
        passes=None,
        progress="evaluation" if progress else None,
    ):
        if len(kept) < splice_batches:
            kept.append((input_ids.to(base.device), attention_mask.to(base.device), h.batch))
        for (layer, k), sae in saes.items():
            x = h.acts[layer].to(sae.device, sae.dtype)
            out = sae(x)
            moments[layer, k].add(x, out.reconstruction)
            acts, idx = out.latents
            counts[layer, k].index_add_(0, idx.flatten().cpu(), (acts > 0).flatten().float().cpu())
            l0[layer, k] += (acts > 0).sum().item()
        tokens += len(h.token_ids)
    if tokens == 0:
        raise ValueError(
            f"no held-out activations from {data.corpus!r} ({data.split}) under policy {policy!r}."
        )

    by_t = {}
    if by_t_batches and base.family != "ar":
        by_t = evaluate_by_t(base, saes, data, by_t_batches, seed)
    spliced = _splice_metrics(base, saes, kept, progress)
    metrics = {}
    for key in saes:
        frequency = counts[key] / tokens
        fvu = moments[key].fvu()
        metrics[key] = {
            "layer": key[0],
            "k": key[1],
            "tokens": tokens,
            "fvu": fvu,
            "variance_explained": 1 - fvu,
            "l0": l0[key] / tokens,
            "dead_share": float((frequency == 0).float().mean()),
            "density_histogram": density_histogram(frequency),
            **spliced[key],
        }
        if key in by_t:
            metrics[key].update(by_t_summary(by_t[key]), by_t=by_t[key])
    return metrics


def heldout_tokens(base: BaseModel, data: DataConfig, limit: int) -> int:
    """Tokens in one pass over `data` (full batches), counted until `limit`."""
    tokens = 0
    for _, attention_mask in token_batches(
        data, base.tokenizer, base.bos_token_id, base.eos_token_id
    ):
        tokens += int(attention_mask.sum())
        if tokens >= limit:
            break
    return tokens


def check_base_model(info: SuiteInfo, name: str) -> None:
    """Refuse a base model `name` that cannot run the suite's policy or, when it is not the
    suite's own, whose hidden size is not the SAEs' width: read from its config.json alone
    (fetched for a hub repo id), before any weights load."""
    from hub_sae.io import HubOptions, local_path
    from hub_sae.models import DEFAULT_MODEL
    from hub_sae.training.plan import model_shape

    check_policy(info.policy, family(name))
    if name == info.base_model:
        return
    if name != DEFAULT_MODEL and local_path(name) is None:
        HubOptions().snapshot(name, allow_patterns=["config.json"])
    width = model_shape(name).d_model
    if width != info.d_in:
        raise ValueError(
            f"{name} has width {width} (hidden size), but the suite's SAEs read activations of "
            f"width {info.d_in} ({info.base_model}): evaluate them on a checkpoint of width "
            f"{info.d_in}, such as a fine-tune of {info.base_model}."
        )


def _previous_metrics(path: Path) -> dict:
    """A layer's metrics.json before re-evaluation ({} when absent); a clear error when unreadable."""
    if not path.is_file():
        return {}
    return read_json_object(path, "delete it and evaluate again.")


def evaluate_saved_suite(
    root: Path,
    max_tokens: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    corpus: str | None = None,
    split: str | None = None,
    seed: int = 0,
    base_model: str | None = None,
) -> dict[tuple[int, int], dict]:
    """Re-measure every SAE of a suite on held-out text under its policy and corruption.

    Writes each layer's metrics.json (keys not measured here, e.g. `train_dead_share`, are kept)
    and the summary metrics.json at the root, only once every SAE is evaluated; returns the metrics
    per (layer, k). Nothing is read or written outside `root`. The suite's lock (the trainer's run
    lock) is held throughout: a run rewriting it, or another writer, stops the evaluation at once.
    `base_model` (default: the suite's) measures the SAEs on another checkpoint of the same width,
    e.g. a fine-tune; the summary's `eval.base_model` names the model measured on.
    """
    from hub_sae.io import folder_lock

    fix = "a training run or another command is writing it: wait for it to finish, then evaluate."
    with folder_lock(root, fix):
        return _evaluate_saved_suite(
            root, max_tokens, device, dtype, corpus, split, seed, base_model
        )


def _evaluate_saved_suite(
    root: Path,
    max_tokens: int | None,
    device: str,
    dtype: str | None,
    corpus: str | None,
    split: str | None,
    seed: int,
    base_model: str | None,
) -> dict[tuple[int, int], dict]:
    """`evaluate_saved_suite`, under the suite's lock."""
    from hub_sae.io import write_json
    from hub_sae.suite import DTYPES, layer_folders, read_suite

    info = read_suite(root)
    model = base_model or info.base_model
    check_base_model(info, model)
    max_tokens = info.eval_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(
            f"max_tokens (--max-tokens) must be a positive integer, not {max_tokens!r}."
        )
    dtype = dtype or info.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    data = info.heldout(corpus, split, seed)
    folders = layer_folders(root, info)
    previous = {key: _previous_metrics(folder / "metrics.json") for key, folder in folders.items()}
    base = load_base_model(model, dtype=getattr(torch, dtype), device=device)
    if data.ctx_len > base.max_length:
        raise ValueError(
            f"{root / 'suite.json'}: `training.ctx_len` {data.ctx_len} exceeds "
            f"{model}'s maximum of {base.max_length} tokens; set it to "
            f"{base.max_length} or less (the trainer refuses longer contexts too)."
        )
    split_tokens = heldout_tokens(base, data, max_tokens)
    if split_tokens == 0:
        raise ValueError(
            f"the held-out split ({data.corpus!r}, {data.split}) holds less than one batch of "
            f"{data.batch_size} x {data.ctx_len} tokens; give a larger corpus with --corpus."
        )
    if split_tokens < max_tokens:  # more would only recycle the same text with new masks
        print(
            f"note: the held-out split ({data.corpus!r}, {data.split}) has {split_tokens:,} "
            f"tokens in full batches of {data.batch_size} x {data.ctx_len}, fewer than "
            f"--max-tokens {max_tokens:,}: evaluating {split_tokens:,}. Give a larger corpus "
            "(--corpus) to measure more.",
            file=sys.stderr,
        )
        max_tokens = split_tokens
    saes = {
        key: TopKSAE.from_pretrained(folder, device=device).eval()
        for key, folder in folders.items()
    }
    metrics = evaluate_suite(base, saes, info.policy, info.corruption, data, max_tokens, seed=seed)
    for key, values in metrics.items():
        write_json(folders[key] / "metrics.json", {**previous[key], **values})
    settings = {
        "base_model": model,
        "corpus": data.corpus,
        "split": data.split,
        "ctx_len": data.ctx_len,
        "batch_size": data.batch_size,
        "max_tokens": max_tokens,
        "seed": seed,
        "policy": info.policy,
        "corruption": asdict(info.corruption),
        "dtype": dtype,
        "device": str(device),
    }
    results = [
        {
            "folder": folders[key].relative_to(root).as_posix(),
            "layer": key[0],
            "k": key[1],
            "tokens": values["tokens"],
            **{m.key: values[m.key] for m in METRICS if m.key in values},
        }
        for key, values in sorted(metrics.items())
    ]
    write_json(root / SUMMARY_FILE, {"eval": settings, "results": results})
    return metrics

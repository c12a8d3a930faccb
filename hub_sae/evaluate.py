"""Held-out evaluation of SAEs under their policy: FVU, L0, dead latents, density, spliced metrics.

Spliced metric: block L's output at the policy's positions is replaced by the SAE reconstruction
(and, for reference, by zeros) and the model's output is compared with the clean run:
- models with an LM head (LLaDA): masked-token cross entropy weighted 1/p, and the share of the
  zero-ablation loss increase the SAE recovers;
- encoders without a head (MiniLM): cosine and relative MSE of the final hidden state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hub_sae.activations import harvest_text, splice
from hub_sae.data import DataConfig
from hub_sae.masking import CorruptedBatch, Corruption
from hub_sae.models import BaseModel, load_base_model
from hub_sae.sae import TopKSAE

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
        total = self.sum_sq - self.sum.pow(2).sum().item() / self.n
        return self.sq_err / total


def masked_lm_loss(logits: Tensor, targets: Tensor, batch: CorruptedBatch) -> Tensor:
    """LLaDA's objective: cross entropy on masked tokens weighted 1/p, averaged over real tokens."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(
        targets
    )
    weights = batch.is_masked.float() / batch.p.clamp_min(1e-6)[:, None]
    return (ce * weights).sum() / targets.numel()


@torch.no_grad()
def splice_outputs(
    base: BaseModel, sae: TopKSAE, batch: CorruptedBatch, attention_mask: Tensor
) -> dict[str, Tensor]:
    """The model's output clean, with the SAE spliced in at the selected positions, and zero-ablated."""
    selected = batch.selected

    def with_reconstruction(h: Tensor) -> Tensor:
        h = h.clone()
        h[selected] = sae(h[selected].to(sae.device)).reconstruction.to(h.dtype)
        return h

    def with_zeros(h: Tensor) -> Tensor:
        return h.masked_fill(selected[..., None], 0)

    outputs = {"clean": base.run(batch.input_ids, attention_mask)}
    for name, fn in (("spliced", with_reconstruction), ("zero", with_zeros)):
        with splice(base, sae.layer, fn):
            outputs[name] = base.run(batch.input_ids, attention_mask)
    return outputs


def _splice_metrics(
    base: BaseModel, sae: TopKSAE, batches: list[tuple[Tensor, Tensor, CorruptedBatch]]
) -> dict:
    sums: dict[str, float] = {}

    def add(name: str, value: Tensor | float) -> None:
        sums[name] = sums.get(name, 0.0) + float(value)

    for input_ids, attention_mask, batch in batches:
        out = splice_outputs(base, sae, batch, attention_mask)
        if base.has_lm_head:
            if batch.is_masked.any():
                for name, logits in out.items():
                    add(f"ce_{name}", masked_lm_loss(logits, input_ids, batch))
        else:
            real = attention_mask.bool()
            clean = out["clean"][real].float()
            for name in ("spliced", "zero"):
                other = out[name][real].float()
                add(f"cosine_{name}", F.cosine_similarity(other, clean, dim=-1).mean())
                add(f"rel_mse_{name}", (other - clean).pow(2).sum() / clean.pow(2).sum())
    n = len(batches)
    metrics = {name: value / n for name, value in sums.items()}
    if "ce_clean" in metrics:
        gap = metrics["ce_zero"] - metrics["ce_clean"]
        metrics["loss_recovered"] = (
            (metrics["ce_zero"] - metrics["ce_spliced"]) / gap if gap else math.nan
        )
        metrics["delta_loss"] = metrics["ce_spliced"] - metrics["ce_clean"]
    if "rel_mse_zero" in metrics:
        metrics["output_recovered"] = 1 - metrics["rel_mse_spliced"] / metrics["rel_mse_zero"]
    return metrics


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
    progress: bool = True,
) -> dict[tuple[int, int], dict]:
    """Metrics per (layer, k) on held-out text; one base-model forward feeds every layer's SAEs.

    `progress` shows tqdm bars over the held-out positions and the spliced runs.
    """
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

    metrics = {}
    for key, sae in tqdm(saes.items(), desc="spliced runs", unit="sae", disable=not progress):
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
            **_splice_metrics(base, sae, kept),
        }
    return metrics


def evaluate_saved_suite(
    root: Path,
    max_tokens: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    corpus: str | None = None,
    split: str | None = None,
    seed: int = 0,
) -> dict[tuple[int, int], dict]:
    """Re-measure every SAE of a suite on held-out text under its policy and corruption.

    Writes each layer's metrics.json (keys not measured here, e.g. `train_dead_share`, are kept)
    and the summary metrics.json at the root; returns the metrics per (layer, k).
    """
    from hub_sae.cards import METRICS, SUMMARY_FILE
    from hub_sae.suite import SUITE_FILE, layer_folders, read_suite, write_json

    suite = read_suite(root)
    run = suite.get("training", {})
    if "corruption" not in suite:
        raise ValueError(f"{root / SUITE_FILE} has no `corruption` block; re-train with hub-sae.")
    data = DataConfig(
        corpus=corpus or run.get("eval_corpus") or run.get("corpus", "pydoc"),
        split=split or run.get("eval_split", "heldout"),
        text_field=run.get("text_field", "text"),
        ctx_len=run.get("ctx_len", 128),
        batch_size=run.get("llm_batch_size", 8),
        seed=seed,
    )
    dtype = dtype or run.get("dtype", "float32")
    max_tokens = max_tokens or run.get("eval_tokens", 16_384)
    base = load_base_model(suite["base_model"], dtype=getattr(torch, dtype), device=device)
    folders = layer_folders(root)
    saes = {
        key: TopKSAE.from_pretrained(folder, device=device).eval()
        for key, folder in folders.items()
    }
    corruption = Corruption(**suite["corruption"])
    metrics = evaluate_suite(base, saes, suite["policy"], corruption, data, max_tokens, seed=seed)
    for key, values in metrics.items():
        path = folders[key] / "metrics.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        write_json(path, {**previous, **values})
    settings = {
        "corpus": data.corpus,
        "split": data.split,
        "ctx_len": data.ctx_len,
        "batch_size": data.batch_size,
        "max_tokens": max_tokens,
        "seed": seed,
        "policy": suite["policy"],
        "corruption": suite["corruption"],
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

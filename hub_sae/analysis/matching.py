"""One-to-one matching of two SAEs' features by decoder cosine (`hub-sae analyze compare`).

Decoder rows are normalised; the cosine matrix (d_sae_a x d_sae_b) is filled in row chunks into
one float64 array, the form scipy's `linear_sum_assignment` works on; the assignment maximises the
summed cosine. Cost, measured on 2 CPU cores (random decoders, the hardest case; matching related
SAEs is several times faster): 1536 x 1536 (the embedded default) 0.1 s; 4096 x 4096 1.5 s;
8192 x 8192 9 s; 16384 x 16384 (DLM-Scope's SAEs) 33 s and 2 GiB for the matrix, about 4.5 GB peak.
Time grows as about n^2.5 and memory as n^2: beyond MAX_CELLS the match is refused, not attempted.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hub_sae.analysis.report import Report
from hub_sae.sae import TopKSAE

MAX_CELLS = 16384 * 16384
"""The largest cosine matrix matched (d_sae_a x d_sae_b): 2 GiB in float64, ~35 s (see above)."""
CHUNK = 1024
"""Rows of A per matrix product while the cosine matrix is filled."""
HISTOGRAM_EDGES = np.linspace(-1, 1, 81)


@dataclass
class FeatureMatch:
    """The one-to-one match of two SAEs' latents maximising the summed decoder cosine."""

    pairs: Tensor
    """[n, 2] long: (latent of A, latent of B), sorted by A; n = min(d_sae_a, d_sae_b)."""
    cosine: Tensor
    """[n] float32: the decoder cosine of each pair."""
    above: dict[float, float]
    """Share of the pairs whose cosine exceeds each threshold."""
    d_sae: tuple[int, int]
    """Latents of A and of B; the larger SAE's unpaired latents are left out."""

    @property
    def mean(self) -> float:
        """Mean cosine of the pairs."""
        return float(self.cosine.mean())


def _unit_rows(sae: TopKSAE) -> Tensor:
    return F.normalize(sae.W_dec.detach().float().cpu(), dim=1)


def check_thresholds(thresholds: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """`thresholds` as a tuple, each a finite cosine in [-1, 1], else a ValueError."""
    bad = [t for t in thresholds if not (math.isfinite(t) and -1 <= t <= 1)]
    if bad or not thresholds:
        raise ValueError(
            f"thresholds {list(thresholds)} must be one or more cosines between -1 and 1 "
            "(e.g. --thresholds 0.5 0.7 0.9)."
        )
    return tuple(float(t) for t in thresholds)


@torch.no_grad()
def match_features(
    sae_a: TopKSAE,
    sae_b: TopKSAE,
    thresholds: tuple[float, ...] = (0.5, 0.7, 0.9),
    max_cells: int = MAX_CELLS,
) -> FeatureMatch:
    """Match the latents of `sae_a` and `sae_b` one to one, maximising the summed cosine of their
    decoder rows (scipy.optimize.linear_sum_assignment), and the share of pairs above each of
    `thresholds`. With different d_sae, min(d_sae_a, d_sae_b) pairs are formed.

    The cosine matrix takes 8 bytes per cell; more than `max_cells` cells is refused.
    """
    from scipy.optimize import linear_sum_assignment

    thresholds = check_thresholds(thresholds)
    if sae_a.d_in != sae_b.d_in:
        raise ValueError(
            f"SAE A reads d_in={sae_a.d_in} activations and SAE B d_in={sae_b.d_in}: decoder "
            "directions of different widths cannot be compared. Match SAEs of models of the same "
            "width (e.g. base and instruct)."
        )
    d_a, d_b = sae_a.d_sae, sae_b.d_sae
    if d_a * d_b > max_cells:
        raise ValueError(
            f"matching {d_a:,} x {d_b:,} latents needs a {d_a * d_b * 8 / 2**30:.1f} GiB cosine "
            f"matrix and time growing as n^2.5; at most {max_cells:,} cells (16384 x 16384, "
            "2 GiB, ~35 s on 2 cores) are matched. With the memory to spare, call "
            "match_features(..., max_cells=...) with a larger limit."
        )
    a, b = _unit_rows(sae_a), _unit_rows(sae_b).T
    # Negated in place: the assignment then minimises, and scipy needs no second copy.
    cost = np.empty((d_a, d_b), dtype=np.float64)
    for start in range(0, d_a, CHUNK):
        cost[start : start + CHUNK] = (a[start : start + CHUNK] @ b).neg_().numpy()
    rows, cols = linear_sum_assignment(cost)
    cosine = torch.from_numpy(-cost[rows, cols]).float()
    pairs = torch.from_numpy(np.stack([rows, cols], axis=1)).long()
    above = {t: float((cosine > t).float().mean()) for t in thresholds}
    return FeatureMatch(pairs, cosine, above, (d_a, d_b))


def sae_keys(source: str | Path) -> dict[int, list[int]]:
    """{layer: sorted ks} of every SAE in a suite, release, SAE folder or hub repo (configs only)."""
    from hub_sae.formats import available_saes

    keys = available_saes(source)
    if not keys:
        raise ValueError(
            f"{source} holds no SAE with a known layer and k; give a hub-sae suite, a "
            "DLM-Scope (dictionary_learning) release, or sparsify / SAELens SAE folders."
        )
    return keys


def paired_keys(
    keys_a: dict[int, list[int]], keys_b: dict[int, list[int]]
) -> list[tuple[int, int, int]]:
    """(layer, k of A, k of B) for every layer both sides have: each common k with itself; a layer
    without a common k pairs each k of A with the nearest k of B (the smaller on a tie)."""
    pairs = []
    for layer in sorted(keys_a.keys() & keys_b.keys()):
        common = sorted(set(keys_a[layer]) & set(keys_b[layer]))
        if common:
            pairs += [(layer, k, k) for k in common]
        else:
            pairs += [
                (layer, k, min(keys_b[layer], key=lambda kb, k=k: (abs(kb - k), kb)))
                for k in keys_a[layer]
            ]
    return pairs


def _figure(results: list[dict], name_a: str, name_b: str):
    from matplotlib.figure import Figure

    layers = sorted({r["layer"] for r in results})
    columns = min(3, len(layers))
    grid = math.ceil(len(layers) / columns)
    figure = Figure(figsize=(4 * columns, 3 * grid), layout="constrained")
    axes = figure.subplots(grid, columns, squeeze=False).flatten()
    lowest = min(min(r["cosine"]) for r in results)
    for ax, layer in zip(axes, layers, strict=False):
        for r in (r for r in results if r["layer"] == layer):
            label = f"k={r['k_a']}" if r["k_a"] == r["k_b"] else f"k={r['k_a']} vs {r['k_b']}"
            ax.hist(r["cosine"], bins=HISTOGRAM_EDGES, histtype="step", label=label)
        ax.set(title=f"layer {layer}", xlabel="matched decoder cosine", ylabel="pairs")
        ax.set_xlim(min(0.0, lowest), 1)
        ax.legend(fontsize="small")
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    figure.suptitle(f"{name_a} vs {name_b}", fontsize="medium")
    return figure


def run_compare(args: argparse.Namespace) -> Report:
    """`hub-sae analyze compare SUITE_A SUITE_B`: match the features of every common (layer, k).

    Only the SAEs are read (no base model), from any layout `TopKSAE.from_pretrained` reads.
    """
    thresholds = check_thresholds(args.thresholds)
    name_a, name_b = str(args.suite_a), str(args.suite_b)
    keys_a, keys_b = sae_keys(name_a), sae_keys(name_b)
    pairs = paired_keys(keys_a, keys_b)
    if not pairs:
        raise ValueError(
            f"{name_a} (layers {list(keys_a)}) and {name_b} (layers {list(keys_b)}) share no "
            "layer: compare SAEs of the same layers."
        )
    results, notes = [], []
    for layer, k_a, k_b in pairs:
        sae_a = TopKSAE.from_pretrained(name_a, layer=layer, k=k_a)
        sae_b = TopKSAE.from_pretrained(name_b, layer=layer, k=k_b)
        match = match_features(sae_a, sae_b, thresholds)
        if k_a != k_b:
            notes.append(f"layer {layer}: no common k; A's k={k_a} is paired with B's k={k_b}.")
        if sae_a.d_sae != sae_b.d_sae:
            notes.append(
                f"layer {layer}, k={k_a}: {sae_a.d_sae} vs {sae_b.d_sae} latents; "
                f"{len(match.cosine)} pairs, the larger SAE's other latents are unmatched."
            )
        results.append(
            {
                "layer": layer,
                "k_a": k_a,
                "k_b": k_b,
                "d_sae_a": sae_a.d_sae,
                "d_sae_b": sae_b.d_sae,
                "mean_cosine": match.mean,
                "median_cosine": float(match.cosine.median()),
                "above": {str(t): share for t, share in match.above.items()},
                "latent_a": match.pairs[:, 0].tolist(),
                "latent_b": match.pairs[:, 1].tolist(),
                "cosine": [round(c, 6) for c in match.cosine.tolist()],
            }
        )
    header = "| layer | k (A) | k (B) | latents A × B | mean cosine | median | "
    header += " | ".join(f"cos > {t:g}" for t in thresholds) + " |"
    lines = [header, "|" + "---|" * (6 + len(thresholds))]
    for r in results:
        shares = " | ".join(f"{share:.1%}" for share in r["above"].values())
        lines.append(
            f"| {r['layer']} | {r['k_a']} | {r['k_b']} | {r['d_sae_a']} × {r['d_sae_b']} | "
            f"{r['mean_cosine']:.3f} | {r['median_cosine']:.3f} | {shares} |"
        )
    table = "\n".join([f"A: {name_a}  \nB: {name_b}", "", *lines, *(["", *notes] if notes else [])])
    data = {
        "suite_a": name_a,
        "suite_b": name_b,
        "thresholds": list(thresholds),
        "notes": notes,
        "results": results,
    }
    return Report("compare", data, table, _figure(results, name_a, name_b))

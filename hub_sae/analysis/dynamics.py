"""Decoding-order dynamics of SAE features on a Timeline (DESIGN.md "Analyses"), and
`hub-sae analyze order`, which compares them across samplers beside each decode's log-likelihood.

Which positions count: only those the decode fills, i.e. masked at one step at least. Prompt
positions are never masked, so they count neither as masked nor as committed, and neither does
padding. A position is committed at step s when it is no longer masked when step s runs.

A position's feature set at a step is its recorded top features (the decode's `top`, at most the
SAE's k) with activation > 0, so every Jaccard is that of top-N sets: with top < k a feature that
still fires but leaves the top N counts as a change. With top >= k the sets hold every active one.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from hub_sae.analysis.report import (
    SAMPLERS,
    Report,
    decode,
    open_suite,
    prompt_ids,
    read_prompts,
)
from hub_sae.diffusion import Generation, masked_log_likelihood

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("stable_masked", "stable_committed", "drift_after_commit", "top1_flip_rate")
COUNTS = ("masked_pairs", "committed_pairs", "committed_positions", "pairs")
"""How many terms each of METRICS averages, in the same order."""


class DecodingDynamics(NamedTuple):
    """DESIGN.md's four means, each NaN when no term qualifies, and the number of terms of each."""

    stable_masked: float
    """Mean Jaccard of a position's sets at steps s and s + 1 where it is masked at both."""
    stable_committed: float
    """Mean Jaccard of a position's sets at steps s and s + 1 where it is committed at both."""
    drift_after_commit: float
    """Mean 1 - Jaccard(set at its commit step, set at the last step) over the positions committed
    before the last step (one committed at the last step has no record after its commit)."""
    top1_flip_rate: float
    """Share of consecutive-step pairs of counted positions whose top-1 feature (none when nothing
    fires) changes; the commit step's pair included."""
    masked_pairs: int
    committed_pairs: int
    committed_positions: int
    pairs: int


def _jaccard(indices_a: Tensor, on_a: Tensor, indices_b: Tensor, on_b: Tensor) -> Tensor:
    """J of the sets {indices[..., i] : on[..., i]} elementwise over the leading dims, 1 when both
    are empty. A recorded set never repeats a feature (the top-k of one SAE)."""
    same = indices_a[..., :, None] == indices_b[..., None, :]
    inter = (same & on_a[..., :, None] & on_b[..., None, :]).sum((-2, -1))
    union = on_a.sum(-1) + on_b.sum(-1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1).double(), 1.0)


def _mean(values: Tensor, where: Tensor) -> tuple[float, int]:
    n = int(where.sum())
    return (float(values[where].mean()) if n else math.nan), n


def decoding_dynamics(generation: Generation, layer: int) -> DecodingDynamics:
    """The decoding dynamics of `layer`'s features over every row, counted position and pair of
    consecutive steps of `generation`'s Timeline (the module docstring says what counts)."""
    timeline = generation.timeline
    if layer not in timeline.layers:
        raise ValueError(
            f"the timeline recorded layers {sorted(timeline.layers)}, not {layer}: decode with "
            f"saes={{{layer}: sae}} and top >= 1."
        )
    trace = timeline.layers[layer]
    indices, on = trace.top_indices, trace.top_acts > 0  # [S, B, T, top]
    masked = timeline.masked  # [S, B, T]
    counted = masked.any(0)
    committed = counted & ~masked
    same = _jaccard(indices[:-1], on[:-1], indices[1:], on[1:])
    top1 = torch.where(on[..., 0], indices[..., 0], -1)
    flips = (top1[:-1] != top1[1:]).double()

    commit, last = timeline.commit_step, len(masked) - 1
    at = commit.clamp(0, last)[None, ..., None].expand(1, *indices.shape[1:])
    drift = 1 - _jaccard(indices.gather(0, at)[0], on.gather(0, at)[0], indices[-1], on[-1])
    means = (
        _mean(same, masked[:-1] & masked[1:]),
        _mean(same, committed[:-1] & committed[1:]),
        _mean(drift, (commit >= 0) & (commit < last)),
        _mean(flips, counted.expand_as(flips)),
    )
    return DecodingDynamics(*(m for m, _ in means), *(n for _, n in means))


def pool(parts: Sequence[DecodingDynamics]) -> DecodingDynamics:
    """Several decodes' dynamics as one: each mean over all their terms, as for rows of a batch."""
    counts = [sum(getattr(p, c) for p in parts) for c in COUNTS]
    means = [
        sum(getattr(p, m) * getattr(p, c) for p in parts if getattr(p, c)) / n if n else math.nan
        for m, c, n in zip(METRICS, COUNTS, counts, strict=True)
    ]
    return DecodingDynamics(*means, *counts)


def run_order(args: argparse.Namespace) -> Report:
    """`hub-sae analyze order`: each prompt decoded alone (no padding) by every sampler; per sampler
    the dynamics pooled over the prompts and the mean over prompts of `masked_log_likelihood` of
    each decode's new tokens."""

    prompts = read_prompts(args.prompts)
    if not 1 <= args.steps <= args.gen_length:
        raise ValueError(
            f"--steps {args.steps} with --gen-length {args.gen_length}: give 1 <= steps <= "
            "gen-length (a step that commits no token only repeats the last one)."
        )
    suite = open_suite(args.suite, k=args.k, device=args.device)
    base = suite.base
    if base.mask_token_id is None:
        raise ValueError(
            f"{base.name} is autoregressive (family {base.family}): `analyze order` compares "
            "diffusion samplers, which unmask a mask token; give a suite of a masked LM "
            "(families llada, dream, mlm)."
        )
    layer = args.layer
    if layer is None:
        layer = suite.info.default_layer if suite.info else sorted(suite.saes)[len(suite.saes) // 2]
    if layer not in suite.saes:
        raise ValueError(
            f"--layer {layer}: the suite has SAEs on layers {sorted(suite.saes)}; pick one."
        )
    sae = suite.saes[layer]
    top = min(args.top or sae.k, sae.k)
    block_length = args.block_length or args.gen_length

    samplers = {}
    for sampler in SAMPLERS:
        parts, likelihoods, outputs = [], [], []
        for i, text in enumerate(prompts):
            ids = prompt_ids(base, text)
            generation = decode(
                base,
                sampler,
                ids,
                args.gen_length,
                args.steps,
                block_length,
                {layer: sae},
                top,
                args.seed + i,
            )
            parts.append(decoding_dynamics(generation, layer))
            new = generation.timeline.commit_step[0] >= 0
            likelihoods.append(
                masked_log_likelihood(base, generation.tokens[0], new, seed=args.seed)
            )
            outputs.append(base.tokenizer.decode(generation.tokens[0, ids.shape[1] :]))
        samplers[sampler] = {
            **pool(parts)._asdict(),
            "log_likelihood": sum(likelihoods) / len(likelihoods),
            "outputs": outputs,
        }
    data = {
        "suite": str(args.suite),
        "base_model": base.name,
        "layer": layer,
        "k": sae.k,
        "top": top,
        "prompts": len(prompts),
        "gen_length": args.gen_length,
        "steps": args.steps,
        "block_length": block_length,
        "seed": args.seed,
        "samplers": samplers,
    }
    return Report("order", data, order_table(data), order_figure(data))


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def order_table(data: dict) -> str:
    """The samplers side by side, one row each: the four dynamics and the log-likelihood."""
    head = [*METRICS, "log_likelihood"]
    lines = [
        f"Layer {data['layer']}, k {data['k']}, top {data['top']} features, {data['prompts']} "
        f"prompts, {data['gen_length']} new tokens in {data['steps']} steps "
        f"(LLaDA blocks of {data['block_length']}).",
        "",
        "| sampler | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for sampler, row in data["samplers"].items():
        lines.append(f"| {sampler} | " + " | ".join(_cell(row[h]) for h in head) + " |")
    return "\n".join(lines) + "\n"


def order_figure(data: dict) -> Figure:
    """One bar chart per metric (and the log-likelihood), a bar per sampler."""
    from matplotlib.figure import Figure

    head = [*METRICS, "log_likelihood"]
    names = list(data["samplers"])
    figure = Figure(figsize=(3 * len(head), 3.4), layout="constrained")
    for axes, metric in zip(figure.subplots(1, len(head)), head, strict=True):
        values = [data["samplers"][n][metric] for n in names]
        axes.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        axes.set_title(metric, fontsize=10)
    figure.suptitle(
        f"Decoding dynamics by sampler: layer {data['layer']}, {data['prompts']} prompts, "
        f"{data['gen_length']} tokens in {data['steps']} steps"
    )
    return figure

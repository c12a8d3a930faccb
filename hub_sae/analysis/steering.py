"""DLM-Scope's steering sweep: decode prompts with one SAE feature steered at several values and
measure, per value, how much the output carries the feature and how fluent it stays.

For each value v and prompt, the decode runs with `Steer(layer, (feature,), v, mode, positions)` at
every step; D is the set of decoded positions (the prompt's own masks and the gen_length appended
ones). On the output:

    concept         mean over D of the feature's activation when the output runs clean (no mask)
                    through the model and the layer's SAE: a read-out independent of the steered pass
    log_likelihood  `masked_log_likelihood` of the output at D: the model's own mean log p per token
    repeated        share of D whose token equals the token at an earlier position of D

Each number is the mean over the prompts. The decodes of all values use the same random numbers,
so with mode relative or add, value 0 is the unsteered decode token for token.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import NamedTuple

from torch import Tensor

from hub_sae.activations import capture
from hub_sae.analysis.report import Report, decode, prompt_ids
from hub_sae.diffusion import (
    Steer,
    feature_acts,
    masked_log_likelihood,
)
from hub_sae.diffusion.steer import check_features
from hub_sae.models import BaseModel
from hub_sae.sae import TopKSAE

SAMPLERS = {"llada": "llada:low_confidence", "dream": "dream:entropy"}
"""LLaDA's `generate` (low_confidence remasking, one block) or Dream's `diffusion_generate`
(alg entropy), both greedy (temperature 0)."""
METRICS = {
    "concept": "concept: mean activation (clean re-encode)",
    "log_likelihood": "fluency: masked-token log-likelihood / token",
    "repeated": "repeated tokens (share)",
}


class SteeringPoint(NamedTuple):
    """One steering value: the decodes and their metrics, one entry per prompt."""

    value: float
    tokens: list[Tensor]
    """[T] the decoded sequence (prompt included)."""
    concept: list[float]
    log_likelihood: list[float]
    repeated: list[float]

    def mean(self, metric: str) -> float:
        """The metric's mean over the prompts."""
        return fmean(getattr(self, metric))


@dataclass
class SteeringSweep:
    """A steering sweep: one `SteeringPoint` per value, in the order given."""

    layer: int
    feature: int
    steers: list[Steer]
    """The steer of each value."""
    sampler: str
    decoded: list[Tensor]
    """Per prompt, [T] bool: the decoded positions D."""
    points: list[SteeringPoint]


def check_values(values: Sequence[float]) -> list[float]:
    """The steering values as floats; refuses an empty list and NaN / inf, naming the fix."""
    if not len(values):
        raise ValueError("no steering value given: pass at least one, e.g. --values 0 1 2 4 8.")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"steering values must be finite numbers; got {bad}: drop or replace them."
        )
    return [float(v) for v in values]


def concept_activation(
    base: BaseModel, sae: TopKSAE, tokens: Tensor, positions: Tensor, feature: int
) -> float:
    """Mean activation of `feature` at `positions` [T] bool of `tokens` [T], run clean (as given,
    no mask added) through `base` up to the SAE's layer and encoded by the SAE."""
    h = capture(base, tokens[None], None, [sae.layer])[sae.layer][0]
    return float(feature_acts(sae, h[positions.to(h.device)], [feature]).mean())


def repeated_share(tokens: Tensor) -> float:
    """Share of `tokens` [n] equal to an earlier one of them (nan when n = 0)."""
    seen: set[int] = set()
    repeats = 0
    for token in tokens.tolist():
        repeats += token in seen
        seen.add(token)
    return repeats / len(tokens) if len(tokens) else math.nan


def steering_sweep(
    base: BaseModel,
    saes: dict[int, TopKSAE],
    prompts: Sequence[str],
    layer: int,
    feature: int,
    values: Sequence[float],
    mode: str = "relative",
    positions: str = "all",
    top_positions: int = 1,
    sampler: str | None = None,
    gen_length: int = 32,
    steps: int = 32,
    draws: int = 8,
    seed: int = 0,
) -> SteeringSweep:
    """Decode every prompt (plus `gen_length` masks) once per steering value with `feature` of
    `layer` steered at every step (`Steer` says how `mode`, `positions` and `top_positions` act)
    and measure concept and fluency (module docstring). `sampler`: one of SAMPLERS (default:
    Dream's for the dream family, else LLaDA's)."""
    values = check_values(values)
    sampler = sampler or ("dream" if base.family == "dream" else "llada")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}.")
    if not prompts:
        raise ValueError("no prompt given: pass at least one.")
    if layer not in saes:
        raise ValueError(
            f"layer {layer} has no SAE here (layers with one: {sorted(saes)}): steer one of those."
        )
    saes = {layer: saes[layer]}
    check_features(saes[layer], layer, [feature], "Steer feature")
    steers = [
        Steer(layer, (feature,), v, mode, positions=positions, top_positions=top_positions)
        for v in values
    ]
    ids = [prompt_ids(base, p) for p in prompts]
    for number, prompt in enumerate(ids, 1):
        if not gen_length and not (prompt == base.mask_token_id).any():
            raise ValueError(
                f"prompt {number} holds no mask token and gen_length is 0: nothing to decode; "
                "generate some tokens (gen_length >= 1) or put masks in the prompt."
            )
    decoded: list[Tensor] = []
    points = []
    for steer in steers:
        outputs = [
            decode(
                base,
                SAMPLERS[sampler],
                prompt,
                gen_length,
                steps,
                max(gen_length, 1),
                saes,
                0,
                seed,
                steering=[steer],
            )
            for prompt in ids
        ]
        decoded = [out.timeline.masked[0, 0] for out in outputs]
        tokens = [out.tokens[0] for out in outputs]
        pairs = list(zip(tokens, decoded, strict=True))
        points.append(
            SteeringPoint(
                steer.value,
                tokens,
                [concept_activation(base, saes[layer], t, d, feature) for t, d in pairs],
                [masked_log_likelihood(base, t, d, draws, seed) for t, d in pairs],
                [repeated_share(t[d]) for t, d in pairs],
            )
        )
    return SteeringSweep(layer, feature, steers, sampler, decoded, points)


def steering_report(sweep: SteeringSweep, tokenizer) -> Report:
    """The sweep as a Report: a curve per metric against the value, a table with the first
    prompt's decoded text per value, and every number and text as JSON."""
    from matplotlib.figure import Figure

    steer = sweep.steers[0]
    texts = [
        [tokenizer.decode(t[d]) for t, d in zip(point.tokens, sweep.decoded, strict=True)]
        for point in sweep.points
    ]
    where = f"top {steer.top_positions}" if steer.positions == "top" else steer.positions
    title = (
        f"layer {sweep.layer}, feature {sweep.feature}: {steer.mode} steering at {where} "
        f"positions, {sweep.sampler} sampler"
    )
    header = "| value | concept | log-likelihood / token | repeated share | first prompt's output |"
    rows = [header, "|---:|---:|---:|---:|---|"]
    for point, text in zip(sweep.points, texts, strict=True):
        cells = [f"{point.mean(m):.3f}" for m in METRICS]
        shown = text[0].replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {point.value:g} | {' | '.join(cells)} | {shown} |")
    figure = Figure(figsize=(12, 3.5))
    values = [point.value for point in sweep.points]
    for ax, (metric, label) in zip(figure.subplots(1, len(METRICS)), METRICS.items(), strict=True):
        ax.plot(values, [point.mean(metric) for point in sweep.points], marker="o")
        ax.set(xlabel="steering value", title=label)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    data = {
        "layer": sweep.layer,
        "feature": sweep.feature,
        "mode": steer.mode,
        "positions": steer.positions,
        "top_positions": steer.top_positions,
        "sampler": sweep.sampler,
        "points": [
            {
                "value": point.value,
                **{metric: point.mean(metric) for metric in METRICS},
                "per_prompt": {metric: getattr(point, metric) for metric in METRICS},
                "outputs": text,
            }
            for point, text in zip(sweep.points, texts, strict=True)
        ],
    }
    return Report("steer", data, f"{title}\n\n" + "\n".join(rows), figure)


def run_steer(args: argparse.Namespace) -> Report:
    """`hub-sae analyze steer`: the sweep of --values on the prompts of --prompts."""
    from hub_sae.analysis.report import open_suite, read_prompts

    check_values(args.values)
    prompts = read_prompts(args.prompts)
    suite = open_suite(args.suite, k=args.k, device=args.device)
    sweep = steering_sweep(
        suite.base,
        suite.saes,
        prompts,
        args.layer,
        args.feature,
        args.values,
        mode=args.mode,
        positions=args.positions,
        top_positions=args.top_positions,
        sampler=args.sampler,
        gen_length=args.gen_length,
        steps=args.steps,
        seed=args.seed,
    )
    return steering_report(sweep, suite.base.tokenizer)

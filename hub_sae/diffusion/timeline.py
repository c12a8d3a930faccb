"""What both samplers share: the Timeline they record and the steering splices.

A `Recording` splices one recorder per SAE into the base model for the length of a decode: at each
step it applies the active `Steer`s, then records the top features of every position (and the
watched ones); the sampler tells it which positions it committed, and with what confidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import NamedTuple

import torch
from torch import Tensor

from hub_sae.activations import splice
from hub_sae.diffusion.checks import check_whole, whole_ids
from hub_sae.diffusion.steer import Steer, check_features, feature_acts, steer_residual
from hub_sae.models import BaseModel
from hub_sae.sae import TopKSAE


class LayerTrace(NamedTuple):
    """What one SAE saw at every step and position."""

    top_acts: Tensor
    """[steps, B, T, top] the strongest activations, descending."""
    top_indices: Tensor
    """[steps, B, T, top] their features."""
    watched: Tensor
    """[steps, B, T, len(watch)] activations of the watched features (0 when not in the top k)."""


class Timeline(NamedTuple):
    """Per step and position: masked or committed, and the top SAE features."""

    masked: Tensor
    """[steps, B, T] bool: still masked when step s ran (before its commits)."""
    commit_step: Tensor
    """[B, T] the step that committed each position; -1 if no step did."""
    confidence: Tensor
    """[B, T] the confidence it was committed with (nan if never)."""
    layers: dict[int, LayerTrace]
    watch: tuple[int, ...]


class Generation(NamedTuple):
    tokens: Tensor
    """[B, prompt + new tokens] the decoded sequences."""
    timeline: Timeline


def token_logits(base: BaseModel, logits: Tensor, vocab: int) -> Tensor:
    """Float32 logits [B, T, V] whose row i scores token i (`base.align`), with the mask token and
    ids >= vocab at -inf: the ids no sampler of hub-sae ever commits."""
    logits = base.align(logits.float())
    logits[..., vocab:] = float("-inf")
    logits[..., base.mask_token_id] = float("-inf")
    return logits


class _Recorder:
    """The splice function of one layer: steer, then record top features and watched ones."""

    def __init__(self, run: Recording, sae: TopKSAE, steers: list[Steer]):
        self.run, self.sae, self.steers = run, sae, steers
        self.acts: list[Tensor] = []
        self.indices: list[Tensor] = []
        self.watched: list[Tensor] = []

    def __call__(self, h: Tensor) -> Tensor:
        x, run = self.run.x, self.run
        for steer in self.steers:
            if steer.active(run.step, run.steps):
                where = steer.where(self.sae, h, x, run.mask_id)
                h = h.clone()
                h[where] = steer_residual(self.sae, h[where], steer)
        if run.top or run.watch:
            self.record(h[: len(x)])
        return h

    @torch.no_grad()
    def record(self, h: Tensor) -> None:
        flat = h.flatten(0, 1).to(self.sae.device, self.sae.dtype)
        top_acts, top_indices = self.sae.encode(flat)
        acts, order = top_acts.float().topk(min(self.run.top, top_acts.shape[-1]), dim=-1)
        shape = (*h.shape[:2], -1)
        self.acts.append(acts.view(shape).cpu())
        self.indices.append(top_indices.gather(-1, order).view(shape).cpu())
        watch = self.run.watch
        watched = feature_acts(self.sae, flat, watch) if watch else acts[:, :0]
        self.watched.append(watched.view(shape).cpu())

    def trace(self) -> LayerTrace:
        return LayerTrace(*(torch.stack(t) for t in (self.acts, self.indices, self.watched)))


class Recording:
    """The steering and the Timeline of one decode of x [B, T] in `steps` steps.

    While open (`with`), one recorder per SAE is spliced into `base`. Per step the sampler calls
    `begin(x, step)` before the model runs and `commit(transfer, confidence)` after its commits.
    """

    def __init__(
        self,
        base: BaseModel,
        x: Tensor,
        steps: int,
        saes: dict[int, TopKSAE] | None,
        steering: Sequence[Steer],
        top: int,
        watch: Sequence[int],
    ):
        saes = saes or {}
        for layer, sae in saes.items():
            sae.require_resid_post("decoding with SAEs (generate, diffusion_generate, Steer)")
            if sae.layer != layer:
                raise ValueError(
                    f"saes[{layer}] is an SAE of layer {sae.layer}: key each SAE by its own layer "
                    "({sae.layer: sae}), or it is spliced into the wrong block."
                )
        for steer in steering:
            steer.check(saes, x.shape[1], steps)
        self.top = check_whole("top", top, 0)
        watched = whole_ids("watch feature id", watch)
        self.watch = tuple(sorted({*watched, *(f for s in steering for f in s.features)}))
        for layer, sae in saes.items():
            check_features(sae, layer, self.watch, "watch feature")
        self.base, self.x, self.steps, self.step = base, x, steps, 0
        self.mask_id = base.mask_token_id
        self.recorders = {
            layer: _Recorder(self, sae, [s for s in steering if s.layer == layer])
            for layer, sae in saes.items()
        }
        self.masked: list[Tensor] = []
        self.commit_step = torch.full_like(x, -1)
        self.confidence = torch.full(x.shape, float("nan"), device=x.device)
        self._stack = ExitStack()

    def __enter__(self) -> Recording:
        for layer, recorder in self.recorders.items():
            self._stack.enter_context(splice(self.base, layer, recorder))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def begin(self, x: Tensor, step: int) -> Tensor:
        """Start step `step` on x; returns its still-masked positions [B, T] bool."""
        self.x, self.step = x, step
        mask = x == self.mask_id
        self.masked.append(mask.cpu())
        return mask

    def commit(self, transfer: Tensor, confidence: Tensor) -> None:
        """Note the positions [B, T] bool this step committed and their confidences [B, T]."""
        self.commit_step[transfer] = self.step
        self.confidence[transfer] = confidence[transfer].float()

    def timeline(self) -> Timeline:
        return Timeline(
            masked=torch.stack(self.masked),
            commit_step=self.commit_step.cpu(),
            confidence=self.confidence.cpu(),
            layers={layer: r.trace() for layer, r in self.recorders.items() if r.acts},
            watch=self.watch,
        )


def masked_log_likelihood(
    base: BaseModel, tokens: Tensor, positions: Tensor, draws: int = 8, seed: int = 0
) -> float:
    """The model's own mean log-likelihood per token of `tokens` [T] at `positions` [T] bool.

    Draw d masks each chosen position with probability t = (d + 1/2) / draws (at least one) and
    scores log p(token) at the masked ones (logits aligned by `base.align`, so shifted families
    score token j with the logits at j - 1): a Monte-Carlo view of how plausible the model finds a
    decode, comparable between a steered and an unsteered one of the same prompt.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = tokens.to(base.device)
    candidates = positions.nonzero().flatten()
    if not len(candidates):
        return float("nan")
    total, count = 0.0, 0
    with torch.no_grad():
        for d in range(draws):
            t = (d + 0.5) / draws
            hit = candidates[torch.rand(len(candidates), generator=generator) < t]
            if not len(hit):
                hit = candidates[torch.randint(len(candidates), (1,), generator=generator)]
            x = tokens.clone()
            x[hit] = base.mask_token_id
            log_probs = base.align(base.run(x[None]).float())[0].log_softmax(-1)
            total += float(log_probs[hit, tokens[hit]].sum())
            count += len(hit)
    return total / count


class FeatureOnset(NamedTuple):
    feature: int
    step: int
    """The first step at which the feature fired anywhere."""
    position: int
    """Where it fired then (the first such position)."""
    preceded: dict[int, int]
    """Token id -> how often it was later committed at a masked position where the feature fired."""


def feature_onsets(
    timeline: Timeline, tokens: Tensor, layer: int, row: int = 0
) -> list[FeatureOnset]:
    """Per feature of `layer`'s timeline: the first (step, position) where it fires and the tokens
    later committed at the still-masked positions where it fired (token id -> count)."""
    trace = timeline.layers[layer]
    acts, indices = trace.top_acts[:, row], trace.top_indices[:, row]
    masked, commit = timeline.masked[:, row], timeline.commit_step[row]
    first: dict[int, tuple[int, int]] = {}
    preceded: dict[int, dict[int, int]] = {}
    for step, position, slot in (acts > 0).nonzero().tolist():
        feature = int(indices[step, position, slot])
        first.setdefault(feature, (step, position))
        if masked[step, position] and commit[position] >= step:
            token = int(tokens[row, position])
            counts = preceded.setdefault(feature, {})
            counts[token] = counts.get(token, 0) + 1
    return [
        FeatureOnset(f, step, position, preceded.get(f, {}))
        for f, (step, position) in sorted(first.items(), key=lambda item: (item[1], item[0]))
    ]


def timeline_records(
    generation: Generation, token_text: Callable[[int], str], row: int = 0
) -> dict:
    """The timeline of one sequence as plain JSON-ready data (see `Timeline`)."""
    timeline, tokens = generation.timeline, generation.tokens[row]
    steps = len(timeline.masked)
    cells = {
        str(layer): [
            [
                [
                    [int(f), round(float(a), 4)]
                    for f, a in zip(
                        trace.top_indices[s, row, p], trace.top_acts[s, row, p], strict=True
                    )
                    if a > 0
                ]
                for p in range(len(tokens))
            ]
            for s in range(steps)
        ]
        for layer, trace in timeline.layers.items()
    }
    confidence = timeline.confidence[row].tolist()
    return {
        "tokens": [token_text(int(t)) for t in tokens],
        "token_ids": tokens.tolist(),
        "steps": steps,
        "masked": timeline.masked[:, row].int().tolist(),
        "commit_step": timeline.commit_step[row].tolist(),
        "confidence": [None if c != c else round(c, 6) for c in confidence],
        "top_features": cells,
        "onsets": {
            str(layer): [
                o._asdict() for o in feature_onsets(timeline, generation.tokens, layer, row)
            ]
            for layer in timeline.layers
        },
    }

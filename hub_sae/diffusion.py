"""LLaDA's decoding, exactly as its official `generate()`, watched and steered through SAEs.

    x = prompt + gen_length mask tokens, decoded in gen_length / block_length blocks, left to right
    for each of the steps / n_blocks steps of a block:
        logits of x (cfg_scale > 0: u + (cfg_scale + 1)(c - u), u from x with the prompt masked)
        x0 = argmax(logits, Gumbel noise in float64 when temperature > 0)
        confidence = softmax(logits)[x0] ("low_confidence") or uniform noise ("random");
            -inf after the current block and at positions already decoded
        commit the n_i most confident x0 (n_i as LLaDA's `get_num_transfer_tokens`)

One deliberate difference: x0 never is the mask token nor an id the tokenizer cannot write (the
reference can commit the mask token itself). With `saes`, each step records the top features of
every position (a `Timeline`); with `steering`, `Steer`s add to or clamp features over a window of
steps at chosen positions, the SAE error kept (h + sum_f (new_f - old_f) W_dec[f]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hub_sae.activations import splice
from hub_sae.models import BaseModel
from hub_sae.sae import TopKSAE

REMASKING = ("low_confidence", "random")
STEER_MODES = ("clamp", "add")
LLADA_EOT = "<|eot_id|>"
"""LLaDA's end-of-turn token, banned from the confidences by `confidence_eos_eot_inf`."""


@dataclass(frozen=True)
class Steer:
    """Add to or clamp SAE features of one layer over a window of the decoding steps."""

    layer: int
    features: tuple[int, ...]
    value: float
    mode: str = "clamp"
    """clamp: set each feature to `value`; add: add `value` to it."""
    window: tuple[float, float] = (0.0, 1.0)
    """[start, stop) as shares of all steps: (0, 0.2) steers the first 20 %."""
    positions: str | tuple[int, ...] = "masked"
    """'masked' (positions still masked at that step), 'all', or position indices."""

    def __post_init__(self) -> None:
        if self.mode not in STEER_MODES:
            raise ValueError(f"Steer mode {self.mode!r}: choose one of {', '.join(STEER_MODES)}.")
        if not 0.0 <= self.window[0] < self.window[1] <= 1.0:
            raise ValueError(f"Steer window {self.window}: need 0 <= start < stop <= 1.")
        if isinstance(self.positions, str) and self.positions not in ("masked", "all"):
            raise ValueError(
                f"Steer positions {self.positions!r}: use 'masked', 'all' or position indices."
            )
        if not self.features:
            raise ValueError("Steer needs at least one feature.")
        if not math.isfinite(self.value):
            raise ValueError(f"Steer value must be a finite number; got {self.value}.")

    def active(self, step: int, steps: int) -> bool:
        """Whether step `step` (0-based) of `steps` lies in the window."""
        return self.window[0] * steps <= step < self.window[1] * steps

    def where(self, x: Tensor, mask_id: int) -> Tensor:
        """[B, T] bool: the positions of `x` this steer touches."""
        if self.positions == "masked":
            return x == mask_id
        if self.positions == "all":
            return torch.ones_like(x, dtype=torch.bool)
        where = torch.zeros_like(x, dtype=torch.bool)
        where[:, list(self.positions)] = True
        return where


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
    """[B, prompt + gen_length] the decoded sequences."""
    timeline: Timeline


def num_transfer_tokens(block_masked: Tensor, steps: int) -> Tensor:
    """[B, steps] tokens to commit per step: masks // steps, plus one for the first masks % steps."""
    count = block_masked.sum(dim=1, keepdim=True)
    extra = torch.arange(steps, device=count.device)[None] < count % steps
    return count // steps + extra.long()


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None):
    """exp(logits) / (-log U)^temperature in float64, whose argmax samples softmax(logits / T)."""
    if temperature == 0:
        return logits
    logits = logits.double()
    noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def vocab_limit(base: BaseModel) -> int:
    """One past the largest token id the tokenizer can write (LM heads are often padded)."""
    return max(base.tokenizer.get_vocab().values()) + 1


def eos_eot_ids(base: BaseModel) -> list[int]:
    """The EOS id and, when the tokenizer has it, LLaDA's end-of-turn id."""
    eot = base.tokenizer.get_vocab().get(LLADA_EOT)
    return [base.eos_token_id] + ([eot] if eot is not None else [])


def feature_acts(sae: TopKSAE, h: Tensor, features: Sequence[int]) -> Tensor:
    """[n, len(features)] activation of each feature on the rows of h [n, d] (0 outside top k)."""
    top_acts, top_indices = sae.encode(h.to(sae.device, sae.dtype))
    wanted = torch.tensor(list(features), device=top_indices.device)
    return (top_acts[..., None] * (top_indices[..., None] == wanted)).sum(-2).float()


def steer_residual(sae: TopKSAE, h: Tensor, steer: Steer) -> Tensor:
    """h [n, d] with `steer`'s features set (clamp) or shifted (add), the SAE error kept."""
    old = feature_acts(sae, h, steer.features)
    new = torch.full_like(old, steer.value) if steer.mode == "clamp" else old + steer.value
    directions = sae.W_dec[list(steer.features)].float()
    return h + ((new - old) @ directions).to(h.dtype)


class _Recorder:
    """The splice function of one layer: steer, then record top features and watched ones."""

    def __init__(self, sae: TopKSAE, steers: list[Steer], watch: tuple[int, ...], top: int):
        self.sae, self.steers, self.watch, self.top = sae, steers, watch, top
        self.x: Tensor | None = None
        self.step, self.steps, self.mask_id, self.rows = 0, 1, 0, 0
        self.acts: list[Tensor] = []
        self.indices: list[Tensor] = []
        self.watched: list[Tensor] = []

    def __call__(self, h: Tensor) -> Tensor:
        assert self.x is not None
        for steer in self.steers:
            if steer.active(self.step, self.steps):
                where = steer.where(self.x, self.mask_id).repeat(len(h) // len(self.x), 1)
                h = h.clone()
                h[where] = steer_residual(self.sae, h[where], steer)
        if self.top or self.watch:
            self.record(h[: self.rows])
        return h

    @torch.no_grad()
    def record(self, h: Tensor) -> None:
        flat = h.flatten(0, 1).to(self.sae.device, self.sae.dtype)
        top_acts, top_indices = self.sae.encode(flat)
        acts, order = top_acts.float().topk(min(self.top, top_acts.shape[-1]), dim=-1)
        shape = (*h.shape[:2], -1)
        self.acts.append(acts.view(shape).cpu())
        self.indices.append(top_indices.gather(-1, order).view(shape).cpu())
        watched = feature_acts(self.sae, flat, self.watch) if self.watch else acts[:, :0]
        self.watched.append(watched.view(shape).cpu())

    def trace(self) -> LayerTrace:
        return LayerTrace(*(torch.stack(t) for t in (self.acts, self.indices, self.watched)))


def _check(base: BaseModel, gen_length: int, block_length: int, steps: int, remasking: str):
    if remasking not in REMASKING:
        raise ValueError(f"remasking {remasking!r}: choose one of {', '.join(REMASKING)}.")
    if gen_length == 0:  # infilling: the prompt's own masks form the only block
        return 1, steps
    if block_length < 1 or gen_length % block_length:
        raise ValueError(
            f"gen_length {gen_length} must be a multiple of block_length {block_length}."
        )
    n_blocks = gen_length // block_length
    if steps < 1 or steps % n_blocks:
        raise ValueError(
            f"steps {steps} must be a positive multiple of the number of blocks {n_blocks} "
            f"(gen_length / block_length)."
        )
    return n_blocks, steps // n_blocks


@torch.no_grad()
def generate(
    base: BaseModel,
    prompt_ids: Tensor,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: Tensor | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    saes: dict[int, TopKSAE] | None = None,
    steering: Sequence[Steer] = (),
    top: int = 5,
    watch: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Generation:
    """Decode `prompt_ids` [B, P] (mask tokens in the prompt are decoded too) with LLaDA's sampler.

    The parameters keep the names and meaning of LLaDA's `generate()`; gen_length=0 infills the
    prompt's masks as one block. `saes` (layer -> SAE) are watched: `top` features per position
    and step, plus the `watch` and steered features, go into the timeline. `steering` needs an SAE of its
    layer in `saes`. Random numbers (temperature, random remasking) come from `generator`.
    `logits_eos_inf` never predicts EOS; `confidence_eos_eot_inf` commits EOS / end-of-turn
    predictions last in their block (LLaDA, appendix B.4).
    """
    n_blocks, block_steps = _check(base, gen_length, block_length, steps, remasking)
    length = prompt_ids.shape[1] + gen_length
    for steer in steering:
        if not isinstance(steer.positions, str) and not all(
            0 <= p < length for p in steer.positions
        ):
            raise ValueError(f"Steer positions {steer.positions} must lie in 0..{length - 1}.")
    saes = saes or {}
    missing = sorted({s.layer for s in steering} - set(saes))
    if missing:
        raise ValueError(f"steering layers {missing} have no SAE in `saes` (got {sorted(saes)}).")
    mask_id, device = base.mask_token_id, base.device
    prompt_ids = prompt_ids.to(device)
    batch, prompt_len = prompt_ids.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids
    if attention_mask is not None:
        ones = torch.ones(batch, gen_length, dtype=attention_mask.dtype)
        attention_mask = torch.cat([attention_mask.cpu(), ones], dim=-1).to(device)
    prompt_index = x != mask_id
    vocab = vocab_limit(base)
    total = n_blocks * block_steps

    watch = tuple(sorted({*watch, *(f for s in steering for f in s.features)}))
    recorders = {
        layer: _Recorder(sae, [s for s in steering if s.layer == layer], watch, top)
        for layer, sae in saes.items()
    }
    masked_before, commit_step = [], torch.full_like(x, -1)
    confidence_at = torch.full(x.shape, float("nan"), device=device)
    with ExitStack() as stack:
        for layer, recorder in recorders.items():
            stack.enter_context(splice(base, layer, recorder))
        for block in range(n_blocks):
            start, stop = 0, x.shape[1]  # gen_length 0: the whole sequence
            if gen_length:
                start = prompt_len + block * block_length
                stop = start + block_length
            counts = num_transfer_tokens(x[:, start:stop] == mask_id, block_steps)
            for i in range(block_steps):
                step = block * block_steps + i
                mask_index = x == mask_id
                for recorder in recorders.values():
                    recorder.x, recorder.step, recorder.steps = x, step, total
                    recorder.mask_id, recorder.rows = mask_id, batch
                logits = _logits(base, x, prompt_index, attention_mask, cfg_scale, vocab)
                if logits_eos_inf:
                    logits[..., base.eos_token_id] = float("-inf")
                x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)
                if remasking == "low_confidence":
                    x0_p = F.softmax(logits, dim=-1).gather(-1, x0[..., None])[..., 0]
                else:
                    x0_p = torch.rand(x0.shape, generator=generator, device=device)
                if confidence_eos_eot_inf:  # last in the block, yet before positions outside it
                    x0_p[torch.isin(x0, torch.tensor(eos_eot_ids(base), device=device))] = -1e9
                x0_p[:, stop:] = float("-inf")
                x0 = torch.where(mask_index, x0, x)
                confidence = torch.where(mask_index, x0_p, float("-inf"))
                transfer = torch.zeros_like(mask_index)
                for j in range(batch):
                    chosen = confidence[j].topk(int(counts[j, i])).indices
                    transfer[j, chosen] = True
                x[transfer] = x0[transfer]
                masked_before.append(mask_index.cpu())
                commit_step[transfer] = step
                confidence_at[transfer] = confidence[transfer].float()
    timeline = Timeline(
        masked=torch.stack(masked_before),
        commit_step=commit_step.cpu(),
        confidence=confidence_at.cpu(),
        layers={layer: r.trace() for layer, r in recorders.items() if r.acts},
        watch=watch,
    )
    return Generation(x.cpu(), timeline)


def _logits(
    base: BaseModel,
    x: Tensor,
    prompt_index: Tensor,
    attention_mask: Tensor | None,
    cfg_scale: float,
    vocab: int,
) -> Tensor:
    """Logits of x, guided when cfg_scale > 0; the mask token and ids >= vocab at -inf."""
    if cfg_scale > 0:
        un_x = x.masked_fill(prompt_index, base.mask_token_id)
        mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        cond, uncond = base.run(torch.cat([x, un_x]), mask2).chunk(2)
        logits = uncond + (cfg_scale + 1) * (cond - uncond)
    else:
        logits = base.run(x, attention_mask)
    logits = logits.float()  # confidences in float32 at least, whatever the model's dtype
    logits[..., vocab:] = float("-inf")
    logits[..., base.mask_token_id] = float("-inf")
    return logits


def masked_log_likelihood(
    base: BaseModel, tokens: Tensor, positions: Tensor, draws: int = 8, seed: int = 0
) -> float:
    """The model's own mean log-likelihood per token of `tokens` [T] at `positions` [T] bool.

    Draw d masks each chosen position with probability t = (d + 1/2) / draws (at least one) and
    scores log p(token) at the masked ones: a Monte-Carlo view of how plausible the model finds a
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
            log_probs = base.run(x[None])[0].float().log_softmax(-1)
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

"""LLaDA's iterative decoding with low-confidence remasking, watched (and steered) through an SAE.

    for each of N steps:
        predict every masked position (argmax, the mask token excluded)
        commit the n_i most confident predictions, keep the others masked

with n_1 + ... + n_N = the number of masked positions (LLaDA's `get_num_transfer_tokens`). While
the model runs, block `sae.layer`'s output at the positions the policy selects (for `mask`: the
still-masked ones) is encoded, and with a `Steering` one latent is clamped there: the residual
becomes h + decode(clamped latents) - decode(latents), i.e. the SAE's error term stays in, so only
the clamped feature's change moves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from hub_sae.activations import splice
from hub_sae.masking import select_positions
from hub_sae.models import BaseModel
from hub_sae.sae import TopKSAE


class Steering(NamedTuple):
    feature: int
    value: float


class Step(NamedTuple):
    committed: dict[int, int]
    """position -> token id committed at this step."""
    masked_left: int
    """Masked positions after the step."""
    top_features: list[tuple[int, float]]
    """(feature, largest activation over the analysed positions), strongest first, before the step."""
    watched: float
    """Largest activation of the watched feature over the analysed positions."""


class Decoding(NamedTuple):
    ids: Tensor
    """[T] the sequence once every masked position is committed."""
    steps: list[Step]


def commit_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step: as even as possible, the remainder first (LLaDA's schedule)."""
    if n_masked <= 0:
        return []
    steps = max(1, min(steps, n_masked))
    base, extra = divmod(n_masked, steps)
    return [base + (i < extra) for i in range(steps)]


def clamp_latent(sae: TopKSAE, h: Tensor, steering: Steering) -> Tensor:
    """h [n, d] with latent `steering.feature` set to `steering.value`, the SAE error kept."""
    top_acts, top_indices = sae.encode(h)
    feature = torch.full_like(top_indices[:, :1], steering.feature)
    present = top_indices == steering.feature
    own = (top_acts * present).sum(-1, keepdim=True)
    indices = torch.cat([top_indices, feature], dim=-1)
    before = torch.cat([top_acts.masked_fill(present, 0.0), own], dim=-1)
    after = torch.cat([before[:, :-1], torch.full_like(own, steering.value)], dim=-1)
    delta = sae.decode(after, indices) - sae.decode(before, indices)
    return h + delta.to(h.dtype)


def strongest(sae: TopKSAE, h: Tensor) -> Tensor:
    """[d_sae] largest activation of each latent over the rows of h [n, d]."""
    top_acts, top_indices = sae.encode(h)
    out = torch.zeros(sae.d_sae, device=top_acts.device)
    return out.scatter_reduce(0, top_indices.flatten(), top_acts.float().flatten(), "amax")


def predict(base: BaseModel, ids: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """(token, probability) of the most likely token at each position; never the mask token."""
    logits = base.run(ids[None])[0].float()
    logits[:, vocab:] = float("-inf")
    logits[:, base.mask_token_id] = float("-inf")
    probs, tokens = logits.softmax(-1).max(-1)
    return tokens, probs


def vocab_limit(base: BaseModel) -> int:
    """One past the largest token id the tokenizer can write (LM heads are often padded)."""
    return max(base.tokenizer.get_vocab().values()) + 1


def steering_hook(
    sae: TopKSAE, keep: Tensor, steering: Steering | None, seen: dict[str, Tensor]
) -> Callable[[Tensor], Tensor]:
    """A `splice` function that records h at the `keep` positions and clamps a latent there."""

    def hook(h: Tensor) -> Tensor:
        seen["h"] = h[0, keep]
        if steering is None or not keep.any():
            return h
        h = h.clone()
        h[0, keep] = clamp_latent(sae, h[0, keep], steering)
        return h

    return hook


@torch.no_grad()
def denoise(
    base: BaseModel,
    sae: TopKSAE,
    input_ids: Tensor,
    steps: int,
    policy: str = "mask",
    steering: Steering | None = None,
    watch: int = 0,
    top: int = 5,
) -> Decoding:
    """Unmask every masked position of `input_ids` [T] in at most `steps` steps, watching `sae`."""
    ids = input_ids.to(base.device).clone()
    schedule = commit_schedule(int((ids == base.mask_token_id).sum()), steps)
    vocab = vocab_limit(base)
    trace = []
    for n_commit in schedule:
        masked = ids == base.mask_token_id
        keep = select_positions(masked[None], None, policy)[0]
        seen: dict[str, Tensor] = {}
        with splice(base, sae.layer, steering_hook(sae, keep, steering, seen)):
            tokens, probs = predict(base, ids, vocab)
        chosen = probs.masked_fill(~masked, float("-inf")).topk(n_commit).indices
        ids[chosen] = tokens[chosen]
        trace.append(step_record(sae, seen["h"], chosen, ids, base.mask_token_id, watch, top))
    return Decoding(ids.cpu(), trace)


def step_record(
    sae: TopKSAE, h: Tensor, chosen: Tensor, ids: Tensor, mask_id: int, watch: int, top: int
) -> Step:
    """What one step committed and which features were strongest at its analysed positions."""
    peaks = strongest(sae, h) if len(h) else torch.zeros(sae.d_sae)
    values, features = peaks.topk(top)
    return Step(
        committed={int(p): int(ids[p]) for p in chosen.sort().values},
        masked_left=int((ids == mask_id).sum()),
        top_features=[(int(f), float(v)) for f, v in zip(features, values, strict=True) if v > 0],
        watched=float(peaks[watch]),
    )

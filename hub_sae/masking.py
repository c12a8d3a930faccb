"""The forward (corruption) process of a masked diffusion LM and the policies that pick positions.

`corrupt` replaces each real token by the mask token with probability p, drawn per batch
(`dlm_scope`: p ~ U[t_min, t_max], the DLM-Scope recipe) or per sequence (`llada`: LLaDA's own
pretraining process). A policy then selects the positions whose activations are used:

- `mask`: the masked positions only (the DLM-Scope default);
- `unmask`: the real tokens left visible;
- `all`: every real token of the corrupted sequence;
- `clean`: no corruption at all, every real token.

Position 0 (BOS) is never masked and never selected: it is an attention-sink outlier. Pads
(attention_mask == 0) are never masked and never selected. Activations stay at the masked token's
own index for every family, shifted ones included (DLM-Scope's convention for Dream).
An autoregressive model (family ar) never saw a mask token in training: `clean` is its only policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

POLICIES = ("mask", "unmask", "all", "clean")
T_BINS = ((0.05, 0.14), (0.14, 0.23), (0.23, 0.32), (0.32, 0.41), (0.41, 0.5), (0.5, 0.95))
"""Masking-ratio bins of the metrics and feature statistics by t: five over the training range
[0.05, 0.5], one beyond it."""
SCHEDULES = ("dlm_scope", "llada")


@dataclass
class Corruption:
    """How clean tokens are replaced by the mask token."""

    schedule: str = "dlm_scope"
    """dlm_scope: one p ~ U[t_min, t_max] per batch; llada: per sequence t ~ U(0, 1) and
    p = (1 - eps) t + eps."""
    t_min: float = 0.05
    """Lowest mask probability of the dlm_scope schedule."""
    t_max: float = 0.50
    """Highest mask probability of the dlm_scope schedule."""
    eps: float = 1e-3
    """Lowest mask probability of the llada schedule."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown corruption schedule {self.schedule!r}; "
                f"choose one of {', '.join(SCHEDULES)}."
            )
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            raise ValueError(
                f"need 0 <= t_min <= t_max <= 1 for the mask probability range; "
                f"got t_min={self.t_min}, t_max={self.t_max}."
            )
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"need 0 <= eps <= 1; got eps={self.eps}.")


class CorruptedBatch(NamedTuple):
    """A corrupted batch and the positions its policy selects."""

    input_ids: Tensor
    """[B, T] corrupted ids (the mask token at masked positions)."""
    is_masked: Tensor
    """[B, T] bool: True where the mask token replaced the clean token."""
    p: Tensor
    """[B] float mask probability used for each sequence."""
    selected: Tensor
    """[B, T] bool: the positions the policy selects (whose activations are used)."""


def check_policy(policy: str, family: str | None = None) -> str:
    """`policy` itself if it is one of POLICIES and runs on a model of `family` (any when None),
    else a ValueError naming the choices."""
    if policy not in POLICIES:
        raise ValueError(f"unknown mask policy {policy!r}; choose one of {', '.join(POLICIES)}.")
    if family == "ar" and policy != "clean":
        raise ValueError(
            f"mask policy {policy!r} corrupts the input with a mask token, but an autoregressive "
            "model (family ar) was never trained on masked inputs: its activations there mean "
            "nothing. Use policy 'clean' (--policy clean)."
        )
    return policy


def check_selects(policy: str, corruption: Corruption) -> None:
    """Refuse a policy and corruption under which no position can ever be selected."""
    never_masked = corruption.schedule == "dlm_scope" and corruption.t_max == 0
    always_masked = (
        corruption.t_min == 1 if corruption.schedule == "dlm_scope" else corruption.eps == 1
    )
    if check_policy(policy) == "mask" and never_masked:
        raise ValueError(
            "policy 'mask' with t_max 0 masks no position, so it selects none (the buffer would "
            "never fill); raise --t_max (e.g. --t_max 0.5) or use --policy clean."
        )
    if policy == "unmask" and always_masked:
        raise ValueError(
            f"policy 'unmask' with {corruption.schedule} masking every position (t_min 1 or eps 1) "
            "leaves no visible position to select; lower --t_min (e.g. --t_min 0.05) or use "
            "--policy all."
        )


def _real(shape: torch.Size, attention_mask: Tensor | None, device: torch.device) -> Tensor:
    """[B, T] bool: real tokens (not pads) other than position 0."""
    if attention_mask is None:
        real = torch.ones(shape, dtype=torch.bool, device=device)
    else:
        real = attention_mask.to(device=device, dtype=torch.bool).clone()
    real[:, 0] = False
    return real


def select_positions(is_masked: Tensor, attention_mask: Tensor | None, policy: str) -> Tensor:
    """[B, T] bool: the positions `policy` selects, never position 0 nor a pad."""
    real = _real(is_masked.shape, attention_mask, is_masked.device)
    if check_policy(policy) == "mask":
        return is_masked & real
    if policy == "unmask":
        return ~is_masked & real
    return real


def _mask_probability(
    batch_size: int, corruption: Corruption, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """[B] mask probability of each sequence under the corruption schedule."""
    if corruption.schedule == "dlm_scope":
        u = torch.rand(1, generator=generator, device=device).expand(batch_size)
        return corruption.t_min + (corruption.t_max - corruption.t_min) * u
    t = torch.rand(batch_size, generator=generator, device=device)
    return (1 - corruption.eps) * t + corruption.eps


def corrupt(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    mask_token_id: int | None,
    policy: str,
    corruption: Corruption | None = None,
    generator: torch.Generator | None = None,
) -> CorruptedBatch:
    """Mask each real token but BOS with probability p and select the positions of `policy`.

    Random numbers are drawn on the generator's device (on `input_ids`' device without one), so a
    seeded generator gives the same batch every time.
    """
    check_policy(policy)
    batch_size = input_ids.shape[0]
    if policy == "clean":
        is_masked = torch.zeros_like(input_ids, dtype=torch.bool)
        p = torch.zeros(batch_size, device=input_ids.device)
        return CorruptedBatch(
            input_ids, is_masked, p, select_positions(is_masked, attention_mask, policy)
        )
    if mask_token_id is None:
        raise ValueError(
            f"mask policy {policy!r} needs a mask token and this model has none (an "
            "autoregressive model?); use policy 'clean'."
        )
    device = generator.device if generator is not None else input_ids.device
    p = _mask_probability(batch_size, corruption or Corruption(), generator, device)
    u = torch.rand(input_ids.shape, generator=generator, device=device)
    p, u = p.to(input_ids.device), u.to(input_ids.device)
    is_masked = (u < p[:, None]) & _real(input_ids.shape, attention_mask, input_ids.device)
    corrupted = input_ids.masked_fill(is_masked, mask_token_id)
    return CorruptedBatch(
        corrupted, is_masked, p, select_positions(is_masked, attention_mask, policy)
    )

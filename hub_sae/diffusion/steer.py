"""Steering SAE features during decoding: clamp them, add to them, or add a multiple of the
position's largest SAE activation (DLM-Scope's steering), the SAE error kept.

h + sum_f (new_f - old_f) W_dec[f], at chosen positions over a window of the decoding steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hub_sae.diffusion.checks import check_whole, whole_ids
from hub_sae.sae import TopKSAE

STEER_MODES = ("clamp", "add", "relative")
STEER_POSITIONS = ("masked", "all", "top")


def check_features(sae: TopKSAE, layer: int, features: Sequence[int], what: str) -> None:
    """Refuse ids outside the SAE's 0..d_sae-1, naming the layer and the SAE's size."""
    bad = [f for f in features if not 0 <= f < sae.d_sae]
    if bad:
        raise ValueError(
            f"{what} id(s) {bad} are out of range for the layer-{layer} SAE, which has "
            f"{sae.d_sae} features: pick ids in 0..{sae.d_sae - 1}."
        )


@dataclass(frozen=True)
class Steer:
    """Clamp or shift SAE features of one layer over a window of the decoding steps.

    At every step of the window and every chosen position, with z the position's SAE activations
    before the steer and old_f = z_f (0 when f is not among the top k), each feature becomes
    `value` (clamp), old_f + value (add) or old_f + value * max_j z_j (relative: DLM-Scope's
    steering, so the push scales with how strongly the position is encoded; nothing moves where
    no feature fires). The residual moves by (new_f - old_f) W_dec[f], so the SAE error is kept.
    """

    layer: int
    features: tuple[int, ...]
    """Feature ids (whole numbers in 0..d_sae-1 of the layer's SAE)."""
    value: float
    mode: str = "clamp"
    """clamp: set each feature to `value`; add: add `value`; relative: add `value` x the
    position's largest SAE activation."""
    window: tuple[float, float] = (0.0, 1.0)
    """[start, stop) as shares of all steps: (0, 0.2) steers the first 20 %; it must hold a step."""
    positions: str | tuple[int, ...] = "masked"
    """'masked' (positions still masked at that step), 'all', 'top' or position indices.

    'top': at each step and per sequence, the `top_positions` positions where the steered
    feature (the largest of them, with several) is most active before the steer, among those
    where it fires (> 0): fewer when it fires at fewer, none when it fires nowhere; ties go to
    the earlier position."""
    top_positions: int = 1
    """With positions='top': how many positions per sequence and step (a whole number >= 1)."""

    def __post_init__(self) -> None:
        if self.mode not in STEER_MODES:
            raise ValueError(f"Steer mode {self.mode!r}: choose one of {', '.join(STEER_MODES)}.")
        if not 0.0 <= self.window[0] < self.window[1] <= 1.0:
            raise ValueError(f"Steer window {self.window}: need 0 <= start < stop <= 1.")
        if isinstance(self.positions, str):
            if self.positions not in STEER_POSITIONS:
                raise ValueError(
                    f"Steer positions {self.positions!r}: use 'masked', 'all', 'top' or position "
                    "indices."
                )
        else:
            object.__setattr__(self, "positions", whole_ids("Steer position", self.positions))
        object.__setattr__(self, "features", whole_ids("Steer feature id", self.features))
        if not self.features:
            raise ValueError("Steer needs at least one feature.")
        if not math.isfinite(self.value):
            raise ValueError(f"Steer value must be a finite number; got {self.value}.")
        object.__setattr__(
            self, "top_positions", check_whole("Steer top_positions", self.top_positions, 1)
        )

    def active(self, step: int, steps: int) -> bool:
        """Whether step `step` (0-based) of `steps` lies in the window."""
        return self.window[0] * steps <= step < self.window[1] * steps

    def check(self, saes: dict[int, TopKSAE], length: int, steps: int) -> None:
        """Refuse a steer that cannot act on a decode of `length` tokens in `steps` steps."""
        if self.layer not in saes:
            raise ValueError(
                f"Steer layer {self.layer} has no SAE in `saes` (got layers {sorted(saes)}): "
                f"add its SAE or steer one of those layers."
            )
        check_features(saes[self.layer], self.layer, self.features, "Steer feature")
        if not isinstance(self.positions, str) and not all(p < length for p in self.positions):
            raise ValueError(f"Steer positions {self.positions} must lie in 0..{length - 1}.")
        if not any(self.active(step, steps) for step in range(steps)):
            raise ValueError(
                f"Steer window {self.window} holds none of the {steps} steps (step s runs when "
                f"start <= s / steps < stop): widen the window or decode with more steps."
            )

    def where(self, sae: TopKSAE, h: Tensor, x: Tensor, mask_id: int) -> Tensor:
        """[B', T] bool: the positions of h [B', T, d] this steer touches, at the step whose
        tokens are x [B, T] (B' is a multiple of B: guidance stacks unconditional rows)."""
        if self.positions == "top":
            acts = feature_acts(sae, h.flatten(0, 1), self.features).amax(-1).view(h.shape[:2])
            order = acts.sort(dim=-1, descending=True, stable=True).indices
            top = torch.zeros_like(acts, dtype=torch.bool)
            top.scatter_(1, order[:, : self.top_positions], True)
            return (top & (acts > 0)).to(h.device)
        if self.positions == "masked":
            where = x == mask_id
        elif self.positions == "all":
            where = torch.ones_like(x, dtype=torch.bool)
        else:
            where = torch.zeros_like(x, dtype=torch.bool)
            where[:, list(self.positions)] = True
        return where.repeat(len(h) // len(x), 1)


def _picked(top_acts: Tensor, top_indices: Tensor, features: Sequence[int]) -> Tensor:
    """[n, len(features)] activation of each feature in an encoding's top k (0 outside it)."""
    wanted = torch.tensor(list(features), device=top_indices.device)
    return (top_acts[..., None] * (top_indices[..., None] == wanted)).sum(-2).float()


def feature_acts(sae: TopKSAE, h: Tensor, features: Sequence[int]) -> Tensor:
    """[n, len(features)] activation of each feature on the rows of h [n, d] (0 outside top k)."""
    return _picked(*sae.encode(h.to(sae.device, sae.dtype)), features)


def steer_residual(sae: TopKSAE, h: Tensor, steer: Steer) -> Tensor:
    """h [n, d] with `steer`'s features set (clamp) or shifted (add, relative), the SAE error
    kept (see `Steer`)."""
    check_features(sae, steer.layer, steer.features, "Steer feature")
    top_acts, top_indices = sae.encode(h.to(sae.device, sae.dtype))
    old = _picked(top_acts, top_indices, steer.features)
    if steer.mode == "clamp":
        new = torch.full_like(old, steer.value)
    elif steer.mode == "add":
        new = old + steer.value
    else:
        new = old + steer.value * top_acts.float().amax(-1, keepdim=True)
    directions = sae.W_dec[list(steer.features)].float()
    return h + ((new - old) @ directions).to(h.device, h.dtype)

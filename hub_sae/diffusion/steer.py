"""Steering SAE features during decoding: add to or clamp them, the SAE error kept.

h + sum_f (new_f - old_f) W_dec[f], at chosen positions over a window of the decoding steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hub_sae.diffusion.checks import whole_ids
from hub_sae.sae import TopKSAE

STEER_MODES = ("clamp", "add")


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
    """Add to or clamp SAE features of one layer over a window of the decoding steps."""

    layer: int
    features: tuple[int, ...]
    """Feature ids (whole numbers in 0..d_sae-1 of the layer's SAE)."""
    value: float
    mode: str = "clamp"
    """clamp: set each feature to `value`; add: add `value` to it."""
    window: tuple[float, float] = (0.0, 1.0)
    """[start, stop) as shares of all steps: (0, 0.2) steers the first 20 %; it must hold a step."""
    positions: str | tuple[int, ...] = "masked"
    """'masked' (positions still masked at that step), 'all', or position indices."""

    def __post_init__(self) -> None:
        if self.mode not in STEER_MODES:
            raise ValueError(f"Steer mode {self.mode!r}: choose one of {', '.join(STEER_MODES)}.")
        if not 0.0 <= self.window[0] < self.window[1] <= 1.0:
            raise ValueError(f"Steer window {self.window}: need 0 <= start < stop <= 1.")
        if isinstance(self.positions, str):
            if self.positions not in ("masked", "all"):
                raise ValueError(
                    f"Steer positions {self.positions!r}: use 'masked', 'all' or position indices."
                )
        else:
            object.__setattr__(self, "positions", whole_ids("Steer position", self.positions))
        object.__setattr__(self, "features", whole_ids("Steer feature id", self.features))
        if not self.features:
            raise ValueError("Steer needs at least one feature.")
        if not math.isfinite(self.value):
            raise ValueError(f"Steer value must be a finite number; got {self.value}.")

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

    def where(self, x: Tensor, mask_id: int) -> Tensor:
        """[B, T] bool: the positions of `x` this steer touches."""
        if self.positions == "masked":
            return x == mask_id
        if self.positions == "all":
            return torch.ones_like(x, dtype=torch.bool)
        where = torch.zeros_like(x, dtype=torch.bool)
        where[:, list(self.positions)] = True
        return where


def feature_acts(sae: TopKSAE, h: Tensor, features: Sequence[int]) -> Tensor:
    """[n, len(features)] activation of each feature on the rows of h [n, d] (0 outside top k)."""
    top_acts, top_indices = sae.encode(h.to(sae.device, sae.dtype))
    wanted = torch.tensor(list(features), device=top_indices.device)
    return (top_acts[..., None] * (top_indices[..., None] == wanted)).sum(-2).float()


def steer_residual(sae: TopKSAE, h: Tensor, steer: Steer) -> Tensor:
    """h [n, d] with `steer`'s features set (clamp) or shifted (add), the SAE error kept."""
    check_features(sae, steer.layer, steer.features, "Steer feature")
    old = feature_acts(sae, h, steer.features)
    new = torch.full_like(old, steer.value) if steer.mode == "clamp" else old + steer.value
    directions = sae.W_dec[list(steer.features)].float()
    return h + ((new - old) @ directions).to(h.dtype)

"""The checks both samplers make on their numbers and prompt, each error naming the fix."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

from torch import Tensor

from hub_sae.models import BaseModel


def check_whole(name: str, value: object, minimum: int) -> int:
    """`value` as an int >= minimum, or an error naming `name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        whole = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number >= {minimum}; got {value!r}.") from None
    if whole < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}; got {whole}.")
    return whole


def check_number(name: str, value: object, rule: str, ok: Callable[[float], bool]) -> float:
    """`value` as a float that passes `ok` (NaN never does), or an error naming `name` and `rule`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number) or not ok(number):
        raise ValueError(f"{name} must be {rule}; got {value!r}.")
    return number


def check_prompt(
    base: BaseModel, ids: Tensor, new_tokens: int, attention_mask: Tensor | None, name: str
) -> None:
    """Refuse a prompt that is not [B, P] token ids, does not fit the model with `new_tokens`
    more, or whose attention_mask is not [B, P]; and a model without a mask token."""
    if base.mask_token_id is None:
        raise ValueError(
            f"{base.name} ({base.family} family) has no mask token, so there is nothing to "
            "denoise: the diffusion samplers need a masked LM (families llada, dream, mlm); "
            "decode an autoregressive model with its own `generate`."
        )
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point() or not ids.numel():
        raise ValueError(
            f"{name} must be a non-empty [batch, length] tensor of token ids; got "
            f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}: "
            f"use tokenizer(..., return_tensors='pt').input_ids."
        )
    length = ids.shape[1] + new_tokens
    if length > base.max_length:
        raise ValueError(
            f"{ids.shape[1]} prompt tokens + {new_tokens} new ones = {length} exceed the model's "
            f"maximum context of {base.max_length} tokens: shorten the prompt or generate fewer."
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, but {name} has "
            f"{tuple(ids.shape)}: give one 0/1 entry per prompt token (1 = real, 0 = padding)."
        )


def whole_ids(name: str, ids: object) -> tuple[int, ...]:
    """`ids`, a sequence of whole numbers >= 0, as a tuple of ints (floats, bools and negative
    ids, which would wrap around, refused)."""
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | Tensor):
        raise ValueError(f"{name}s must be a sequence such as (3, 17); got {ids!r}.")
    return tuple(check_whole(name, i, 0) for i in ids)

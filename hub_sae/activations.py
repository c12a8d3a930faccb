"""Read and replace block outputs (resid_post) with forward hooks.

`capture` reads several blocks in one forward and stops it after the deepest of them, so no block
past it runs. `harvest` corrupts a batch first and captures the positions its policy selects;
`harvest_text` does so over a corpus up to a number of positions. `splice` replaces one block's
output for as long as it is active (SAE-spliced evaluation, steering).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hub_sae.data import DataConfig, token_batches
from hub_sae.masking import CorruptedBatch, Corruption, corrupt
from hub_sae.models import BaseModel


class Harvest(NamedTuple):
    """Activations at the selected positions of a corrupted batch."""

    acts: dict[int, Tensor]
    """layer -> [n_selected, d]; row i of every layer is the same position."""
    token_ids: Tensor
    """[n_selected] the original (clean) token id at each selected position."""
    positions: Tensor
    """[n_selected, 2] (batch index, position) of each row."""
    batch: CorruptedBatch
    """The corrupted batch the rows were captured from."""


class _StopForward(Exception):
    """Raised by the deepest capture hook to end the forward there."""


def _hidden(output: Any) -> Tensor:
    """The hidden state of a block's output: a Tensor, or the first element of a tuple."""
    return output[0] if isinstance(output, tuple) else output


def check_layers(base: BaseModel, layers: Sequence[int]) -> list[int]:
    """`layers` sorted and deduplicated; a ValueError naming the valid range if any is out of it."""
    bad = [layer for layer in layers if not 0 <= layer < base.n_layers]
    if not layers or bad:
        raise ValueError(
            f"layers must be block indices in 0..{base.n_layers - 1} ({base.name} has "
            f"{base.n_layers} blocks); got {list(layers)}"
        )
    return sorted(set(layers))


@torch.no_grad()
def capture(
    base: BaseModel,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    layers: Sequence[int],
    selected: Tensor | None = None,
) -> dict[int, Tensor]:
    """Outputs of `layers`' blocks from one forward that stops after the deepest of them.

    Returns layer -> [B, T, d], or [n_selected, d] (row-major over (batch, position)) when the
    boolean mask `selected` [B, T] is given.
    """
    layers = check_layers(base, layers)
    deepest = layers[-1]
    device = base.device
    if selected is not None:
        selected = selected.to(device)
    acts: dict[int, Tensor] = {}

    def hook_for(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = _hidden(output)
            acts[layer] = hidden.clone() if selected is None else hidden[selected]
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [base.blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        base.model(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
        )
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return acts


@torch.no_grad()
def harvest(
    base: BaseModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: Sequence[int],
    policy: str = "mask",
    corruption: Corruption | None = None,
    generator: torch.Generator | None = None,
) -> Harvest:
    """Corrupt a batch with `policy` and capture `layers` at the positions the policy selects."""
    input_ids = input_ids.to(base.device)
    attention_mask = attention_mask.to(base.device)
    batch = corrupt(
        input_ids,
        attention_mask,
        base.mask_token_id,
        policy,
        corruption or Corruption(),
        generator,
    )
    acts = capture(base, batch.input_ids, attention_mask, layers, batch.selected)
    return Harvest(
        acts=acts,
        token_ids=input_ids[batch.selected],
        positions=batch.selected.nonzero(),
        batch=batch,
    )


def harvest_text(
    base: BaseModel,
    data: DataConfig,
    layers: Sequence[int],
    policy: str,
    corruption: Corruption,
    max_tokens: int,
    seed: int = 0,
    passes: int | None = 1,
    progress: str | None = None,
) -> Iterator[tuple[Tensor, Tensor, Harvest]]:
    """(input_ids, attention_mask, `harvest` of them) over `data`'s batches until `max_tokens`
    positions, the last harvest cut to fit.

    Pass p reads the text in the order of seed `data.seed + p`, with fresh corruption drawn from
    `seed`; `passes=None` reads as many passes as it takes (a short held-out split, say).
    `progress` labels a tqdm bar over the positions (None: no bar).
    """
    generator = torch.Generator(base.device).manual_seed(seed)
    seen = 0
    with tqdm(total=max_tokens, desc=progress, unit="pos", disable=progress is None) as bar:
        for p in itertools.count() if passes is None else range(passes):
            pass_data = dataclasses.replace(data, seed=data.seed + p)
            empty = True
            for input_ids, attention_mask in token_batches(
                pass_data, base.tokenizer, base.bos_token_id, base.eos_token_id
            ):
                empty = False
                h = harvest(base, input_ids, attention_mask, layers, policy, corruption, generator)
                n = min(len(h.token_ids), max_tokens - seen)
                if n < len(h.token_ids):
                    acts = {layer: a[:n] for layer, a in h.acts.items()}
                    h = h._replace(acts=acts, token_ids=h.token_ids[:n], positions=h.positions[:n])
                if n:
                    yield input_ids, attention_mask, h
                seen += n
                bar.update(n)
                if seen >= max_tokens:
                    return
            if empty:
                return


@contextmanager
def splice(base: BaseModel, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, block `layer`'s output h [B, T, d] is replaced by `fn(h)`."""
    (layer,) = check_layers(base, [layer])

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = base.blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

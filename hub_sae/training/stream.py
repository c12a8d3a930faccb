"""This process's activations: LLM batches -> harvested activations -> shuffle buffer -> SAE batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hub_sae.activations import harvest
from hub_sae.data import token_batches
from hub_sae.models import BaseModel
from hub_sae.training.config import TrainConfig

EMPTY_BATCHES = 100
"""LLM batches in a row without a selected position after which the stream gives up."""


class ActivationStream:
    """SAE batches [sae_batch_size, n_layers, d] of this process's share of the corpus.

    Process r reads every world-th LLM batch; each epoch re-reads the corpus in a new order with
    fresh corruption. A fill tops the buffer up to `buffer_tokens` and shuffles it; half of it is
    drawn before the next fill. `draws` (SAE batches the run will draw) lets the last fills harvest
    only what is used, and with `reuse_activations` > 1 the first 1/reuse of the activations are
    kept and replayed, reshuffled, for the rest of the run. Everything that decides the next batch
    (position in the corpus, generators, the buffer, kept activations) is in `state_dict`, so a
    resumed run draws exactly the batches an uninterrupted one would.
    """

    def __init__(
        self,
        base: BaseModel,
        cfg: TrainConfig,
        rank: int,
        world: int,
        draws: int | None = None,
        progress: bool = False,
    ):
        self.base, self.cfg, self.rank, self.world = base, cfg, rank, world
        self.remaining, self.progress = draws, progress
        self.epoch = 0
        self.batches_read = 0
        self.mask_generator = torch.Generator(base.device).manual_seed(cfg.seed * 1009 + rank)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed * 2003 + rank)
        self.buffer: Tensor | None = None
        self.half = self.drawn = 0
        self.keep_rows = (
            math.ceil(draws * cfg.sae_batch_size / cfg.reuse_activations)
            if draws and cfg.reuse_activations > 1
            else None
        )
        self.empty = 0
        self.kept: list[Tensor] = []
        self.replay_order: Tensor | None = None
        self.replay_pos = 0

    def _llm_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            data = self.cfg.data(seed=self.cfg.seed + self.epoch)
            batches = token_batches(
                data,
                self.base.tokenizer,
                self.base.bos_token_id,
                self.base.eos_token_id,
                skip_batches=self.batches_read,
            )
            seen = False
            for input_ids, attention_mask in batches:
                seen = True
                index = self.batches_read
                self.batches_read += 1
                if index % self.world == self.rank:
                    yield input_ids.to(self.base.device), attention_mask.to(self.base.device)
            if not seen and self.batches_read == 0:
                raise ValueError(
                    f"corpus {self.cfg.corpus!r} holds fewer than one batch of "
                    f"{self.cfg.llm_batch_size} x {self.cfg.ctx_len} tokens; lower llm_batch_size or ctx_len."
                )
            self.epoch += 1
            self.batches_read = 0

    def harvest_batch(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Tensor:
        input_ids, attention_mask = next(batches)
        h = harvest(
            self.base,
            input_ids,
            attention_mask,
            self.cfg.layers,
            self.cfg.policy,
            self.cfg.corruption,
            self.mask_generator,
        )
        acts = torch.stack([h.acts[layer] for layer in self.cfg.layers], dim=1).float()
        self.empty = 0 if len(acts) else self.empty + 1
        if self.empty >= EMPTY_BATCHES:
            cfg = self.cfg
            raise RuntimeError(
                f"{EMPTY_BATCHES} LLM batches in a row ({cfg.llm_batch_size} x {cfg.ctx_len} "
                f"tokens each) gave no activation: policy {cfg.policy!r} with {cfg.schedule} "
                f"t_min {cfg.t_min}, t_max {cfg.t_max} selects (almost) no position. Raise "
                "--t_max (mask), lower --t_min (unmask), or use --policy all."
            )
        if not torch.isfinite(acts).all():
            raise FloatingPointError(
                f"non-finite activations from {self.cfg.model} (epoch {self.epoch}, batch {self.batches_read}); "
                "try dtype: float32."
            )
        return acts

    def _activations(self) -> Iterator[Tensor]:
        """Freshly harvested activations; with reuse, the kept ones replayed once enough are kept."""
        batches = self._llm_batches()
        while self.keep_rows is None or sum(len(t) for t in self.kept) < self.keep_rows:
            acts = self.harvest_batch(batches)
            if self.keep_rows is not None:
                self.kept.append(acts)
            yield acts
        kept = torch.cat(self.kept)
        self.kept = [kept]
        chunk = self.cfg.sae_batch_size
        while True:
            if self.replay_order is None or self.replay_pos >= len(kept):
                self.replay_order = torch.randperm(len(kept), generator=self.shuffle_generator)
                self.replay_pos = 0
            rows = self.replay_order[self.replay_pos : self.replay_pos + chunk]
            self.replay_pos += chunk
            yield kept[rows.to(kept.device)]

    def _fill(self, source: Iterator[Tensor]) -> None:
        """Top the undrawn half up to the buffer size (less near the end) and shuffle it."""
        size, batch = self.cfg.buffer_tokens, self.cfg.sae_batch_size
        parts = [self.buffer[self.half :]] if self.buffer is not None else []
        n = sum(len(p) for p in parts)
        # half of the buffer is drawn per fill: near the end, twice what is left is enough
        need = size if self.remaining is None else min(size, 2 * batch * max(1, self.remaining))
        bar = tqdm(
            total=need,
            initial=n,
            desc="filling the shuffle buffer",
            unit="act",
            disable=not self.progress or n > 0,
            leave=False,
        )
        while n < need:
            parts.append(next(source))
            n += len(parts[-1])
            bar.update(len(parts[-1]))
        bar.close()
        buffer = torch.cat(parts)
        order = torch.randperm(len(buffer), generator=self.shuffle_generator)
        self.buffer = buffer[order.to(buffer.device)]
        self.half = (len(buffer) // 2) // batch * batch
        self.drawn = 0

    def __iter__(self) -> Iterator[Tensor]:
        source = self._activations()
        batch = self.cfg.sae_batch_size
        while True:
            if self.buffer is None or self.drawn >= self.half:
                self._fill(source)
            start = self.drawn
            self.drawn += batch
            if self.remaining is not None:
                self.remaining -= 1
            yield self.buffer[start : start + batch]

    def state_dict(self) -> dict:
        undrawn = None if self.buffer is None else self.buffer[self.drawn :]
        return {
            "epoch": self.epoch,
            "batches_read": self.batches_read,
            "remaining": self.remaining,
            "mask_generator": self.mask_generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "buffer": None if undrawn is None else undrawn.cpu(),
            "half": self.half - self.drawn,
            "kept": [t.cpu() for t in self.kept],
            "replay_order": self.replay_order,
            "replay_pos": self.replay_pos,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_read = state["epoch"], state["batches_read"]
        self.remaining = state["remaining"]
        self.mask_generator.set_state(state["mask_generator"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        device = self.base.device
        self.buffer = None if state["buffer"] is None else state["buffer"].to(device)
        self.half, self.drawn = state["half"], 0
        self.kept = [t.to(device) for t in state["kept"]]
        self.replay_order, self.replay_pos = state["replay_order"], state["replay_pos"]

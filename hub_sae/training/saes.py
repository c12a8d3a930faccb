"""The SAEs a process trains: which (layer, k) it owns, their start, one step's losses, the final gather.

replicate: every process holds every SAE and DDP averages their gradients over the processes.
modules: process r holds only the SAEs `owners` gives it; every step it receives all processes'
activations (`share_batch`) and computes each SAE's loss as the mean over those per-process
batches, the very gradient DDP would average, so both modes take the same steps.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor, nn

from hub_sae.sae import TopKSAE
from hub_sae.training.config import TrainConfig

Key = tuple[int, int]
"""(layer, k) of one SAE."""


def sae_name(layer: int, k: int) -> str:
    return f"layer_{layer}_k{k}"


def sae_numel(d_in: int, d_sae: int) -> int:
    """Parameters of one TopKSAE: encoder weight and bias, decoder, b_dec."""
    return 2 * d_in * d_sae + d_sae + d_in


def owners(keys: Sequence[Key], sizes: Sequence[int], processes: int) -> list[int]:
    """The process of each SAE: contiguous runs (so a process needs few layers) of near-equal bytes."""
    total, before, owner = sum(sizes), 0, []
    for size in sizes:
        owner.append(min(processes - 1, processes * (2 * before + size) // (2 * total)))
        before += size
    return owner


def placement(cfg: TrainConfig, d_model: int, processes: int, mode: str) -> dict[Key, int]:
    """The process owning each (layer, k): spread by bytes under modules, else process 0."""
    keys = [(layer, k) for layer in cfg.layers for k in cfg.ks]
    if mode == "replicate" or processes == 1:
        return dict.fromkeys(keys, 0)
    if processes > len(keys):
        raise ValueError(
            f"distribute modules needs at least one SAE per process: {len(keys)} SAEs, "
            f"{processes} processes. Use fewer processes or --distribute replicate."
        )
    sizes = [sae_numel(d_model, cfg.latents(d_model))] * len(keys)
    return dict(zip(keys, owners(keys, sizes, processes), strict=True))


class StepOutput(NamedTuple):
    loss: Tensor
    """[n_saes] each SAE's FVU + auxk_alpha * AuxK, averaged over the per-process batches."""
    fvu: Tensor
    """[n_saes] the FVU part."""
    fired: Tensor
    """[n_saes, d_sae] bool: latents that fired on any row."""


class SAESet(nn.Module):
    """The SAEs of `keys`, each started from its own seed (the same start in every mode)."""

    def __init__(self, cfg: TrainConfig, d_model: int, base_model: str, keys: Sequence[Key]):
        super().__init__()
        self.keys = list(keys)
        self.layers = sorted({layer for layer, _ in self.keys})
        saes = {}
        for layer, k in self.keys:
            torch.manual_seed(zlib.crc32(f"{cfg.seed}/{layer}/{k}".encode()))
            saes[sae_name(layer, k)] = TopKSAE(
                d_model, cfg.latents(d_model), k, layer=layer, base_model=base_model,
                policy=cfg.policy,
            )  # fmt: skip
        self.saes = nn.ModuleDict(saes)

    def sae(self, layer: int, k: int) -> TopKSAE:
        return self.saes[sae_name(layer, k)]

    def forward(
        self, x: Tensor, layers: list[int], dead: Tensor, cfg: TrainConfig, chunks: int = 1
    ) -> StepOutput:
        """x: [chunks * batch, len(layers), d]; dead: [n_saes, d_sae] bool."""
        losses, fvus, fired = [], [], []
        for i, (layer, k) in enumerate(self.keys):
            sae, parts = self.sae(layer, k), x[:, layers.index(layer)].chunk(chunks)
            outs = [sae(part, dead[i], cfg.k_aux) for part in parts]
            fvu = torch.stack([o.fvu for o in outs]).mean()
            auxk = torch.stack([o.auxk_loss for o in outs]).mean()
            losses.append(fvu + cfg.auxk_alpha * auxk)
            fvus.append(fvu.detach())
            hit = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
            for o in outs:
                hit[o.latents.top_indices.flatten()] = True
            fired.append(hit)
        return StepOutput(torch.stack(losses), torch.stack(fvus), torch.stack(fired))

    def clip_and_project(self, grad_clip: float) -> None:
        """Each SAE as if trained alone: decoder gradient kept tangent to the unit rows, own clip."""
        for sae in self.saes.values():
            sae.remove_gradient_parallel_to_decoder_directions()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)

    def normalise_decoders(self) -> None:
        for sae in self.saes.values():
            sae.set_decoder_norm_to_unit_norm()


def share_batch(accelerator: Accelerator, x: Tensor, mode: str) -> Tensor:
    """modules: every process's batch, in process order ([world * batch, ...]); else x itself.

    One all_gather of equal-size tensors (accelerate's `gather`), the same on gloo and nccl. It
    sends every hooked layer, though a process needs only its owners' (1-2 of 6 layers at 8
    processes): an all_to_all of just those would send ~3x less, but all_gather already sends ~24x
    less than replicate's gradient all-reduce at 8 processes on the LLaDA recipe.
    """
    if mode != "modules" or accelerator.num_processes == 1:
        return x
    return accelerator.gather(x.contiguous())


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to `points` [n, d]."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < tol * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median


def input_scale(first: Tensor, accelerator: Accelerator) -> list[float]:
    """Per-layer sqrt(mean ||x||^2 / d) of every process's first batch [batch, n_layers, d]."""
    mean_sq = first.pow(2).sum(-1).mean(0) / first.shape[-1]
    return accelerator.reduce(mean_sq.contiguous(), reduction="mean").sqrt().tolist()


def initialise(saes: SAESet, first: Tensor, layers: list[int], scale: list[float]) -> None:
    """b_dec = geometric median of process 0's first batch (`first`), the encoder matched to it."""
    for layer in saes.layers:
        x = first[:, layers.index(layer)] / scale[layers.index(layer)]
        median = geometric_median(x)
        for sae_layer, k in saes.keys:
            if sae_layer == layer:
                saes.sae(layer, k).b_dec.data.copy_(median)
                saes.sae(layer, k).match_scale(x)


def collect(
    saes: SAESet, owner: dict[Key, int], make: Callable[[Key], TopKSAE], accelerator: Accelerator
) -> dict[Key, TopKSAE]:
    """Copies of every SAE on process 0 (CPU), sent there by their owners; {} elsewhere."""
    rank, out = accelerator.process_index, {}
    for key, src in owner.items():
        if src == rank == 0:
            out[key] = copy.deepcopy(saes.sae(*key)).cpu()
        elif rank == src:
            for tensor in saes.sae(*key).state_dict().values():
                dist.send(tensor.contiguous(), dst=0)
        elif rank == 0:
            sae = make(key).to(accelerator.device)
            for tensor in sae.state_dict().values():  # views of the parameters: filled in place
                dist.recv(tensor, src=src)
            out[key] = sae.cpu()
    return out

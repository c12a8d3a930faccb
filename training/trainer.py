"""Train one TopK SAE per (layer, k) from a single base-model forward, with accelerate DDP.

Read top to bottom: config, activation stream (harvest -> shuffle buffer -> SAE batches), the
recipe's initialisation, the training loop, checkpoints, and the final suite.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from hub_sae.activations import check_layers, harvest
from hub_sae.data import DataConfig, iter_texts, token_batches
from hub_sae.evaluate import evaluate_suite
from hub_sae.features import collect_features
from hub_sae.masking import Corruption, check_policy
from hub_sae.models import BaseModel, load_base_model
from hub_sae.sae import TopKSAE
from hub_sae.suite import SuiteInfo, save_suite


@dataclass
class TrainConfig:
    name: str = field(
        default="minilm-mask", metadata={"help": "run name: the suite goes to OUTPUT_DIR/NAME/"}
    )
    model: str = field(
        default="minilm",
        metadata={"help": "'minilm' (embedded), a LLaDA checkpoint, or any HF model"},
    )
    dtype: str = field(
        default="float32", metadata={"help": "base-model dtype: float32 or bfloat16"}
    )
    layers: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4, 5],
        metadata={"help": "blocks whose resid_post is hooked"},
    )
    policy: str = field(
        default="mask", metadata={"help": "positions kept: mask, unmask, all or clean"}
    )
    schedule: str = field(
        default="dlm_scope",
        metadata={"help": "corruption: dlm_scope (p ~ U[t_min, t_max] per batch) or llada"},
    )
    t_min: float = 0.05
    t_max: float = 0.50
    corpus: str = field(
        default="pydoc",
        metadata={"help": "'pydoc' (embedded), a .txt/.jsonl file or folder, or an HF dataset"},
    )
    text_field: str = "text"
    ctx_len: int = 128
    llm_batch_size: int = 8
    expansion_factor: int = field(
        default=8, metadata={"help": "d_sae = expansion_factor * d_model (unless d_sae is set)"}
    )
    d_sae: int | None = None
    ks: list[int] = field(
        default_factory=lambda: [32], metadata={"help": "one SAE per k per layer"}
    )
    total_tokens: int = field(
        default=300_000, metadata={"help": "activations each SAE trains on (all ranks)"}
    )
    sae_batch_size: int = 1024
    buffer_tokens: int = field(
        default=16_384, metadata={"help": "shuffle buffer size, in activations"}
    )
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 50
    decay_fraction: float = field(
        default=0.2, metadata={"help": "linear decay to 0 over this last share of steps"}
    )
    grad_clip: float = 1.0
    auxk_alpha: float = 1 / 32
    k_aux: int | None = field(
        default=None, metadata={"help": "AuxK latents (default d_model // 2)"}
    )
    dead_tokens: int = field(
        default=50_000, metadata={"help": "a latent not firing for this many tokens is dead"}
    )
    scale_batches: int = field(
        default=4, metadata={"help": "LLM batches used to estimate the input scale"}
    )
    checkpoint_every: int = field(
        default=0, metadata={"help": "steps between checkpoints (0: none)"}
    )
    eval_tokens: int = field(
        default=65_536, metadata={"help": "held-out activations for the final metrics"}
    )
    eval_corpus: str | None = field(
        default=None, metadata={"help": "held-out corpus (default: corpus)"}
    )
    eval_split: str = field(
        default="heldout",
        metadata={
            "help": "its split: 'heldout' for pydoc and local files, e.g. 'test' for HF datasets"
        },
    )
    feature_tokens: int = field(
        default=32_768,
        metadata={"help": "training activations scanned for each latent's top contexts (0: skip)"},
    )
    output_dir: str = "runs"
    seed: int = 0
    log_every: int = 10
    log_with: list[str] = field(
        default_factory=list, metadata={"help": "accelerate trackers: tensorboard, wandb"}
    )

    def __post_init__(self) -> None:
        # YAML 1.1 reads `3e-4` (no dot) as a string: accept it wherever a float is meant.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ValueError(f"{f.name} must be a number; got {value!r}.") from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update(overrides)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"{path}: unknown config keys {unknown}; valid keys: {[f.name for f in fields(cls)]}"
            )
        return cls(**data)

    def check(self, base: BaseModel) -> None:
        """Stop with a clear message before anything is written."""
        check_policy(self.policy)
        Corruption(self.schedule, self.t_min, self.t_max)
        check_layers(base, self.layers)
        d_sae = self.latents(base.d_model)
        if any(not 0 < k < d_sae for k in self.ks):
            raise ValueError(f"every k must satisfy 0 < k < d_sae={d_sae}; got ks={self.ks}.")
        if self.ctx_len > base.max_length:
            raise ValueError(
                f"ctx_len {self.ctx_len} exceeds {self.model}'s maximum of {base.max_length} tokens."
            )
        if self.buffer_tokens < 2 * self.sae_batch_size:
            raise ValueError(
                f"buffer_tokens ({self.buffer_tokens}) must be >= 2 * sae_batch_size ({self.sae_batch_size})."
            )
        for split in ("train", "heldout"):  # a missing local corpus or empty split fails here
            iter_texts(self.data(split))
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}.")

    def latents(self, d_model: int) -> int:
        return self.d_sae or self.expansion_factor * d_model

    def data(self, split: str = "train", seed: int | None = None) -> DataConfig:
        """The training text, or with split="heldout" the evaluation text."""
        heldout = split == "heldout"
        return DataConfig(
            corpus=(self.eval_corpus or self.corpus) if heldout else self.corpus,
            split=self.eval_split if heldout else split,
            text_field=self.text_field,
            ctx_len=self.ctx_len,
            batch_size=self.llm_batch_size,
            seed=self.seed if seed is None else seed,
        )

    @property
    def corruption(self) -> Corruption:
        return Corruption(self.schedule, self.t_min, self.t_max)


class ActivationStream:
    """This rank's LLM batches -> harvested activations [n, n_layers, d] -> shuffle buffer -> SAE batches.

    Rank r takes every world-th LLM batch; each epoch re-reads the corpus in a new order with fresh
    corruption. The position (epoch, batches read) and the generators are checkpointed; what sat in
    the buffer at checkpoint time is not, so a resumed run skips at most one buffer of activations.
    With `remaining` set (SAE batches still to be drawn), the last refills harvest only what is used.
    """

    def __init__(self, base: BaseModel, cfg: TrainConfig, rank: int, world: int):
        self.base, self.cfg, self.rank, self.world = base, cfg, rank, world
        self.epoch = 0
        self.batches_read = 0
        self.mask_generator = torch.Generator(base.device).manual_seed(cfg.seed * 1009 + rank)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed * 2003 + rank)
        self.buffer: Tensor | None = None
        self.remaining: int | None = None

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
        if not torch.isfinite(acts).all():
            raise FloatingPointError(
                f"non-finite activations from {self.cfg.model} (epoch {self.epoch}, batch {self.batches_read}); "
                "try dtype: float32."
            )
        return acts

    def __iter__(self) -> Iterator[Tensor]:
        batches = self._llm_batches()
        size, batch = self.cfg.buffer_tokens, self.cfg.sae_batch_size
        while True:
            parts = [self.buffer] if self.buffer is not None else []
            n = sum(len(p) for p in parts)
            # half of the buffer is drawn per fill: near the end, twice what is left is enough
            need = size if self.remaining is None else min(size, 2 * batch * max(1, self.remaining))
            while n < need:
                parts.append(self.harvest_batch(batches))
                n += len(parts[-1])
            buffer = torch.cat(parts)
            buffer = buffer[
                torch.randperm(len(buffer), generator=self.shuffle_generator).to(buffer.device)
            ]
            half = (len(buffer) // 2) // batch * batch
            for start in range(0, half, batch):
                if self.remaining is not None:
                    self.remaining -= 1
                yield buffer[start : start + batch]
            self.buffer = buffer[half:]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_read": self.batches_read,
            "mask_generator": self.mask_generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_read = state["epoch"], state["batches_read"]
        self.mask_generator.set_state(state["mask_generator"])
        self.shuffle_generator.set_state(state["shuffle_generator"])


class SAESet(nn.Module):
    """All SAEs of a run in one module, so DDP syncs them in one backward."""

    def __init__(self, cfg: TrainConfig, base: BaseModel):
        super().__init__()
        d_sae = cfg.latents(base.d_model)
        self.keys = [(layer, k) for layer in cfg.layers for k in cfg.ks]
        self.saes = nn.ModuleDict(
            {
                self.name(layer, k): TopKSAE(
                    base.d_model, d_sae, k, layer=layer, base_model=base.name, policy=cfg.policy
                )
                for layer, k in self.keys
            }
        )

    @staticmethod
    def name(layer: int, k: int) -> str:
        return f"layer_{layer}_k{k}"

    def sae(self, layer: int, k: int) -> TopKSAE:
        return self.saes[self.name(layer, k)]

    def forward(self, x: Tensor, layers: list[int], dead: dict[str, Tensor], k_aux: int | None):
        """x: [batch, n_layers, d] -> {name: ForwardOutput}."""
        return {
            self.name(layer, k): self.sae(layer, k)(
                x[:, layers.index(layer)], dead[self.name(layer, k)], k_aux
            )
            for layer, k in self.keys
        }


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


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup, constant, then linear decay to 0 over the last `decay_fraction` of steps."""
    decay_start = int(total_steps * (1 - cfg.decay_fraction))

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if step >= decay_start:
            return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
        return 1.0

    return factor


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    scale: list[float] = field(default_factory=list)
    """Per-layer input scale sqrt(mean ||x||^2 / d), estimated before step 0."""


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints" / cfg.name


def latest_checkpoint(cfg: TrainConfig) -> Path | None:
    steps = sorted(checkpoint_root(cfg).glob("step_*"))
    return steps[-1] if steps else None


def save_checkpoint(
    accelerator: Accelerator, cfg: TrainConfig, saes, optimizer, scheduler, state, stream, tracker
) -> None:
    """All ranks write into a temp dir; rank 0 renames it into place, so a checkpoint is whole or absent."""
    root = checkpoint_root(cfg)
    tmp = root / f".tmp-step_{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(
            {
                "saes": accelerator.unwrap_model(saes).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "state": asdict(state),
                "since_fired": tracker,
            },
            tmp / "trainer.pt",
        )
    torch.save(stream.state_dict(), tmp / f"rank_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, root / f"step_{state.step:08d}")
        for old in sorted(root.glob("step_*"))[:-1]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def initialise(
    saes: SAESet, stream_iter: Iterator[Tensor], cfg: TrainConfig, accelerator: Accelerator
) -> list[float]:
    """Input scale per layer (averaged over ranks), b_dec = geometric median of the first batch and
    the encoder matched to that batch's scale (DDP then copies rank 0's start to every rank)."""
    first = next(stream_iter)
    mean_sq = first.pow(2).sum(-1).mean(0) / first.shape[-1]  # [n_layers]
    mean_sq = accelerator.reduce(mean_sq.contiguous(), reduction="mean")
    scale = mean_sq.sqrt().tolist()
    for i, layer in enumerate(cfg.layers):
        x = first[:, i] / scale[i]
        median = geometric_median(x)
        for k in cfg.ks:
            sae = saes.sae(layer, k)
            sae.b_dec.data.copy_(median)
            sae.match_scale(x)
    return scale


def train(cfg: TrainConfig, resume: bool = False) -> Path | None:
    """Run the whole recipe; returns the suite folder on the main process."""
    accelerator = Accelerator(log_with=cfg.log_with or None, project_dir=cfg.output_dir)
    torch.manual_seed(cfg.seed)
    dtype = (
        getattr(torch, cfg.dtype)
        if isinstance(cfg.dtype, str) and hasattr(torch, cfg.dtype)
        else None
    )
    base = load_base_model(cfg.model, dtype=dtype, device=accelerator.device)
    cfg.check(base)
    checkpoint = latest_checkpoint(cfg) if resume else None
    if resume and checkpoint is None:
        accelerator.print(
            f"--resume: no checkpoint under {checkpoint_root(cfg)}; starting from scratch."
        )

    saes = SAESet(cfg, base).to(accelerator.device)
    stream = ActivationStream(base, cfg, accelerator.process_index, accelerator.num_processes)
    world_batch = cfg.sae_batch_size * accelerator.num_processes
    total_steps = max(1, cfg.total_tokens // world_batch)
    optimizer = torch.optim.Adam(
        saes.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    since_fired = {
        SAESet.name(layer, k): torch.zeros(saes.sae(layer, k).d_sae, dtype=torch.long)
        for layer, k in saes.keys
    }

    if checkpoint is not None:
        saved = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
        saes.load_state_dict(saved["saes"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["state"])
        since_fired = saved["since_fired"]
        stream.load_state_dict(
            torch.load(checkpoint / f"rank_{accelerator.process_index}.pt", weights_only=True)
        )
        stream.remaining = total_steps - state.step
        batches = iter(stream)
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    else:
        stream.remaining = total_steps + 1  # the first batch initialises b_dec and the scale
        batches = iter(stream)
        state = TrainState(scale=initialise(saes, batches, cfg, accelerator))

    model = accelerator.prepare(saes)
    if accelerator.is_main_process and cfg.log_with:
        accelerator.init_trackers(cfg.name, config={k: str(v) for k, v in asdict(cfg).items()})
    scale = torch.tensor(state.scale, device=accelerator.device)[None, :, None]
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not accelerator.is_main_process,
        desc=cfg.name,
    )
    started = time.perf_counter()
    while state.step < total_steps:
        x = next(batches) / scale
        dead = {
            name: (since_fired[name] > cfg.dead_tokens).to(accelerator.device)
            for name in since_fired
        }
        outs = model(x, cfg.layers, dead, cfg.k_aux)
        loss = sum(o.fvu + cfg.auxk_alpha * o.auxk_loss for o in outs.values())
        accelerator.backward(loss)
        for sae in saes.saes.values():  # each SAE as if trained alone: its own clip
            sae.remove_gradient_parallel_to_decoder_directions()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for sae in saes.saes.values():
            sae.set_decoder_norm_to_unit_norm()

        fired = torch.stack(
            [
                torch.zeros(saes.saes[name].d_sae, device=accelerator.device).index_fill_(
                    0, o.latents.top_indices.flatten(), 1
                )
                for name, o in outs.items()
            ]
        )
        fired = accelerator.reduce(fired, reduction="sum").cpu() > 0
        for i, name in enumerate(outs):
            since_fired[name] += world_batch
            since_fired[name][fired[i]] = 0
        state.step += 1
        state.tokens += world_batch
        bar.update()

        if state.step % cfg.log_every == 0 or state.step == total_steps:
            fvus = {
                name: accelerator.reduce(o.fvu.detach(), reduction="mean").item()
                for name, o in outs.items()
            }
            dead_share = {
                name: (since_fired[name] > cfg.dead_tokens).float().mean().item() for name in outs
            }
            bar.set_postfix(
                tokens=f"{state.tokens:,}",
                fvu=f"{sum(fvus.values()) / len(fvus):.3f}",
                dead=f"{100 * max(dead_share.values()):.1f}%",
            )
            accelerator.log(
                {
                    **{f"fvu/{n}": v for n, v in fvus.items()},
                    **{f"dead/{n}": v for n, v in dead_share.items()},
                    "lr": scheduler.get_last_lr()[0],
                },
                step=state.step,
            )
        if (
            cfg.checkpoint_every
            and state.step % cfg.checkpoint_every == 0
            and state.step < total_steps
        ):
            save_checkpoint(
                accelerator, cfg, model, optimizer, scheduler, state, stream, since_fired
            )
    bar.close()
    train_seconds = time.perf_counter() - started
    # DDP keeps every rank's SAEs identical; record each rank's checksum so a run proves it.
    checksum = torch.stack([p.detach().double().sum() for p in saes.parameters()]).sum()
    rank_checksums = accelerator.gather(checksum[None].to(accelerator.device)).tolist()

    out_dir = None
    if accelerator.is_main_process:
        final = {}
        for i, layer in enumerate(cfg.layers):
            for k in cfg.ks:
                sae = copy.deepcopy(saes.sae(layer, k))
                sae.fold_input_scale(state.scale[i])
                final[layer, k] = sae.cpu().eval()
        metrics = evaluate_suite(
            base,
            final,
            cfg.policy,
            cfg.corruption,
            cfg.data("heldout"),
            cfg.eval_tokens,
            seed=cfg.seed,
        )
        features = None
        if cfg.feature_tokens:
            features = collect_features(
                base,
                final,
                cfg.policy,
                cfg.corruption,
                cfg.data(),
                cfg.feature_tokens,
                seed=cfg.seed,
            )
        for (layer, k), m in metrics.items():
            m["train_dead_share"] = (
                (since_fired[SAESet.name(layer, k)] > cfg.dead_tokens).float().mean().item()
            )
            m["input_scale"] = state.scale[cfg.layers.index(layer)]
        info = {
            "base_model": base.name,
            "policy": cfg.policy,
            "hookpoint": "resid_post",
            "d_in": base.d_model,
            "d_sae": cfg.latents(base.d_model),
            "corruption": {"schedule": cfg.schedule, "t_min": cfg.t_min, "t_max": cfg.t_max},
            "training": {
                **asdict(cfg),
                "steps": state.step,
                "tokens": state.tokens,
                "processes": accelerator.num_processes,
                "rank_checksums": rank_checksums,
                "train_seconds": round(train_seconds, 1),
            },
        }
        suite = SuiteInfo.from_dict({**info, "layers": cfg.layers, "ks": cfg.ks})
        out_dir = save_suite(Path(cfg.output_dir) / cfg.name, final, metrics, suite, features)
        shutil.rmtree(checkpoint_root(cfg), ignore_errors=True)
        accelerator.print(summary_table(metrics))
        accelerator.print(f"suite written to {out_dir}")
    accelerator.end_training()
    return out_dir


def summary_table(metrics: dict[tuple[int, int], dict]) -> str:
    rows = ["| layer | k | FVU | L0 | dead % |", "|---|---|---|---|---|"]
    for (layer, k), m in sorted(metrics.items()):
        rows.append(
            f"| {layer} | {k} | {m['fvu']:.3f} | {m['l0']:.1f} | {100 * m['dead_share']:.1f} |"
        )
    return "\n".join(rows)

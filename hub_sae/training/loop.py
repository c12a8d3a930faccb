"""`train(cfg)`: the recipe as a few named steps, read top to bottom.

start (accelerator, plan against free memory) -> load the base model -> set up (SAEs, optimizer,
schedule, stream; fresh or resumed) -> fit (step, log, checkpoint) -> finish (gather the SAEs,
evaluate, feature statistics, write the suite).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_wsd_schedule

from hub_sae.evaluate import evaluate_suite
from hub_sae.features import collect_features
from hub_sae.masking import check_policy
from hub_sae.models import BaseModel, family, load_base_model
from hub_sae.suite import SuiteInfo, save_suite
from hub_sae.training.checkpoint import (
    TrainState,
    check_sae_tensors,
    checkpoint_root,
    exit_with_launcher,
    latest_checkpoint,
    load_checkpoint,
    run_lock,
    save_checkpoint,
    trainer_state,
)
from hub_sae.training.config import LOGS, TrainConfig
from hub_sae.training.plan import check_fits
from hub_sae.training.saes import (
    Key,
    SAESet,
    StepOutput,
    collect,
    initialise,
    input_scale,
    placement,
    share_batch,
)
from hub_sae.training.stream import ActivationStream


@dataclass
class Run:
    """Everything a running training holds (this process's share of it)."""

    cfg: TrainConfig
    accelerator: Accelerator
    mode: str
    base: BaseModel
    owner: dict[Key, int]
    """The process of each (layer, k); replicate: process 0 holds the copy that is saved."""
    saes: SAESet
    model: nn.Module
    """`saes`, wrapped by DDP under replicate."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: ActivationStream
    batches: Iterator[Tensor]
    since_fired: Tensor
    """[n_saes, d_sae] tokens since each latent last fired."""
    state: TrainState
    total_steps: int

    @property
    def world_batch(self) -> int:
        return self.cfg.sae_batch_size * self.accelerator.num_processes

    @cached_property
    def scale(self) -> Tensor:
        """[1, n_layers, 1] input scale on the device, fixed before step 0 (read from step 0 on)."""
        return torch.tensor(self.state.scale, device=self.accelerator.device)[None, :, None]


def train(cfg: TrainConfig, resume: bool = False) -> Path | None:
    """Run the whole recipe; returns the suite folder on process 0 (None elsewhere)."""
    accelerator = start(cfg)
    base = load(cfg, accelerator)
    with run_lock(cfg, accelerator):
        run = setup(cfg, base, accelerator, resume)
        seconds = fit(run)
        out_dir = finish(run, seconds)
    accelerator.end_training()
    return out_dir


def start(cfg: TrainConfig) -> Accelerator:
    """The accelerator, after the checks that need no model: precision and the memory plan."""
    # trackers write under OUTPUT_DIR/logs/NAME/, never into the suite folder the run replaces
    logs = Path(cfg.output_dir) / LOGS
    accelerator = Accelerator(log_with=cfg.log_with or None, project_dir=logs)
    if accelerator.mixed_precision != "no":
        raise ValueError(
            f"--mixed_precision {accelerator.mixed_precision}: the SAEs train in float32 and the "
            "base model runs in --dtype (bfloat16 for LLaDA); launch with --mixed_precision no "
            "(--sae_autocast bfloat16 runs the SAE GEMMs in bfloat16 with float32 weights)."
        )
    exit_with_launcher()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    check_fits(cfg, accelerator.num_processes, local, accelerator.device)
    return accelerator


def load(cfg: TrainConfig, accelerator: Accelerator) -> BaseModel:
    check_policy(cfg.policy, family(cfg.model))  # before a long load: config.json says enough
    accelerator.print(f"loading {cfg.model} ({cfg.dtype}) on {accelerator.device} ...")
    base = load_base_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=accelerator.device)
    cfg.check(base)
    return base


def lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, step: int = 0
):
    """Linear warmup from 0, constant, linear decay to 0 over the last `decay_fraction` of steps
    (dictionary_learning's schedule, which DLM-Scope trained with), positioned at `step`."""
    for group in optimizer.param_groups:  # the lr the schedule scales, also on a resume
        group["initial_lr"] = cfg.lr
    decay_start = int(total_steps * (1 - cfg.decay_fraction))
    warmup = min(cfg.warmup_steps, decay_start)
    return get_wsd_schedule(
        optimizer,
        num_warmup_steps=warmup,
        num_stable_steps=decay_start - warmup,
        num_decay_steps=total_steps - decay_start,
        decay_type="linear",
        last_epoch=step - 1,
    )


def setup(cfg: TrainConfig, base: BaseModel, accelerator: Accelerator, resume: bool) -> Run:
    """This process's SAEs, optimizer, schedule and stream, started fresh or from a checkpoint."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mode = cfg.mode(world)
    total_steps = cfg.total_tokens // (cfg.sae_batch_size * world)
    if total_steps < 1:
        raise ValueError(
            f"--total_tokens {cfg.total_tokens} is less than one step of {world} x "
            f"--sae_batch_size {cfg.sae_batch_size}; raise total_tokens."
        )
    owner = placement(cfg, base.d_model, world, mode)
    mine = [key for key, process in owner.items() if mode == "replicate" or process == rank]
    saes = SAESet(cfg, base.d_model, base.name, mine).to(accelerator.device)
    optimizer = torch.optim.Adam(
        saes.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True
    )
    stream = ActivationStream(
        base, cfg, rank, world, draws=total_steps + 1, progress=accelerator.is_main_process
    )
    since_fired = torch.zeros(
        len(mine), cfg.latents(base.d_model), dtype=torch.long, device=accelerator.device
    )
    run = Run(
        cfg, accelerator, mode, base, owner, saes, saes, optimizer,
        lr_schedule(optimizer, cfg, total_steps), stream, iter(stream), since_fired, TrainState(),
        total_steps,
    )  # fmt: skip
    checkpoint = latest_checkpoint(cfg) if resume else None
    if resume and checkpoint is None:
        accelerator.print(
            f"--resume: no checkpoint under {checkpoint_root(cfg)}; starting from scratch."
        )
    if checkpoint is not None:
        restore(run, checkpoint)
    else:
        begin(run)
    if mode == "replicate":
        run.model = accelerator.prepare(saes)
    if accelerator.is_main_process and cfg.log_with:
        accelerator.init_trackers(cfg.name, config={k: str(v) for k, v in asdict(cfg).items()})
    return run


def begin(run: Run) -> None:
    """The stream's first batch sets the input scale, b_dec and the encoder's scale."""
    first = next(run.batches)
    scale = input_scale(first, run.accelerator)
    process_0_batch = share_batch(run.accelerator, first, run.mode)[: len(first)]
    initialise(run.saes, process_0_batch, run.cfg.layers, scale)
    run.state = TrainState(scale=scale)


def restore(run: Run, checkpoint: Path) -> None:
    """The checkpoint's SAEs, Adam moments, counters and stream; this launch's lr, betas and lr
    schedule (`check_resume` has refused changes that cannot apply)."""
    cfg = run.cfg
    trainer, own, sae_file = load_checkpoint(checkpoint, run.accelerator, cfg, run.mode)
    check_sae_tensors(checkpoint, sae_file["saes"], run.saes.state_dict())
    run.saes.load_state_dict(sae_file["saes"])
    run.optimizer.load_state_dict(sae_file["optimizer"])
    for group in run.optimizer.param_groups:
        group["betas"] = (cfg.beta1, cfg.beta2)
    run.since_fired.copy_(sae_file["since_fired"])
    run.state = TrainState(**trainer["state"])
    run.scheduler = lr_schedule(run.optimizer, cfg, run.total_steps, run.state.step)
    run.stream.load_state_dict(own["stream"])
    saved = trainer.get("config", {})
    changed = [f"--{f} {saved[f]} -> {v}" for f, v in asdict(cfg).items() if saved.get(f, v) != v]
    run.accelerator.print(
        f"resumed from {checkpoint} at step {run.state.step}"
        + (f" with {', '.join(changed)}" if changed else "")
    )


def fit(run: Run) -> float:
    """The training loop; returns its seconds."""
    bar = tqdm(
        total=run.total_steps,
        initial=run.state.step,
        disable=not run.accelerator.is_main_process,
        desc=f"training {run.cfg.name}",
    )
    started = time.perf_counter()
    while run.state.step < run.total_steps:
        out = train_step(run)
        bar.update()
        if run.state.step % run.cfg.log_every == 0 or run.state.step == run.total_steps:
            log_step(run, out, bar)
        if run.cfg.checkpoint_every and run.state.step % run.cfg.checkpoint_every == 0:
            if run.state.step < run.total_steps:
                checkpoint(run)
    bar.close()
    return time.perf_counter() - started


def train_step(run: Run) -> StepOutput:
    """One Adam step of every SAE this process holds, on the global batch."""
    cfg, acc, world = run.cfg, run.accelerator, run.accelerator.num_processes
    x = share_batch(acc, next(run.batches) / run.scale, run.mode)
    chunks = world if run.mode == "modules" else 1
    # Autocast covers the forward only: the SAEs' backward runs in their float32 (hub_sae/sae.py).
    with torch.autocast(acc.device.type, torch.bfloat16, enabled=cfg.sae_autocast != "no"):
        out = run.model(x, cfg.layers, run.since_fired > cfg.dead_tokens, cfg, chunks)
    check_finite(run, out.loss)
    acc.backward(out.loss.sum())
    run.saes.clip_and_project(cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.saes.normalise_decoders()

    fired = out.fired
    if run.mode == "replicate" and world > 1:
        fired = acc.reduce(fired.to(torch.uint8), reduction="sum") > 0
    run.since_fired += run.world_batch
    run.since_fired[fired] = 0
    run.state.step += 1
    run.state.tokens += run.world_batch
    return out


def check_finite(run: Run, loss: Tensor) -> None:
    """Stop at the first non-finite loss, naming the step and the SAE: no NaN suite is written."""
    if torch.isfinite(loss).all():
        return
    i = int((~torch.isfinite(loss)).nonzero()[0])
    layer, k = run.saes.keys[i]
    raise FloatingPointError(
        f"step {run.state.step + 1}: the loss of the SAE of layer {layer}, k {k} is "
        f"{loss[i].item()} (lr {run.scheduler.get_last_lr()[0]:.3g}); lower --lr (now "
        f"{run.cfg.lr}), keep --grad_clip, or check the activations with --dtype float32. "
        "Nothing was written for this run beyond its last checkpoint."
    )


def per_sae(run: Run, values: Tensor) -> dict[Key, float]:
    """Values [n_held] of this process's SAEs as {key: value} of every SAE, on every process."""
    keys = list(run.owner)
    full = torch.zeros(len(keys), device=run.accelerator.device)
    for i, key in enumerate(run.saes.keys):
        full[keys.index(key)] = values[i]
    if run.accelerator.num_processes > 1:
        full = run.accelerator.reduce(full, reduction="sum" if run.mode == "modules" else "mean")
    return dict(zip(keys, full.tolist(), strict=True))


def dead_shares(run: Run) -> dict[Key, float]:
    return per_sae(run, (run.since_fired > run.cfg.dead_tokens).float().mean(1))


def log_step(run: Run, out: StepOutput, bar: tqdm) -> None:
    fvus, dead = per_sae(run, out.fvu), dead_shares(run)
    bar.set_postfix(
        tokens=f"{run.state.tokens:,}",
        fvu=f"{sum(fvus.values()) / len(fvus):.3f}",
        dead=f"{100 * max(dead.values()):.1f}%",
    )
    run.accelerator.log(
        {
            **{f"fvu/layer_{layer}_k{k}": v for (layer, k), v in fvus.items()},
            **{f"dead/layer_{layer}_k{k}": v for (layer, k), v in dead.items()},
            "lr": run.scheduler.get_last_lr()[0],
        },
        step=run.state.step,
    )


def checkpoint(run: Run) -> None:
    """Each process saves its stream and (modules, or process 0 under replicate) its SAEs."""
    process = {"stream": run.stream.state_dict()}
    if run.mode == "modules" or run.accelerator.is_main_process:
        process |= {
            "saes": run.saes.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "since_fired": run.since_fired.cpu(),
        }
    save_checkpoint(run.accelerator, run.cfg, run.mode, trainer_state(run.state, run.cfg), process)


def finish(run: Run, train_seconds: float) -> Path | None:
    """Gather the SAEs on process 0, evaluate them, scan their feature statistics and write the suite."""
    cfg, acc, base = run.cfg, run.accelerator, run.base
    dead = dead_shares(run)
    held = [process_memory(run)]
    if acc.num_processes > 1:
        held = [None] * acc.num_processes
        dist.all_gather_object(held, process_memory(run))
    final = collect(
        run.saes, run.owner, lambda key: SAESet(cfg, base.d_model, base.name, [key]).sae(*key), acc
    )
    if not acc.is_main_process:
        return None
    for (layer, k), sae in final.items():
        if not all(torch.isfinite(p).all() for p in sae.parameters()):
            raise FloatingPointError(
                f"the SAE of layer {layer}, k {k} has non-finite weights; no suite was written. "
                f"Lower --lr (now {cfg.lr})."
            )
        sae.fold_input_scale(run.state.scale[cfg.layers.index(layer)])
        sae.eval()
    metrics = evaluate_suite(
        base, final, cfg.policy, cfg.corruption, cfg.data("heldout"), cfg.eval_tokens, seed=cfg.seed
    )
    features = None
    if cfg.feature_tokens:
        features = collect_features(
            base, final, cfg.policy, cfg.corruption, cfg.data(), cfg.feature_tokens, seed=cfg.seed
        )
    for (layer, k), m in metrics.items():
        m["train_dead_share"] = dead[layer, k]
        m["input_scale"] = run.state.scale[cfg.layers.index(layer)]
    training = {
        "processes": acc.num_processes,
        "distribute": run.mode,
        "held_by_process": held,
        "train_seconds": round(train_seconds, 1),
    }
    acc.print(f"writing the suite to {Path(cfg.output_dir) / cfg.name} ...")
    out_dir = save_suite(
        Path(cfg.output_dir) / cfg.name,
        final,
        metrics,
        suite_info(cfg, base, run.state, training),
        features,
    )
    shutil.rmtree(checkpoint_root(cfg), ignore_errors=True)
    acc.print(summary_table(metrics))
    acc.print(f"suite written to {out_dir}")
    return out_dir


def process_memory(run: Run) -> dict:
    """What this process holds: its SAEs, their weights' and Adam state's bytes (checks the plan)."""
    adam = [t for state in run.optimizer.state.values() for t in state.values()]
    return {
        "saes": list(run.saes.saes),
        "weight_bytes": sum(p.numel() * p.element_size() for p in run.saes.parameters()),
        "adam_bytes": sum(t.numel() * t.element_size() for t in adam),
    }


def suite_info(cfg: TrainConfig, base: BaseModel, state: TrainState, training: dict) -> SuiteInfo:
    """suite.json's description of the run."""
    return SuiteInfo(
        base_model=base.name,
        policy=cfg.policy,
        layers=list(cfg.layers),
        ks=list(cfg.ks),
        d_in=base.d_model,
        d_sae=cfg.latents(base.d_model),
        corruption=cfg.corruption,
        training={**asdict(cfg), "steps": state.step, "tokens": state.tokens, **training},
    )


def summary_table(metrics: dict[Key, dict]) -> str:
    rows = ["| layer | k | FVU | L0 | dead % |", "|---|---|---|---|---|"]
    for (layer, k), m in sorted(metrics.items()):
        rows.append(
            f"| {layer} | {k} | {m['fvu']:.3f} | {m['l0']:.1f} | {100 * m['dead_share']:.1f} |"
        )
    return "\n".join(rows)

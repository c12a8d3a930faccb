"""Checkpoints (whole or absent, one file per process) and the lock that keeps one run per name.

OUTPUT_DIR/checkpoints/NAME/step_XXXXXXXX/
  trainer.pt    step, tokens, input scale, the run's config, the process count and distribute mode
  rank_R.pt     process R's stream (position, generators, shuffle buffer); with modules also the
                SAEs it owns, their Adam state and dead counters (replicate: rank_0.pt holds them)
Every process writes into a hidden temp folder; after a barrier process 0 renames it into place,
then renames the older steps to hidden names before deleting them (whole or absent both ways).

A resumed run may change any field but those of RESUME_FIXED (refused by name, with the command to
use); the rest apply from the resumed step on (the lr schedule is a function of the step).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from hub_sae.io import folder_lock, writing
from hub_sae.training.config import CHECKPOINTS, TrainConfig

RESUME_FIXED = (
    "model", "dtype", "layers", "ks", "expansion_factor", "d_sae", "policy", "schedule", "t_min",
    "t_max", "corpus", "text_field", "ctx_len", "llm_batch_size", "total_tokens", "sae_batch_size",
    "reuse_activations", "seed",
)  # fmt: skip
"""What shapes the SAEs, the step count or the activation stream a checkpoint continues."""
STEP = re.compile(r"step_\d{8}")


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    scale: list[float] = field(default_factory=list)
    """Per-layer input scale sqrt(mean ||x||^2 / d), estimated before step 0."""


def checkpoint_root(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / CHECKPOINTS / cfg.name


def checkpoints(root: Path) -> list[Path]:
    """The step_XXXXXXXX folders under `root`, oldest first (a stray step_notes.txt is no step)."""
    return sorted(p for p in root.glob("step_*") if STEP.fullmatch(p.name) and p.is_dir())


def latest_checkpoint(cfg: TrainConfig) -> Path | None:
    steps = checkpoints(checkpoint_root(cfg))
    return steps[-1] if steps else None


def save_checkpoint(
    accelerator: Accelerator, cfg: TrainConfig, mode: str, trainer: dict, process: dict
) -> None:
    """`trainer` (process 0) and each process's `process` dict into step_<trainer step>/."""
    root, step = checkpoint_root(cfg), trainer["state"]["step"]
    tmp = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        for trash in root.glob(".old-step_*"):  # left by a run killed while deleting
            shutil.rmtree(trash, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with writing(tmp):
        torch.save(process, tmp / f"rank_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            layout = {"processes": accelerator.num_processes, "distribute": mode}
            torch.save({**trainer, **layout}, tmp / "trainer.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, root / f"step_{step:08d}")
        for old in checkpoints(root)[:-1]:  # renamed first: a kill mid-delete leaves no half step
            trash = root / f".old-{old.name}"
            os.replace(old, trash)
            shutil.rmtree(trash)
    accelerator.wait_for_everyone()


def load_checkpoint(
    path: Path, accelerator: Accelerator, cfg: TrainConfig, mode: str
) -> tuple[dict, dict, dict]:
    """(trainer, this process's file, the file holding its SAEs); a different layout is an error."""
    trainer = _load(path / "trainer.pt")
    check_resume(path, trainer.get("config", {}), cfg)
    saved = (trainer["processes"], trainer["distribute"])
    if saved != (accelerator.num_processes, mode):
        raise ValueError(
            f"{path} was written by {saved[0]} process(es) with distribute {saved[1]}; this launch "
            f"has {accelerator.num_processes} with {mode}. Resume with `accelerate launch "
            f"--num_processes {saved[0]}` and --distribute {saved[1]}, or start over without "
            f"--resume (delete {path.parent} first)."
        )
    own = _load(path / f"rank_{accelerator.process_index}.pt")
    sae_file = own if mode == "modules" else _load(path / "rank_0.pt")
    return trainer, own, sae_file


def _load(file: Path) -> dict:
    """One checkpoint file; a missing, truncated or damaged one is named with the fix."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"--resume: checkpoint file {file} cannot be read ({error}); it is missing, truncated "
            f"or damaged. Delete {file.parent} (a resume then starts from an earlier step_* "
            "folder, if one is left) or start over without --resume."
        ) from None


def check_sae_tensors(path: Path, saved: dict, current: dict) -> None:
    """Refuse SAE tensors that are missing, extra or of another shape than this launch's SAEs
    (a checkpoint written before checkpoints recorded their config), naming the first few."""
    shape = {name: tuple(t.shape) for name, t in current.items()}
    found = {name: tuple(t.shape) for name, t in saved.items()}
    problems = [
        f"{name} {list(found[name]) if name in found else 'missing'} (this launch: "
        f"{list(shape[name]) if name in shape else 'none'})"
        for name in sorted(shape.keys() | found.keys())
        if shape.get(name) != found.get(name)
    ]
    if problems:
        raise ValueError(
            f"--resume: the SAEs in {path} do not match this launch's --layers, --ks and "
            f"--d_sae / --expansion_factor: {'; '.join(problems[:4])}"
            f"{f' and {len(problems) - 4} more' if len(problems) > 4 else ''}. Resume with the "
            "settings of the run that wrote it, or train these as a new run (another --name, "
            "without --resume)."
        )


def _option(name: str, value) -> str:
    if value is None:
        return f"no --{name}"
    return f"--{name} " + " ".join(map(str, value if isinstance(value, list) else [value]))


def check_resume(path: Path, saved: dict, cfg: TrainConfig) -> None:
    """Refuse a resume that changes a field of RESUME_FIXED, naming each with both values."""
    changed = [f for f in RESUME_FIXED if f in saved and saved[f] != getattr(cfg, f)]
    if not changed:
        return
    was = ", ".join(_option(f, saved[f]) for f in changed)
    now = ", ".join(_option(f, getattr(cfg, f)) for f in changed)
    raise ValueError(
        f"--resume: {path} was written with {was}; this launch has {now}. A resumed run keeps "
        f"these (they shape the SAEs, the step count or the data stream). Resume with {was}; or "
        f"train the new settings as a new run: --name {cfg.name}-2 without --resume."
    )


@contextmanager
def run_lock(cfg: TrainConfig, accelerator: Accelerator) -> Iterator[None]:
    """Held by process 0 for the whole run: the suite folder's lock (`hub_sae.io.folder_lock`), so
    a second run of the same name, or a `hub-sae eval` of its suite, stops at once."""
    if not accelerator.is_main_process:
        yield
        return
    fix = (
        f"run {cfg.name!r} is already running (or its suite is being evaluated): wait for it to "
        "finish, or pick another --name."
    )
    with folder_lock(Path(cfg.output_dir) / cfg.name, fix):
        yield


def exit_with_launcher() -> None:
    """Under `accelerate launch`, exit once the launcher is gone: a killed launcher must not leave
    this process training (and racing a following --resume). Plain `python train.py` is left alone."""
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # set by every `accelerate launch`
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-launcher").start()


def trainer_state(state: TrainState, cfg: TrainConfig) -> dict:
    return {"state": asdict(state), "config": asdict(cfg)}

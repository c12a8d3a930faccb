"""Where the time of the default run goes: the real `train()` with timers around its phases.

Runs training/configs/minilm-mask.yaml (or --config) in this process, timing the trainer's own
calls: loading the base model, the base-model forwards that feed training (the first of them fill
the shuffle buffer: buffer_fill), the SAE steps (the rest of the training loop), the held-out evaluation, the
feature scan and writing the suite. Wall and process CPU seconds per phase, their shares of the
run, the CPU (model, vector extensions), threads and the load average before and after, to
results/default_run.json. Run it on an idle machine: under load every phase stretches.

    python benchmarks/default_run.py [--threads N] [train.py's options: --config YAML, --KEY VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import training.trainer as trainer  # noqa: E402
from training.train import parse_args  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "default_run.json"
PHASES = ("load", "buffer_fill", "harvest", "sae_steps", "evaluation", "features", "write")
"""The trainer's calls timed; `other` is the rest (start-up, initialisation, shuffles, accelerate)."""


def cpu_name() -> tuple[str, list[str]]:
    """The CPU model and its SIMD extensions (avx2, avx512*, amx*), from /proc/cpuinfo where present."""
    model, flags = platform.processor() or platform.machine(), []
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma")))
                break
    return model, flags


class Clock:
    """Wall and CPU seconds spent inside wrapped functions, per phase."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, fn: Callable) -> Callable:
        @wraps(fn)
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[phase] += time.perf_counter() - wall
                self.cpu[phase] += time.process_time() - cpu

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args, extra = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, _ = parse_args(extra)  # the entry point's --config and --KEY VALUE options
    clock = Clock()
    trainer.load_base_model = clock.wrap("load", trainer.load_base_model)
    trainer.harvest = clock.wrap("harvest", trainer.harvest)
    initialise = clock.wrap("buffer_fill", trainer.initialise)

    def fill_then_initialise(*args, **kwargs):
        """The first batch fills the shuffle buffer: its harvests count as buffer_fill."""
        wall, cpu = clock.wall["harvest"], clock.cpu["harvest"]
        try:
            return initialise(*args, **kwargs)
        finally:
            clock.wall["harvest"], clock.cpu["harvest"] = wall, cpu

    trainer.initialise = fill_then_initialise
    trainer.evaluate_suite = clock.wrap("evaluation", trainer.evaluate_suite)
    trainer.collect_features = clock.wrap("features", trainer.collect_features)
    trainer.save_suite = clock.wrap("write", trainer.save_suite)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        cfg.output_dir = out
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train(cfg)
        total_wall, total_cpu = time.perf_counter() - wall, time.process_time() - cpu
        suite = json.loads((Path(out) / cfg.name / "suite.json").read_text())
    # The training loop's time (after the buffer fill) less its harvests is the SAE steps.
    train_seconds = suite["training"]["train_seconds"]
    clock.wall["sae_steps"] = train_seconds - clock.wall["harvest"]
    clock.wall["other"] = total_wall - sum(clock.wall.values())
    model, flags = cpu_name()
    result = {
        "args": extra,
        "cpu": model,
        "cpu_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "total_wall_s": total_wall,
        "total_cpu_s": total_cpu,
        "train_seconds": train_seconds,
        # process CPU is not split inside the training loop: none for sae_steps and other
        "phases": {
            phase: {
                "wall_s": wall_s,
                "cpu_s": clock.cpu.get(phase) if phase not in ("sae_steps", "other") else None,
                "share": wall_s / total_wall,
            }
            for phase, wall_s in clock.wall.items()
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"{model} ({', '.join(flags)}); torch {result['torch_cpu_capability']}, ", end="")
    print(
        f"{result['threads']} threads; load {load_before:.2f} -> {result['load_average_after']:.2f}"
    )
    print("| phase | wall s | share |\n|---|---|---|")
    for phase, row in result["phases"].items():
        print(f"| {phase} | {row['wall_s']:.1f} | {100 * row['share']:.0f} % |")
    print(f"| total | {total_wall:.1f} | 100 % |")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

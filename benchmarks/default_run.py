"""Where the time of the default run goes: the real `train()` with timers around its phases.

Runs training/configs/minilm-mask.yaml (or --config) in this process and times the library calls
the trainer makes, wherever it imports them from: loading the base model, the harvests (base-model
forwards) before the first SAE step (filling the shuffle buffer) and after it, evaluation, the
feature scan and writing the suite; the SAE steps are the rest of the training loop. Wall and
process CPU seconds per phase, their shares, the CPU (model, vector extensions), threads and the
load average before and after go to results/default_run.json. Run it on an idle machine.

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

from hub_sae import activations, evaluate, features, models, suite  # noqa: E402
from hub_sae.sae import TopKSAE  # noqa: E402
from training.train import parse_args, train  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "default_run.json"
TIMED = {
    "load": models.load_base_model,
    "harvest": activations.harvest,
    "evaluation": evaluate.evaluate_suite,
    "features": features.collect_features,
    "write": suite.save_suite,
}
PHASES = ("load", "buffer_fill", "harvest", "sae_steps", "evaluation", "features", "write", "other")
"""`other`: start-up, initialisation, shuffles, accelerate."""


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
    """Wall and CPU seconds inside the timed calls; a call inside another (the evaluation's
    harvests) counts for the outer one, harvests before the first SAE step for buffer_fill."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.busy = False
        self.first_step: float | None = None
        self.loop_end: float | None = None

    def wrap(self, phase: str, fn: Callable) -> Callable:
        @wraps(fn)
        def timed(*args, **kwargs):
            if self.busy:
                return fn(*args, **kwargs)
            if phase == "evaluation" and self.loop_end is None:
                self.loop_end = time.perf_counter()
            self.busy, wall, cpu = True, time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy = False
                key = "buffer_fill" if phase == "harvest" and self.first_step is None else phase
                self.wall[key] += time.perf_counter() - wall
                self.cpu[key] += time.process_time() - cpu

        return timed


def patch_everywhere(original: Callable, replacement: Callable) -> None:
    """Replace `original` in every loaded module that holds it (the trainer imports by name)."""
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is original:
                setattr(module, name, replacement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args, extra = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, _ = parse_args(extra)  # the entry point's --config and --KEY VALUE options
    clock = Clock()
    for phase, fn in TIMED.items():
        patch_everywhere(fn, clock.wrap(phase, fn))
    project = TopKSAE.remove_gradient_parallel_to_decoder_directions

    def project_marks_first_step(sae: TopKSAE) -> None:
        """Called on every SAE's gradient in each step: the first call ends the buffer fill."""
        if clock.first_step is None:
            clock.first_step = time.perf_counter()
        project(sae)

    TopKSAE.remove_gradient_parallel_to_decoder_directions = project_marks_first_step
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        cfg.output_dir = out
        wall, cpu = time.perf_counter(), time.process_time()
        train(cfg)
        total_wall, total_cpu = time.perf_counter() - wall, time.process_time() - cpu
    # The training loop (first step to evaluation) less its harvests is the SAE steps.
    loop = (clock.loop_end or clock.first_step or 0.0) - (clock.first_step or 0.0)
    clock.wall["sae_steps"] = loop - clock.wall["harvest"]
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
        # process CPU is not split inside the training loop: none for sae_steps and other
        "phases": {
            phase: {
                "wall_s": wall_s,
                "cpu_s": None if phase in ("sae_steps", "other") else clock.cpu[phase],
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

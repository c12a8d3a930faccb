"""modules vs replicate with 2 CPU (gloo) processes: training tokens/s and bytes sent per step.

Both modes train the same 18 SAEs (MiniLM layers 0-5 x k 16, 32, 64, 3072 latents) on the same
data through the real launcher (`accelerate launch --multi_gpu --num_processes 2`, gloo). Runs
alternate between the modes; tokens/s is the trainer's own count over its loop time (suite.json).
Bytes per step are the collectives' payloads per process, from the tensor sizes (`--plan`):
replicate all-reduces every gradient, modules all-gathers the activations.

    python benchmarks/distribute.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hub_sae.training import TrainConfig
from hub_sae.training.plan import plan

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "distribute.json"
RUN = dict(
    name="bench-distribute",
    layers=[0, 1, 2, 3, 4, 5],
    ks=[16, 32, 64],
    expansion_factor=8,
    ctx_len=128,
    sae_batch_size=1024,
    buffer_tokens=4096,
    total_tokens=2 * 1024 * 24,
    warmup_steps=4,
    eval_tokens=1024,
    feature_tokens=0,
)


def run(mode: str, out: Path) -> dict:
    """One 2-process run; its suite.json `training` block."""
    args = []
    for key, value in {**RUN, "distribute": mode, "output_dir": str(out)}.items():
        args += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"),
        *("2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *(str(ROOT / "training" / "train.py"), *args),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    with open(out / "log.txt", "w") as log:  # a file, not a pipe: the progress bars never block
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError((out / "log.txt").read_text()[-3000:])
    return json.loads((out / RUN["name"] / "suite.json").read_text())["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternating")
    rounds = parser.parse_args().rounds
    planned = plan(TrainConfig(**RUN), 2)["modes"]
    speeds: dict[str, list[float]] = {"modules": [], "replicate": []}
    load = []
    for _ in range(rounds):
        for mode in speeds:
            with tempfile.TemporaryDirectory() as out:
                training = run(mode, Path(out))
            speeds[mode].append(training["tokens"] / training["train_seconds"])
            load.append(os.getloadavg()[0])
    result = {
        mode: {
            "tokens_per_s": speeds[mode],
            "comm_bytes_per_step": planned[mode]["comm_bytes_per_step"],
            "per_process_bytes": planned[mode]["per_process_bytes"],
        }
        for mode in speeds
    }
    best = {mode: max(v) for mode, v in speeds.items()}
    result["modules_over_replicate"] = best["modules"] / best["replicate"]
    result["load_average"] = load
    result["config"] = RUN
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| mode | tokens/s (best) | MB sent per step per process |\n|---|---|---|")
    for mode in speeds:
        mb = result[mode]["comm_bytes_per_step"] / 1e6
        print(f"| {mode} | {best[mode]:,.0f} | {mb:.1f} |")
    print(f"modules / replicate: {result['modules_over_replicate']:.2f}x; load average {load}")


if __name__ == "__main__":
    main()

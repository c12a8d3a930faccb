"""Held-out FVU against training steps: hub-sae vs eai-sparsify vs SAELens on MiniLM layer 3.

`train_step.py` compares FVU after its 64 timed steps only. This runs the same three set-ups
(its runners: same batches, Adam lr, b_dec init and AuxK mask) for twice the length of the
default training run (580 steps of 1024 tokens) and measures FVU on held-out activations along the
way, to tell a slower start from a worse end point.

    python benchmarks/fvu_curve.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from train_step import (
    BATCH,
    DEAD_SHARE,
    LR,
    REFERENCES,
    Case,
    activations,
    fvu,
    hub_runner,
    missing_references,
)

RESULTS = Path(__file__).parent / "results" / "fvu_curve.json"
CHECKPOINTS = (16, 64, 150, 290, 580)  # 290: the default run's length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = missing_references()
    for name, why in skip.items():
        print(f"reference {name} skipped: {why}")
    case = Case("minilm", 384, 8, 32, max(CHECKPOINTS))
    train, heldout = activations(case)
    batches = train.split(BATCH)
    dead = torch.rand(case.d_sae, generator=torch.Generator().manual_seed(3)) < DEAD_SHARE
    runners = {}
    for name, make in {"hub_sae": hub_runner, **REFERENCES}.items():
        if name not in skip:
            torch.manual_seed(0)
            runners[name] = make(case, dead, batches[0])
    curve = []
    for step, x in enumerate(batches, 1):
        for runner in runners.values():
            runner.step(x)
        if step in CHECKPOINTS:
            with torch.no_grad():
                row = {"step": step, "tokens": step * BATCH}
                row.update({name: fvu(r.reconstruct, heldout) for name, r in runners.items()})
            curve.append(row)
            print(
                ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                )
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    summary = {"case": {**vars(case), "lr": LR}, "skipped": skip, "curve": curve}
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

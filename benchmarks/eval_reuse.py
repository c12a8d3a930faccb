"""Evaluation of a suite with shared runs against the code before them (commit 97e9921).

The old `hub_sae/evaluate.py` is read from git and loaded as a module beside the current one; both
evaluate the same suite in memory (nothing is written) with the same model, SAEs, text and seed,
in alternating rounds. The metrics must be equal; the script prints wall and process CPU seconds
(medians), their ratio new / old, and the forwards of the base model each ran.

    python benchmarks/eval_reuse.py [--suite /work/default/minilm-mask] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

from hub_sae import evaluate
from hub_sae.models import load_base_model
from hub_sae.models.unmasking import with_unmasking_head
from hub_sae.sae import TopKSAE
from hub_sae.suite import layer_folders, read_suite

BEFORE = "97e9921"
"""The last commit whose evaluation reran the clean forward per SAE and the zero-ablation per k."""
ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "eval_reuse.json"


def old_module():
    """hub_sae/evaluate.py as of BEFORE, imported from a temp file."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:hub_sae/evaluate.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"evaluate_{BEFORE}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same(a, b) -> bool:
    """Equal, NaN included."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="/work/default/minilm-mask", help="suite folder (read)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--max-tokens", type=int, help="held-out positions (default: the suite's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    info = read_suite(args.suite)
    base = with_unmasking_head(load_base_model(info.base_model))  # the head is fitted once here
    saes = {key: TopKSAE.from_pretrained(f).eval() for key, f in layer_folders(args.suite).items()}
    data = info.heldout()
    max_tokens = evaluate.heldout_tokens(base, data, args.max_tokens or info.eval_tokens)
    forwards = 0

    def count(*_) -> None:
        nonlocal forwards
        forwards += 1

    base.model.register_forward_pre_hook(count)
    versions = {"old": old_module(), "new": evaluate}
    runs: dict[str, list[dict]] = {name: [] for name in versions}
    metrics = {}
    for r in range(args.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            forwards = 0
            wall, cpu = time.perf_counter(), time.process_time()
            metrics[name] = versions[name].evaluate_suite(
                base, saes, info.policy, info.corruption, data, max_tokens, progress=False
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[name].append({"wall_s": wall, "cpu_s": cpu, "forwards": forwards})
            print(f"round {r}: {name} {wall:.1f} s wall, {cpu:.1f} s CPU, {forwards} forwards")
        if not same(metrics["old"], metrics["new"]):
            sys.exit("the metrics differ between the old and the new evaluation")

    med = {
        name: {key: statistics.median(run[key] for run in rs) for key in ("wall_s", "cpu_s")}
        for name, rs in runs.items()
    }
    ratio = {key: med["new"][key] / med["old"][key] for key in ("wall_s", "cpu_s")}
    print(
        f"{info.base_model}, {len(saes)} SAEs, {max_tokens} held-out positions, "
        f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}; metrics equal"
    )
    print(f"{'':<5}{'wall s':>9}{'CPU s':>9}{'forwards':>10}")
    for name in versions:
        print(
            f"{name:<5}{med[name]['wall_s']:>9.1f}{med[name]['cpu_s']:>9.1f}"
            f"{runs[name][0]['forwards']:>10}"
        )
    print(f"new / old: {ratio['wall_s']:.3f} wall, {ratio['cpu_s']:.3f} CPU")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "suite": str(args.suite),
        "before": BEFORE,
        "saes": len(saes),
        "max_tokens": max_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_after": os.getloadavg(),
        "metrics_equal": True,
        "runs": runs,
        "median": med,
        "ratio_new_over_old": ratio,
    }
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

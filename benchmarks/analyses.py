"""CPU cost of each `hub-sae analyze` command on the default suite, as README shows them.

Each command runs in its own process with one thread (`OMP_NUM_THREADS=1`: on a shared 2-core
machine two threads wait on each other), and its CPU time (user + sys) is read from the child's
rusage. The reference, measured in the same run the same way: a process that only loads the suite
and its base model (`open_suite`), which every command pays before it analyses anything. Target:
each command <= about 60 s of CPU. `compare` matches the suite against its own sparsify export
(written to a temp folder first), unless --compare-with names another suite.

    python benchmarks/analyses.py [--suite runs/minilm-mask] [--compare-with SUITE_B]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "analyses.json"
TARGET_CPU_S = 60.0
LOAD = "from hub_sae.analysis.report import open_suite; open_suite({suite!r}, device='cpu')"


def commands(suite: str, other: str, out: Path) -> dict[str, list[str]]:
    """README's command of each analysis, writing into `out`."""
    hub = [sys.executable, "-m", "hub_sae.cli", "analyze"]
    decode = ["--device", "cpu"]
    return {
        "order": [
            *(*hub, "order", suite, "--prompts", str(ROOT / "docs" / "prompts-order.txt")),
            *(*decode, "--out", str(out / "order")),
        ],
        "steer": [
            *(*hub, "steer", suite, "--layer", "5", "--feature", "1434"),
            *("--values", "0", "1", "2", "4", "8", "--gen-length", "16", "--steps", "16"),
            *("--prompts", str(ROOT / "docs" / "prompts-steer.txt")),
            *(*decode, "--out", str(out / "steer")),
        ],
        "compare": [*hub, "compare", suite, other, "--out", str(out / "compare")],
        "insertion": [*hub, "insertion", suite, *decode, "--out", str(out / "insertion")],
    }


def run(cmd: list[str]) -> dict[str, float]:
    """Wall and CPU seconds of `cmd` in a one-thread child process; stops on a failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=str(ROOT / "runs" / "minilm-mask"))
    parser.add_argument("--compare-with", help="suite B of compare (default: SUITE's export)")
    args = parser.parse_args()
    if not (Path(args.suite) / "suite.json").is_file():
        sys.exit(f"{args.suite} is not a suite: run `python training/train.py` first.")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        other = args.compare_with
        if other is None:
            other = str(out / "export")
            export = [sys.executable, "-m", "hub_sae.cli", "export", args.suite]
            run([*export, "--format", "sparsify", "--out", other])
        rows = {"load (reference)": run([sys.executable, "-c", LOAD.format(suite=args.suite)])}
        for name, cmd in commands(args.suite, other, out).items():
            rows[name] = run(cmd)
            print((out / name / f"{name}.md").read_text())
    print("| command | CPU s | wall s | CPU - load | target |")
    print("|---|---:|---:|---:|---|")
    load = rows["load (reference)"]["cpu_s"]
    for name, row in rows.items():
        mark = "" if name.startswith("load") else ("ok" if row["cpu_s"] <= TARGET_CPU_S else "over")
        extra = "" if name.startswith("load") else f"{row['cpu_s'] - load:.1f}"
        print(f"| {name} | {row['cpu_s']:.1f} | {row['wall_s']:.1f} | {extra} | {mark} |")
    RESULTS.write_text(
        json.dumps(
            {
                "suite": args.suite,
                "compare_with": args.compare_with or "the suite's sparsify export",
                "machine": platform.processor() or platform.machine(),
                "load_average": os.getloadavg()[0],
                "target_cpu_s": TARGET_CPU_S,
                "commands": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

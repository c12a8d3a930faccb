"""Latency of the Space's analysis of one prompt: a 64-token prompt, all layers of a MiniLM suite.

What is timed is the `analyse` handler a click on "Analyse" runs: tokenise and mask, one forward
through the deepest hooked block, every layer's SAE, then the heat map, token table and feature
panel of the default layer. The prompt cache is cleared before each run. The suite is the newest
MiniLM run under runs/ (or a small one trained on the spot into runs/space-latency). Target:
median < 0.3 s on the CPU. The base-model forward alone (`capture`) is timed alongside, runs
alternating, as the reference: the machine's load moves both.

    python benchmarks/space_latency.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "space")]

from pydoc_data.topics import topics  # noqa: E402

import app  # noqa: E402
import torch  # noqa: E402
from explorer import Explorer  # noqa: E402

from hub_sae.activations import capture  # noqa: E402
from hub_sae.suite import read_suite  # noqa: E402

N_TOKENS, MASK_EVERY = 64, 6
WARMUP, REPEATS = 2, 9
TARGET_S = 0.3
RUNS = ROOT / "runs"
RESULTS = Path(__file__).parent / "results" / "space_latency.json"
SMALL_RUN = dict(
    name="space-latency",
    layers=[0, 1, 2, 3, 4, 5],
    ks=[32],
    ctx_len=64,
    total_tokens=8192,
    sae_batch_size=512,
    buffer_tokens=2048,
    warmup_steps=4,
    dead_tokens=4096,
    eval_tokens=1024,
    feature_tokens=2048,
)


def minilm_suite() -> Path:
    """The newest MiniLM suite under runs/, or a small one trained now."""
    suites = sorted(RUNS.glob("*/suite.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in suites:
        if read_suite(path.parent).base_model == "minilm":
            return path.parent
    from hub_sae.training import TrainConfig, train

    return train(TrainConfig(output_dir=str(RUNS), **SMALL_RUN))


def prompt_of(explorer: Explorer) -> str:
    """Pydoc prose of exactly N_TOKENS tokens ([CLS] and [SEP] included), every 6th one masked."""
    tokenizer = explorer.base.tokenizer
    text = topics["break"] + topics["continue"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for n in range(N_TOKENS + 16, 0, -1):
        masked = [
            tokenizer.mask_token_id if i % MASK_EVERY == 0 else t for i, t in enumerate(ids[:n])
        ]
        prompt = tokenizer.decode(masked)
        if len(explorer.tokenize(prompt)[0]) <= N_TOKENS:
            return prompt
    raise ValueError("could not build the prompt")


def median_times(fns: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Seconds of each function per run, called in turn (alternating) after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(WARMUP + REPEATS):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    suite = minilm_suite()
    explorer = Explorer.load(str(suite), device="cpu")
    prompt = prompt_of(explorer)
    layer = explorer.default_layer
    ids = explorer.prepare(prompt).input_ids[None]

    def handler() -> None:
        explorer.analyse.cache_clear()
        app.analyse(explorer, prompt, layer, 0.0, 0)

    times = median_times(
        {"handler": handler, "forward": lambda: capture(explorer.base, ids, None, explorer.layers)}
    )
    median = {name: statistics.median(t) for name, t in times.items()}
    sae = explorer.saes[layer]
    result = {
        "what": "space analyse handler: one forward for all layers + SAEs + heat map/table/panel",
        "reference": "forward: `capture` of the same layers alone (the base-model forward)",
        "suite": suite.name,
        "layers": explorer.layers,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "prompt_tokens": int(ids.shape[1]),
        "analysed_positions": int(explorer.prepare(prompt).selected.sum()),
        "device": f"cpu ({platform.machine()}), torch threads {torch.get_num_threads()}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": REPEATS,
        "median_s": round(median["handler"], 4),
        "min_s": round(min(times["handler"]), 4),
        "max_s": round(max(times["handler"]), 4),
        "forward_median_s": round(median["forward"], 4),
        "handler_over_forward": round(median["handler"] / median["forward"], 2),
        "target_s": TARGET_S,
        "meets_target": median["handler"] < TARGET_S,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

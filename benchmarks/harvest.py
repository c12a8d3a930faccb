"""Cost of `capture` against a plain forward that stops at the same block (embedded MiniLM, CPU).

The reference is a copy of the model whose block list is cut after the deepest hooked block, so
the ratio capture / reference is the overhead of the hooks and the early exit (target <= 1.05).
The full forward is timed too, to show what the early exit saves. Runs alternate between the
three so drift in machine load hits them alike; each time is the median over REPEATS runs.

    python benchmarks/harvest.py
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pydoc_data.topics import topics

import torch
from torch import nn

from hub_sae.activations import capture
from hub_sae.models import BaseModel
from hub_sae.models.hf import load_hf

BATCH, SEQ_LEN = 8, 128
WARMUP, REPEATS = 3, 15
CASES = [[1, 3, 5], [1, 3]]
RESULTS = Path(__file__).parent / "results" / "harvest.json"


def pydoc_batch(base: BaseModel) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH rows of SEQ_LEN tokens of pydoc prose, [CLS] first."""
    text = " ".join(topics[key] for key in sorted(topics))[:40_000]
    ids = base.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = SEQ_LEN - 1
    rows = [[base.bos_token_id, *ids[i * n : (i + 1) * n]] for i in range(BATCH)]
    input_ids = torch.tensor(rows)
    return input_ids, torch.ones_like(input_ids)


def truncated(model: nn.Module, deepest: int) -> nn.Module:
    """A copy of a BERT model whose encoder ends after block `deepest`."""
    model = copy.deepcopy(model)
    model.encoder.layer = model.encoder.layer[: deepest + 1]
    return model


def median_times(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds of each function, called in turn (alternating) after a warm-up."""
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_case(
    base: BaseModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]
) -> dict[str, object]:
    """Times of capture, the truncated reference and the full forward for one set of layers."""
    deepest = max(layers)
    reference = truncated(base.model, deepest)
    expected = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    got = capture(base, input_ids, attention_mask, layers)[deepest]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    t = median_times(
        {
            "capture": lambda: capture(base, input_ids, attention_mask, layers),
            "reference": lambda: reference(input_ids=input_ids, attention_mask=attention_mask),
            "full": lambda: base.model(input_ids=input_ids, attention_mask=attention_mask),
        }
    )
    return {
        "layers": layers,
        "blocks_run": deepest + 1,
        "capture_ms": 1e3 * t["capture"],
        "reference_ms": 1e3 * t["reference"],
        "full_ms": 1e3 * t["full"],
        "ratio": t["capture"] / t["reference"],
    }


@torch.no_grad()
def main() -> None:
    base = load_hf("minilm")
    input_ids, attention_mask = pydoc_batch(base)
    results = [bench_case(base, input_ids, attention_mask, layers) for layers in CASES]

    print(f"capture vs truncated forward, MiniLM-L6, batch {BATCH} x {SEQ_LEN}, CPU")
    print(f"{'layers':<10}{'blocks':>7}{'capture ms':>12}{'ref ms':>9}{'full ms':>9}{'ratio':>8}")
    for r in results:
        print(
            f"{str(r['layers']):<10}{r['blocks_run']:>7}{r['capture_ms']:>12.2f}"
            f"{r['reference_ms']:>9.2f}{r['full_ms']:>9.2f}{r['ratio']:>8.3f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": "minilm",
                "batch": BATCH,
                "seq_len": SEQ_LEN,
                "repeats": REPEATS,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "target_ratio": 1.05,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

"""Peak memory of the feature scan (`collect_features`) at N and 4N tokens: flat in the tokens.

Each size runs in its own subprocess: the embedded MiniLM and two random TopK SAEs (layers 1 and
3, d_sae 1536, k 32) are loaded, then the peak RSS is restarted (tests/conftest.py's PEAK_RSS) and
the scan runs; what it added to the peak is its cost. glibc's mmap threshold is fixed at 1 MiB
(MALLOC_MMAP_THRESHOLD_), so freed large blocks leave the RSS instead of lingering in the heap
(without it the peak after the scan varied by ~0.5 GB from run to run). The ratio peak(4N) / peak(N) is the check
(flat: ~1). Also prints `state_bytes`, the kept state the module docstring plans for.

    python benchmarks/feature_memory.py [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import PEAK_RSS  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "feature_memory.json"
D_SAE, K, LAYERS = 1536, 32, (1, 3)

CHILD = f"""
import json, sys, time, torch
from hub_sae.data import DataConfig
from hub_sae.features import collect_features
from hub_sae.masking import Corruption
from hub_sae.models import load_base_model
from hub_sae.sae import TopKSAE
torch.manual_seed(0)
base = load_base_model("minilm")
saes = {{l: TopKSAE(base.d_model, {D_SAE}, {K}, layer=l).eval() for l in {LAYERS}}}
data = DataConfig(split="train", ctx_len=128, batch_size=8)
{PEAK_RSS}
start = time.process_time()
stats = collect_features(base, saes, "mask", Corruption(), data, int(sys.argv[1]), progress=False)
print(json.dumps({{"tokens": stats[1].tokens, "peak_added_mb": (kb("VmHWM") - before) / 1024,
                  "cpu_s": time.process_time() - start}}))
"""


def run(tokens: int) -> dict:
    """The scan of `tokens` policy positions in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # freed large blocks go back: RSS is what is live
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="N (default 2048)")
    args = parser.parse_args()
    from hub_sae.features import state_bytes

    rows = [run(args.tokens), run(4 * args.tokens)]
    result = {
        "d_sae": D_SAE,
        "saes": len(LAYERS),
        "state_bytes_per_sae": state_bytes(D_SAE, 8, 5),
        "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
        "ratio": rows[1]["peak_added_mb"] / rows[0]["peak_added_mb"],
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| tokens | peak added MB | CPU s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['tokens']:,} | {row['peak_added_mb']:.1f} | {row['cpu_s']:.1f} |")
    print(
        f"ratio 4N / N: {result['ratio']:.3f}; kept state {result['state_bytes_per_sae'] / 1e6:.1f} MB per SAE"
    )


if __name__ == "__main__":
    main()

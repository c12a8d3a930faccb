#!/usr/bin/env bash
# Run every benchmark; each writes its JSON to benchmarks/results/ and prints a table.
# The train-step comparison needs the references (`pip install -e '.[bench]'`), best in a venv of
# their own: PYTHON=.venv-bench/bin/python benchmarks/run_all.sh. Extra arguments go to
# train_step.py (e.g. --small).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" benchmarks/harvest.py
"$PYTHON" benchmarks/train_step.py "$@"
"$PYTHON" benchmarks/fvu_curve.py
if [[ -f benchmarks/space_latency.py ]]; then
    "$PYTHON" benchmarks/space_latency.py
fi
"$PYTHON" benchmarks/distribute.py
if [[ -d runs/minilm-mask ]]; then  # the analyses run on the default suite
    "$PYTHON" benchmarks/analyses.py
fi

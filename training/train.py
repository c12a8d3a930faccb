"""Train a suite of TopK SAEs: `python training/train.py [--config YAML] [--resume] [--FIELD VALUE ...]`.

Several processes: `accelerate launch --multi_gpu --num_processes N training/train.py ...`.

With no arguments it runs the embedded default (configs/minilm-mask.yaml): MiniLM, pydoc corpus,
mask policy, all 6 layers, on CPU in minutes. Every TrainConfig field can be overridden on the
command line, e.g. `--total_tokens 50000 --layers 1 3`. `--plan [--num_processes N] [--json]`
prints the memory and communication per process and exits without loading anything.
"""

import json
import os

from hub_sae.training import parse_args, train
from hub_sae.training.plan import format_plan, plan

if __name__ == "__main__":
    config, options = parse_args()
    if options.plan:
        processes = options.num_processes or int(os.environ.get("WORLD_SIZE", 1))
        result = plan(config, processes)
        print(json.dumps(result, indent=2) if options.json else format_plan(result))
    else:
        train(config, resume=options.resume)

"""Train a suite of TopK SAEs: `accelerate launch training/train.py [--config YAML] [--resume] [--KEY VALUE ...]`.

With no arguments it runs the embedded default (configs/minilm-mask.yaml): MiniLM, pydoc corpus,
mask policy, all 6 layers, on CPU in minutes. Every TrainConfig field can be overridden on the
command line, e.g. `--total_tokens 50000 --layers "[1, 3]"`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.trainer import TrainConfig, train  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "minilm-mask.yaml"


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML file of TrainConfig fields"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint of this run"
    )
    for f in fields(TrainConfig):
        parser.add_argument(
            f"--{f.name}", type=yaml.safe_load, default=None, help=f.metadata.get("help", "")
        )
    args = parser.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    return TrainConfig.from_yaml(args.config, **overrides), args.resume


if __name__ == "__main__":
    config, resume = parse_args()
    train(config, resume=resume)

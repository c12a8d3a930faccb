"""The `hub-sae analyze` subcommands: their arguments, and the function each one runs.

Every command loads what it needs, returns a `Report` and writes it into --out (a new folder).
"""

from __future__ import annotations

import argparse
from importlib import import_module

RUNS = {
    "order": "hub_sae.analysis.dynamics:run_order",
    "steer": "hub_sae.analysis.steering:run_steer",
    "compare": "hub_sae.analysis.matching:run_compare",
    "insertion": "hub_sae.analysis.insertion:run_insertion",
}
"""Each command's `run(args) -> Report`, imported only when that command runs."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="new (or empty) folder")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")


def _decoding(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line")
    parser.add_argument("--k", type=int, help="the suite's SAEs with this k (default: its default)")
    parser.add_argument("--gen-length", type=int, default=32, help="tokens to generate")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps")


def add_analyses(analyze: argparse.ArgumentParser) -> None:
    """Add the subcommands of `hub-sae analyze` to its parser."""
    from hub_sae.cli import positive_int

    commands = analyze.add_subparsers(dest="analysis", required=True)

    order = commands.add_parser(
        "order", help="feature dynamics of each sampler and decoding order, side by side"
    )
    order.add_argument("suite", help="suite folder or hub repo id")
    order.add_argument("--layer", type=int, help="layer to trace (default: the suite's default)")
    _decoding(order)
    order.add_argument(
        "--block-length",
        type=positive_int,
        help="LLaDA's block length, dividing --gen-length (default: one block, as Dream's)",
    )
    order.add_argument(
        "--top",
        type=positive_int,
        help="features recorded per position and step, the sets compared (default: the SAEs' k)",
    )
    _common(order)

    steer = commands.add_parser(
        "steer", help="DLM-Scope steering sweep: concept and fluency by steering value"
    )
    steer.add_argument("suite", help="suite folder or hub repo id")
    steer.add_argument("--layer", type=int, required=True, help="layer of the steered feature")
    steer.add_argument("--feature", type=int, required=True, help="feature id to steer")
    steer.add_argument(
        "--values", type=float, nargs="+", default=[0, 1, 2, 4, 8], help="steering values"
    )
    steer.add_argument(
        "--mode",
        choices=["relative", "add", "clamp"],
        default="relative",
        help="relative (DLM-Scope): feature += value x the position's largest SAE activation; "
        "add: feature += value; clamp: feature = value",
    )
    steer.add_argument(
        "--positions",
        choices=["all", "masked", "top"],
        default="all",
        help="steer at every position, the still-masked ones, or the --top-positions where the "
        "feature fires most (each step)",
    )
    steer.add_argument(
        "--top-positions", type=positive_int, default=1, help="with --positions top: how many"
    )
    steer.add_argument(
        "--sampler",
        choices=["llada", "dream"],
        help="LLaDA's generate or Dream's diffusion_generate (default: the model family's)",
    )
    _decoding(steer)
    _common(steer)

    compare = commands.add_parser(
        "compare", help="match two suites' features one to one by decoder cosine"
    )
    compare.add_argument("suite_a", help="suite folder, release or hub repo id")
    compare.add_argument("suite_b", help="suite folder, release or hub repo id")
    compare.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.5, 0.7, 0.9],
        help="report the share of matched pairs with cosine above each",
    )
    compare.add_argument("--out", required=True, metavar="DIR", help="new (or empty) folder")

    insertion = commands.add_parser(
        "insertion", help="SAE insertion loss by layer and masking ratio; DLM beside AR"
    )
    insertion.add_argument("suite", help="suite of a diffusion LM (folder or hub repo id)")
    insertion.add_argument(
        "suite_ar", nargs="?", help="suite of an autoregressive model, drawn beside it"
    )
    insertion.add_argument(
        "--max-tokens",
        type=positive_int,
        help="held-out tokens per loss and t bin, in whole batches (default: 1024)",
    )
    insertion.add_argument("--k", type=int, help="SUITE's SAEs with this k (default: its default)")
    insertion.add_argument(
        "--k-ar", type=int, help="SUITE_AR's SAEs with this k (default: its default)"
    )
    _common(insertion)


def run_analysis(args: argparse.Namespace) -> int:
    """Run `hub-sae analyze NAME`: compute its Report, write it into --out, print its table."""
    from hub_sae.analysis.report import write_report

    module, name = RUNS[args.analysis].split(":")
    report = getattr(import_module(module), name)(args)
    out = write_report(report, args.out)
    print(report.table)
    print(f"wrote {out}/{report.name}.json, .png and .md")
    return 0

"""The `hub-sae` command: evaluate a suite, write its model card, push it to the Hub.

    hub-sae eval SUITE [--max-tokens N] [--device D]       layer_{L}/metrics.json + metrics.json
    hub-sae eval SUITE --base-model OTHER --out DIR         the same, measured on another checkpoint
    hub-sae features SUITE [--max-tokens N] [--out DIR] [--device D]
                                                            layer_{L}/features.safetensors
    hub-sae card SUITE [--repo-id ID]                       README.md + the FVU plot
    hub-sae card --release CONFIG --metrics JSON --out DIR  a release's card from reported metrics
    hub-sae push SUITE --repo-id ID [--private] [--dry-run] [--revision R] [--create-pr]
                                                            one commit with the whole suite
    hub-sae export SAE_OR_SUITE --format saelens|sparsify --out DIR
                                                            folders SAELens / sparsify load
    hub-sae export SUITE --format delphi --out DIR [--max-tokens N] [--n-splits S]
                                                            delphi's latent cache (auto-interp)
    hub-sae analyze order|steer|compare|insertion ... --out DIR
                                                            DLM-Scope's analyses: JSON, PNG, table

SUITE is a suite folder, or (eval, features, card) a hub repo id: downloaded into the hub cache
and copied into --out DIR (a new folder), where the command writes; nothing is written into the
cache or into a folder picked by the repo's name.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import fields
from importlib import import_module
from pathlib import Path


def suite_to_write(suite: str, out: str | None, revision: str | None, command: str) -> Path:
    """The folder `hub-sae COMMAND` writes into: a local suite itself, or a copy in `out` (a new
    folder) of a local suite or of a hub repo's snapshot in the hub cache. A repo id needs `out`."""
    from hub_sae.io import HubOptions, local_path, new_folder, write_folder

    path = local_path(suite)
    if path is not None and out is None:
        return path
    if out is None:
        raise ValueError(
            f"{suite} is a hub repo id, and `hub-sae {command}` writes into the suite: give a new "
            f"folder for a copy of it with --out DIR (e.g. --out ./{suite.split('/')[-1]})."
        )
    with new_folder(out) as target:
        source = path or HubOptions(revision=revision).snapshot(suite)
        # a local suite's links stay links (the checks that follow refuse those leading out);
        # the cache's links to its blobs are copied as files
        write_folder(
            target,
            lambda tmp: shutil.copytree(
                source,
                tmp,
                symlinks=path is not None,
                ignore=shutil.ignore_patterns(".*"),
                dirs_exist_ok=True,
            ),
        )
    return Path(out)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; give a number >= 1")
    return value


def torch_device(name: str) -> str:
    """`name` ("auto": cuda if available, else cpu), refused when this machine cannot run it."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA device(s) "
                f"(torch {torch.__version__}); use --device cpu"
                + (f" or cuda:0..{count - 1}" if count else "")
            )
    return name


def _eval(args: argparse.Namespace) -> int:
    """`hub-sae eval`: re-measure every SAE of a suite and write its metrics."""
    from hub_sae.cards import by_t_table, metric_table
    from hub_sae.evaluate import SUMMARY_FILE, check_base_model, evaluate_saved_suite
    from hub_sae.io import local_path
    from hub_sae.suite import read_suite

    if args.base_model and not args.out:
        raise ValueError(
            f"--base-model {args.base_model} measures the suite on another checkpoint, and the "
            "suite's own metrics stay as they are: give a new folder for a copy of the suite to "
            "hold the new metrics with --out DIR."
        )
    if args.base_model and local_path(args.suite) is not None:  # refused before the copy
        check_base_model(read_suite(args.suite), args.base_model)
    device = torch_device(args.device)
    root = suite_to_write(args.suite, args.out, args.revision, "eval")
    metrics = evaluate_saved_suite(
        root,
        args.max_tokens,
        device,
        args.dtype,
        args.corpus,
        args.split,
        args.seed,
        args.base_model,
    )
    print(metric_table(metrics))
    print(by_t_table(metrics))
    print(f"wrote {len(metrics)} metrics.json files and {root / SUMMARY_FILE}")
    return 0


def _features(args: argparse.Namespace) -> int:
    """`hub-sae features`: rescan a suite's training text (its corpus, seed, policy and corruption)
    and write every SAE's features.safetensors, each atomically, once all are scanned, under the
    suite's lock. --max-tokens defaults to the run's feature_tokens."""
    import time

    import torch

    from hub_sae.data import DataConfig
    from hub_sae.features import FEATURE_TOKENS, FEATURES_FILE, collect_features, save_features
    from hub_sae.io import folder_lock
    from hub_sae.models import load_base_model
    from hub_sae.sae import TopKSAE
    from hub_sae.suite import layer_folders, read_suite

    device = torch_device(args.device)
    root = suite_to_write(args.suite, args.out, args.revision, "features")
    start = time.perf_counter()
    fix = "a training run or another command is writing it: wait for it to finish, then rerun."
    with folder_lock(root, fix):
        info = read_suite(root)
        training = info.training
        max_tokens = args.max_tokens or training.get("feature_tokens") or FEATURE_TOKENS
        data = info.heldout(
            training.get("corpus", DataConfig().corpus), "train", training.get("seed", 0)
        )
        base = load_base_model(info.base_model, dtype=getattr(torch, info.dtype), device=device)
        folders = layer_folders(root, info)
        saes = {key: TopKSAE.from_pretrained(f, device=device).eval() for key, f in folders.items()}
        stats = collect_features(
            base, saes, info.policy, info.corruption, data, max_tokens, seed=data.seed
        )
        for key, folder in folders.items():
            save_features(folder / FEATURES_FILE, stats[key], {"base_model": info.base_model})
    tokens = next(iter(stats.values())).tokens
    print(
        f"wrote every SAE's {FEATURES_FILE} under {root} ({tokens:,} positions scanned in "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return 0


def _card(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`hub-sae card`: write the model card and plot of a suite or of a release."""
    from hub_sae.cards import PLOT_FILE, release_spec, suite_spec, write_card
    from hub_sae.io import folder_lock, local_path

    if args.release:
        if args.suite or not (args.metrics and args.out):
            parser.error("card --release CONFIG needs --metrics JSON and --out DIR, and no SUITE")
        spec = release_spec(args.release, args.metrics, args.repo_id)
        out = Path(args.out)
    elif args.suite:
        out = suite_to_write(args.suite, args.out, args.revision, "card")
        repo_id = args.repo_id or (args.suite if local_path(args.suite) is None else None)
        spec = suite_spec(out, repo_id)
    else:
        parser.error("card needs SUITE, or --release CONFIG --metrics JSON --out DIR")
    if args.license:
        spec.license = args.license
    with folder_lock(out):
        path = write_card(spec, out, args.template)
    plot = f" and {out / PLOT_FILE}" if spec.metrics else ""
    print(f"wrote {path}{plot} (for {spec.repo_id})")
    return 0


def _push(args: argparse.Namespace) -> int:
    """`hub-sae push`: check a suite and upload it in one commit (or list it with --dry-run)."""
    from hub_sae.publish import check_publishable, format_file_list, push_suite, stray_files

    root = Path(args.suite)
    files = check_publishable(root, args.repo_id, args.include)
    extra = [f.path_in_repo for f in stray_files(root, files)]
    if extra:
        print(f"beyond the suite layout, named by --include: {', '.join(extra)}", file=sys.stderr)
    if args.dry_run:
        visibility = "private" if args.private else "public"
        print(
            f"dry run: would push {len(files)} files to {args.repo_id} ({visibility}) in one commit"
        )
        print(format_file_list(files))
        return 0
    commit = push_suite(
        root,
        args.repo_id,
        args.private,
        args.token,
        args.message,
        args.revision,
        args.create_pr,
        files=files,
        include=args.include,
    )
    where = f"pull request {commit.pr_url}" if commit.pr_url else f"one commit: {commit.commit_url}"
    print(f"pushed {root} to {args.repo_id} in {where}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """`hub-sae export`: write SAELens or sparsify folders, or delphi's latent cache."""
    from hub_sae.delphi import DelphiExport
    from hub_sae.export import export

    names = [f.name for f in fields(DelphiExport)]
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if options and args.format != "delphi":
        given = ", ".join(f"--{name.replace('_', '-')}" for name in options)
        raise ValueError(f"{given} only apply to --format delphi; drop them for {args.format}.")
    delphi = None
    if args.format == "delphi":
        delphi = DelphiExport(**{**options, "device": torch_device(args.device or "auto")})
    folders = export(args.source, args.format, args.out, args.layer, args.k, delphi)
    print(f"wrote {len(folders)} {args.format} folder(s) under {args.out}:")
    for folder in folders:
        print(f"  {folder}")
    return 0


ANALYSES = {
    "order": "hub_sae.analysis.dynamics:run_order",
    "steer": "hub_sae.analysis.steering:run_steer",
    "compare": "hub_sae.analysis.matching:run_compare",
    "insertion": "hub_sae.analysis.insertion:run_insertion",
}
"""Each `hub-sae analyze` command's `run(args) -> Report` (args.device resolved), imported only
when that command runs."""


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


def _add_analyses(analyze: argparse.ArgumentParser) -> None:
    """Add the subcommands of `hub-sae analyze` to its parser."""
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


def _analyze(args: argparse.Namespace) -> int:
    """`hub-sae analyze NAME`: compute its Report, write it into --out, print its table."""
    from hub_sae.analysis.report import write_report

    if hasattr(args, "device"):
        args.device = torch_device(args.device)
    module, name = ANALYSES[args.analysis].split(":")
    report = getattr(import_module(module), name)(args)
    out = write_report(report, args.out)
    print(report.table)
    print(f"wrote {out}/{report.name}.json, .png and .md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hub-sae` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="hub-sae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ev = commands.add_parser("eval", help="re-measure a suite's metrics on held-out text")
    ev.add_argument("suite", help="suite folder or hub repo id")
    ev.add_argument(
        "--max-tokens",
        type=positive_int,
        help="activations per SAE (default: the run's eval_tokens)",
    )
    ev.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    ev.add_argument("--dtype", help="base-model dtype (default: the run's dtype)")
    ev.add_argument("--corpus", help="held-out corpus (default: the run's corpus)")
    ev.add_argument(
        "--split",
        default=None,
        help="corpus split (default: the one the suite was evaluated on when trained)",
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the document order and the masks")
    ev.add_argument(
        "--base-model",
        metavar="OTHER",
        help="measure the SAEs on another checkpoint of the same width (a fine-tune, base -> "
        "instruct): name, folder or hub repo id; needs --out (default: the suite's base model)",
    )

    feat = commands.add_parser(
        "features", help="rescan feature statistics: histograms, examples by band, logit effects"
    )
    feat.add_argument("suite", help="suite folder or hub repo id")
    feat.add_argument(
        "--max-tokens",
        type=positive_int,
        help="policy positions to scan (default: the run's feature_tokens)",
    )
    feat.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    feat.add_argument(
        "--out",
        metavar="DIR",
        help="new folder for a copy of SUITE to write into (needed when SUITE is a repo id; "
        "default: SUITE itself)",
    )

    card = commands.add_parser("card", help="write README.md (model card) and the FVU plot")
    card.add_argument("suite", nargs="?", help="suite folder or hub repo id")
    card.add_argument("--repo-id", help="repo the card is for (default: the suite folder's name)")
    card.add_argument("--release", metavar="CONFIG", help="training YAML of a release")
    card.add_argument("--metrics", metavar="JSON", help="reported metrics of the release")
    card.add_argument(
        "--out",
        metavar="DIR",
        help="new folder: for the release's card, or for a copy of SUITE to write the card into "
        "(needed when SUITE is a repo id)",
    )
    card.add_argument("--license", help="license of the SAE weights (default: apache-2.0)")
    card.add_argument("--template", help="Jinja card template (default: model_cards/template.md)")

    ev.add_argument(
        "--out",
        metavar="DIR",
        help="new folder for a copy of SUITE to write the metrics into (needed when SUITE is a "
        "repo id and with --base-model; default: SUITE itself)",
    )
    for sub in (ev, feat, card):
        sub.add_argument("--revision", help="hub revision, when SUITE is a repo id")

    push = commands.add_parser("push", help="upload a complete suite in one commit")
    push.add_argument("suite", help="suite folder")
    push.add_argument("--repo-id", required=True, help="target repo, owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument(
        "--dry-run", action="store_true", help="list the files and sizes; upload nothing"
    )
    push.add_argument("--token", help="hub token (default: the logged-in one)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--revision", help="branch to commit to (default: main)")
    push.add_argument(
        "--create-pr", action="store_true", help="open a pull request instead of committing"
    )
    push.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also upload the files beyond the suite layout that PATTERN names (a glob on the path "
        "in the repo, e.g. 'notes/*'); others are refused. Repeatable",
    )

    from hub_sae.export import FORMATS

    exp = commands.add_parser(
        "export", help="write SAELens or sparsify folders of a suite or SAE, or a delphi cache"
    )
    exp.add_argument("source", metavar="SAE_OR_SUITE", help="suite folder, SAE folder or repo id")
    exp.add_argument("--format", required=True, choices=FORMATS)
    exp.add_argument("--out", required=True, help="new (or empty) folder to write")
    exp.add_argument("--layer", type=int, help="export only this layer's SAE")
    exp.add_argument("--k", type=int, help="export only the SAE with this k")
    cache = exp.add_argument_group("delphi (--format delphi: a local suite's latent activations)")
    cache.add_argument(
        "--max-tokens",
        type=positive_int,
        help="tokens of text to read, in whole contexts (default: the suite's eval_tokens)",
    )
    cache.add_argument(
        "--n-splits", type=positive_int, help="shards per SAE by latent range (default: 5)"
    )
    cache.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    cache.add_argument("--corpus", help="text to read (default: the suite's held-out corpus)")
    cache.add_argument("--split", help="its split (default: the suite's held-out split)")
    cache.add_argument("--seed", type=int, help="seed of the document order and masks (default: 0)")

    _add_analyses(commands.add_parser("analyze", help="DLM-Scope's analyses of a suite"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hub-sae` on `argv` (default: sys.argv); the exit status is 1 on a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "card" and args.template is None:
        from hub_sae.cards import TEMPLATE

        args.template = TEMPLATE
    from hub_sae.io import FolderBusyError

    try:
        if args.command == "eval":
            return _eval(args)
        if args.command == "features":
            return _features(args)
        if args.command == "card":
            return _card(args, parser)
        if args.command == "export":
            return _export(args)
        if args.command == "analyze":
            return _analyze(args)
        return _push(args)
    except (OSError, ValueError, FolderBusyError) as e:
        print(f"hub-sae: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

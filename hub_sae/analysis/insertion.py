"""SAE insertion loss by layer (`hub-sae analyze insertion`), as in DLM-Scope's figure: a diffusion
LM's ΔLM per layer and masking-ratio bin beside an autoregressive model's next-token ΔCE.

Both are measured in memory by `evaluate.evaluate_suite` on each suite's held-out text, with the
same seed and token budget, and nothing is written into the suites. A suite's metrics.json is not
read: it may come from another seed, budget or hub-sae version, hold no rows by t, or be absent
(releases). Negative values (the SAE lowers the loss) are kept as they are.
"""

from __future__ import annotations

import argparse
import math

from hub_sae.analysis.report import Report, open_suite
from hub_sae.data import DataConfig
from hub_sae.evaluate import METRICS, T_BINS, evaluate_suite
from hub_sae.masking import Corruption
from hub_sae.models import family
from hub_sae.suite import suite_info

DEFAULT_TOKENS = 1024
"""Held-out tokens per loss (per t bin for the DLM) when --max-tokens is not given: one batch of
the default run (8 x 128). Each batch costs the default suite about 70 MiniLM forwards (8 per
t bin, 3 per SAE for the spliced losses), about 1.5 min of CPU."""
LABELS = {m.key: m.label for m in METRICS}


def check_side(source: str, name: str, kind: str, autoregressive: bool) -> None:
    """Refuse a suite of base model `name` of family `kind` on the wrong side: an autoregressive
    one as SUITE, a diffusion LM as SUITE_AR."""
    if autoregressive and kind != "ar":
        raise ValueError(
            f"SUITE_AR {source} is a suite of {name} (family {kind}), not of an autoregressive "
            "model: give a diffusion LM's suite first, as SUITE, and a causal LM's suite (policy "
            "clean) second."
        )
    if not autoregressive and kind == "ar":
        raise ValueError(
            f"SUITE {source} is a suite of the autoregressive model {name}: it has no ΔLM by "
            "masking ratio. Pass it second, as SUITE_AR, after a diffusion LM's suite."
        )


def measure(
    source: str,
    k: int | None,
    device: str,
    max_tokens: int,
    seed: int,
    autoregressive: bool = False,
) -> dict:
    """`evaluate_suite` on a suite's held-out text: `max_tokens` tokens of held-out batches feed
    each loss (each t bin for a DLM). Returns the settings and metrics per layer."""
    suite = open_suite(source, k=k, device=device)
    info = suite.info
    # Releases have no suite.json for run_insertion to check before loading: check here.
    check_side(source, suite.base.name, suite.base.family, autoregressive)
    first = next(iter(suite.saes.values()))
    policy = info.policy if info else first.policy
    data = info.heldout(seed=seed) if info else DataConfig(split="heldout", seed=seed)
    batches = math.ceil(max_tokens / (data.batch_size * data.ctx_len))
    metrics = evaluate_suite(
        suite.base,
        {(layer, sae.k): sae for layer, sae in suite.saes.items()},
        policy,
        info.corruption if info else Corruption(),
        data,
        max_tokens,
        seed=seed,
        splice_batches=batches,
        by_t_batches=batches,
        progress=False,
    )
    return {
        "suite": source,
        "base_model": suite.base.name,
        "policy": policy,
        "k": first.k,
        "corpus": data.corpus,
        "batches": batches,
        "layers": {layer: metrics[layer, k] for layer, k in sorted(metrics)},
    }


def _variant(policy: str) -> str:
    """The DLM-Scope ΔLM variant of a policy: unmask for unmask, mask for the others."""
    return "unmask" if policy == "unmask" else "mask"


def _dlm_table(dlm: dict) -> str:
    variant = _variant(dlm["policy"])
    bins = " | ".join(f"t {lo:g}–{hi:g}" for lo, hi in T_BINS)
    lines = [
        f"DLM: {dlm['suite']} ({dlm['base_model']}, policy {dlm['policy']}, k={dlm['k']}); "
        f"by t: ΔLM ({variant})",
        "",
        f"| layer | ΔLM (mask) | ΔLM (unmask) | {bins} |",
        "|" + "---|" * (3 + len(T_BINS)),
    ]
    for layer, m in dlm["layers"].items():
        by_t = " | ".join(f"{row[f'dlm_scope_delta_lm_{variant}']:+.4f}" for row in m["by_t"])
        lines.append(
            f"| {layer} | {m['dlm_scope_delta_lm_mask']:+.4f} | "
            f"{m['dlm_scope_delta_lm_unmask']:+.4f} | {by_t} |"
        )
    return "\n".join(lines)


def _ar_table(ar: dict) -> str:
    lines = [
        f"AR: {ar['suite']} ({ar['base_model']}, policy {ar['policy']}, k={ar['k']})",
        "",
        f"| layer | {LABELS['next_token_delta_ce']} | {LABELS['next_token_loss_recovered']} |",
        "|---|---|---|",
    ]
    for layer, m in ar["layers"].items():
        lines.append(
            f"| {layer} | {m['next_token_delta_ce']:+.4f} | {m['next_token_loss_recovered']:.3f} |"
        )
    return "\n".join(lines)


def _figure(dlm: dict, ar: dict | None):
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13 if ar else 7, 4), layout="constrained")
    axes = figure.subplots(1, 2 if ar else 1, squeeze=False)[0]
    variant = _variant(dlm["policy"])
    layers = list(dlm["layers"])
    colors = colormaps["viridis"]
    for i, (lo, hi) in enumerate(T_BINS):
        values = [m["by_t"][i][f"dlm_scope_delta_lm_{variant}"] for m in dlm["layers"].values()]
        axes[0].plot(
            layers, values, "o-", color=colors(i / len(T_BINS)), label=f"t {lo:g}–{hi:g}", lw=1
        )
    mean = [m[f"dlm_scope_delta_lm_{variant}"] for m in dlm["layers"].values()]
    axes[0].plot(layers, mean, "s-k", lw=2, label="mean, t in [0.05, 0.5]")
    other = "mask" if variant == "unmask" else "unmask"
    mean_other = [m[f"dlm_scope_delta_lm_{other}"] for m in dlm["layers"].values()]
    axes[0].plot(layers, mean_other, "s--", color="grey", label=f"mean ΔLM ({other})")
    axes[0].set(
        title=f"DLM {dlm['base_model']}: ΔLM ({variant})", xlabel="layer", ylabel="ΔLM (nats)"
    )
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    if ar:
        ar_layers = list(ar["layers"])
        delta = [m["next_token_delta_ce"] for m in ar["layers"].values()]
        axes[1].plot(ar_layers, delta, "s-", color="tab:red")
        axes[1].set(
            title=f"AR {ar['base_model']}: next-token ΔCE", xlabel="layer", ylabel="ΔCE (nats)"
        )
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.8)
    return figure


def run_insertion(args: argparse.Namespace) -> Report:
    """`hub-sae analyze insertion SUITE [SUITE_AR]`: ΔLM of the DLM per layer and t bin, beside
    the next-token ΔCE of the autoregressive suite."""
    device = args.device
    sides = [(str(args.suite), False)] + ([(str(args.suite_ar), True)] if args.suite_ar else [])
    for source, autoregressive in sides:  # before any base model loads
        info = suite_info(source)
        if info is not None:
            check_side(source, info.base_model, family(info.base_model), autoregressive)
    tokens = args.max_tokens or DEFAULT_TOKENS
    dlm = measure(str(args.suite), args.k, device, tokens, args.seed)
    if not all("dlm_scope_delta_lm_mask" in m for m in dlm["layers"].values()):
        raise ValueError(
            f"{dlm['base_model']} has no LM head, so it has no ΔLM: give a suite of a model with "
            "one (the embedded default gets a fitted head)."
        )
    ar = None
    if args.suite_ar:
        ar = measure(str(args.suite_ar), args.k_ar, device, tokens, args.seed, autoregressive=True)
    table = _dlm_table(dlm) + ("\n\n" + _ar_table(ar) if ar else "")
    data = {"max_tokens": tokens, "seed": args.seed, "t_bins": T_BINS, "dlm": dlm, "ar": ar}
    return Report("insertion", data, table, _figure(dlm, ar))

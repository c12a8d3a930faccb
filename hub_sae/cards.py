"""Model cards: YAML metadata with a model-index of the metrics, plots, one Jinja template.

The metrics themselves (names, meaning) are defined by the evaluation (`hub_sae.evaluate.METRICS`);
this module only presents them.

A card is rendered from a `CardSpec`, built either from a trained suite (`suite_spec`: suite.json
and each layer's metrics.json) or from a training config plus metrics reported elsewhere
(`release_spec`, e.g. the DLM-Scope release, which hub-sae did not measure itself). `write_card`
writes README.md and the plot (PLOT_FILE) into a folder, each atomically.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hub_sae.data import DEFAULT_CORPUS
from hub_sae.evaluate import METRICS, SUMMARY_FILE, T_BINS
from hub_sae.io import inside, is_repo_id, write_atomic
from hub_sae.suite import SUITE_FILE, layer_folders, read_suite, sae_folder

_TEMPLATES = (
    Path(__file__).resolve().parents[1] / "model_cards" / "template.md",  # a source checkout
    Path(__file__).resolve().parent / "model_cards" / "template.md",  # an installed wheel
)
TEMPLATE = next((path for path in _TEMPLATES if path.is_file()), _TEMPLATES[0])
CARD_FILE = "README.md"
PLOT_FILE = "fvu_per_layer.png"
BY_T_PLOT_FILE = "metrics_by_t.png"
DIGITS = 4
"""Decimals of the metric values in the model-index."""

LIBRARY = "hub-sae"
LICENSE = "apache-2.0"
DLM_TAG = "diffusion-language-model"
DLM_ONLY = ("dlm_scope_", "policy_splice_")
"""Metrics of masked (diffusion) LMs; `next_token_*` are the autoregressive family's."""
FAMILY_METRICS = (*DLM_ONLY, "next_token_")
TAGS = [
    "sparse-autoencoder",
    "interpretability",
    "mechanistic-interpretability",
    DLM_TAG,
    "topk-sae",
]
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
"""Hub ids of hub-sae's short base-model names."""
CORPUS_NAMES = {DEFAULT_CORPUS: "Python pydoc topics (pydoc_data.topics)"}
TASK_TYPE = "feature-extraction"
POLICY_TEXT = {
    "mask": "activations are kept at the masked positions of the corrupted input only",
    "unmask": "activations are kept at the tokens left visible in the corrupted input",
    "all": "activations are kept at every real token of the corrupted input",
    "clean": "no corruption; activations at every real token",
}
BIBTEX = """@inproceedings{wang2026dlmscope,
  title     = {{DLM}-Scope: Mechanistic Interpretability of Diffusion Language Models via Sparse Autoencoders},
  author    = {Xu Wang and Bingqing Jiang and Yu Wan and Baosong Yang and Lingpeng Kong and Difan Zou},
  booktitle = {ICLR 2026 Workshop on Principled Design for Trustworthy AI - Interpretability, Robustness, and Safety across Modalities},
  year      = {2026},
  url       = {https://openreview.net/forum?id=yO5buOEUag}
}"""
SUITE_LAYOUT = """\
| path | content |
|---|---|
| `suite.json` | base model, policy, hook point, layers, k, corruption, full training config |
| `{folder}/config.json` | `TopKSAE` arguments |
| `{folder}/model.safetensors` | weights |
| `{folder}/metrics.json` | held-out metrics (FVU, L0, dead latents, density histogram, spliced metrics) |
| `{folder}/features.safetensors` | per-latent statistics for feature pages: frequencies (by masking ratio, masked / unmasked), activation histogram, examples by quantile band on clean text, logit effects |
| `metrics.json` | summary of the last `hub-sae eval` run, when present |
| `{plot}` | the FVU plot below |
| `{by_t_plot}` | metrics by masking ratio t, when measured |"""


class MetricsSource(NamedTuple):
    """Where metrics not measured by hub-sae come from."""

    name: str
    url: str
    note: str


@dataclass
class CardSpec:
    """Everything a card says about a set of SAEs."""

    repo_id: str
    base_model: str
    policy: str
    layers: list[int]
    ks: list[int]
    d_sae: int
    training: dict
    """The run config (TrainConfig fields)."""
    metrics: dict[tuple[int, int], dict]
    """(layer, k) -> metrics.json content."""
    eval_corpus: str
    eval_split: str
    d_in: int | None = None
    hookpoint: str = "resid_post"
    default_layer: int | None = None
    source: MetricsSource | None = None
    """None when the metrics were measured by hub-sae on these SAEs."""
    layout: str | None = None
    """Markdown describing the repo's files (default: the hub-sae suite layout)."""
    license: str = LICENSE
    n_blocks: int | None = None
    training_note: str = "From the run config stored in `suite.json` (`training`)."

    def __post_init__(self) -> None:
        try:  # the card's metadata, title and load snippet quote it
            validate_repo_id(self.repo_id)
        except HFValidationError as e:
            raise ValueError(
                f"the card's repo id {self.repo_id!r} is not a hub repo id ({e}); give "
                "--repo-id owner/name."
            ) from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hub_id(name: str) -> str | None:
    """The hub id of a base model or corpus name, or None for local paths and embedded names."""
    name = HUB_IDS.get(name, name)
    return name if is_repo_id(name) and not Path(name).expanduser().exists() else None


def display_name(base_model: str) -> str:
    """The hub id of a base model when it has one, else its name."""
    return HUB_IDS.get(base_model, base_model)


def _dataset(corpus: str) -> tuple[str, str, str | None]:
    """(type, name, config) of a corpus for the model-index."""
    dataset_id, _, config = corpus.partition(":")
    if _hub_id(dataset_id):
        return dataset_id, dataset_id, config or None
    label = CORPUS_NAMES.get(corpus, Path(corpus).name)
    return Path(corpus).name, label, None


def fvu_of(metrics: dict) -> float | None:
    """FVU, or 1 - variance explained when only that was reported."""
    if _is_number(metrics.get("fvu")):
        return float(metrics["fvu"])
    if _is_number(metrics.get("variance_explained")):
        return 1 - float(metrics["variance_explained"])
    return None


def eval_results(spec: CardSpec) -> list[EvalResult]:
    """One EvalResult per (SAE, metric); `metric_config` is the SAE's folder in a suite."""
    dataset_type, dataset_name, dataset_config = _dataset(spec.eval_corpus)
    results = []
    for (layer, k), values in sorted(spec.metrics.items()):
        for metric in METRICS:
            value = values.get(metric.key)
            if not _is_number(value):
                continue
            results.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=f"SAE reconstruction of {spec.hookpoint} ({spec.policy} policy)",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=dataset_config,
                    dataset_split=spec.eval_split,
                    metric_type=metric.key,
                    metric_name=f"layer {layer}, k={k}: {metric.label}",
                    metric_value=round(float(value), DIGITS),
                    metric_config=sae_folder(layer, k, spec.ks),
                    source_name=spec.source.name if spec.source else None,
                    source_url=spec.source.url if spec.source else None,
                )
            )
    return results


def metric_table(metrics: dict[tuple[int, int], dict]) -> str:
    """Markdown table of every SAE's metrics; a column per metric that any SAE has."""
    columns = [m for m in METRICS if any(_is_number(v.get(m.key)) for v in metrics.values())]
    rows = [
        "| layer | k | " + " | ".join(m.label for m in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for (layer, k), values in sorted(metrics.items()):
        cells = [
            format(values[m.key], m.fmt) if _is_number(values.get(m.key)) else "-" for m in columns
        ]
        rows.append(f"| {layer} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


BY_T_COLUMNS = (
    ("fvu_masked", "FVU masked", ".3f"),
    ("fvu_unmasked", "FVU unmasked", ".3f"),
    ("l0_masked", "L0 masked", ".1f"),
    ("l0_unmasked", "L0 unmasked", ".1f"),
    ("dlm_scope_delta_lm_mask", "DLM-Scope delta LM (mask)", ".4f"),
    ("dlm_scope_delta_lm_unmask", "DLM-Scope delta LM (unmask)", ".4f"),
)


def by_t_table(metrics: dict[tuple[int, int], dict]) -> str:
    """Markdown table of the metrics by masking ratio t (`by_t`), one row per SAE and bin."""
    found = [row for values in metrics.values() for row in values.get("by_t") or []]
    columns = [c for c in BY_T_COLUMNS if any(_is_number(r.get(c[0])) for r in found)]
    if not found:
        return ""
    lines = [
        "| layer | k | t | " + " | ".join(label for _, label, _ in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (layer, k), values in sorted(metrics.items()):
        for row in values.get("by_t") or []:
            cells = [
                format(row[key], fmt) if _is_number(row.get(key)) else "-"
                for key, _, fmt in columns
            ]
            t = f"[{row['t_min']:g}, {row['t_max']:g})"
            lines.append(f"| {layer} | {k} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _corruption_text(run: dict) -> str:
    """The corruption schedule of a run config, in words."""
    if run.get("policy") == "clean":
        return "none: the clean policy reads uncorrupted text"
    if run["schedule"] == "llada":
        return (
            "LLaDA's pretraining process: per sequence t ~ U(0, 1), mask probability "
            "p = (1 - eps) t + eps"
        )
    return (
        f"DLM-Scope: per LLM batch p ~ U[{run['t_min']:g}, {run['t_max']:g}]; each "
        "real token except BOS becomes the mask token with probability p"
    )


def training_rows(spec: CardSpec) -> list[tuple[str, str]]:
    """(setting, value) rows of the training-setup table, from the run config."""
    t = spec.training
    d_in = spec.d_in or 0
    rows = [
        ("base model", f"`{t['model']}` ({t['dtype']})"),
        ("hook point", f"`{spec.hookpoint}` of blocks {', '.join(map(str, spec.layers))}"),
        ("mask policy", f"`{spec.policy}`: {POLICY_TEXT.get(spec.policy, spec.policy)}"),
        ("corruption", _corruption_text(t)),
        (
            "corpus",
            f"`{t['corpus']}`, packed into {t['ctx_len']:,}-token contexts (BOS + documents "
            f"joined with EOS), {t['llm_batch_size']} contexts per LLM batch",
        ),
        (
            "width",
            f"{spec.d_sae:,} latents"
            + (f" ({spec.d_sae // d_in} x {d_in:,})" if d_in and spec.d_sae % d_in == 0 else ""),
        ),
        ("k", ", ".join(map(str, spec.ks))),
        ("training tokens", f"{t['total_tokens']:,} activations per SAE"),
        ("SAE batch", f"{t['sae_batch_size']:,} activations"),
        (
            "optimiser",
            f"Adam, lr {t['lr']:g}, betas ({t['beta1']:g}, {t['beta2']:g}), "
            f"{t['warmup_steps']:,} warmup steps, linear decay over the last "
            f"{t['decay_fraction']:.0%}, grad clip {t['grad_clip']:g}",
        ),
        (
            "AuxK",
            f"alpha {t['auxk_alpha']:g}, k_aux {t.get('k_aux') or (d_in // 2 or 'd_in / 2')}",
        ),
        ("dead latent", f"no firing in {t['dead_tokens']:,} activations"),
        ("decoder", "unit-norm rows; b_dec initialised at the geometric median of the first batch"),
        ("seed", str(t.get("seed", 0))),
    ]
    if "train_seconds" in t:
        rows.append(
            (
                "run",
                f"{t['steps']:,} steps on {t['processes']} process(es), {t['train_seconds']:g} s",
            )
        )
    return rows


def plot_fvu(spec: CardSpec) -> bytes:
    """PNG of FVU per layer, one line per k (deterministic bytes: no software/date metadata)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.subplots()
    for k in spec.ks:
        points = sorted(
            (layer, fvu)
            for (layer, kk), values in spec.metrics.items()
            if kk == k and (fvu := fvu_of(values)) is not None
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=f"k={k}")
    ax.set_xticks(spec.layers)
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("FVU (lower is better)")
    title = f"{display_name(spec.base_model)}, {spec.policy} policy"
    ax.set_title(title + (f", reported by {spec.source.name}" if spec.source else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def has_by_t(spec: CardSpec) -> bool:
    """Whether any SAE of `spec` has metrics by masking ratio (`by_t` in its metrics.json)."""
    return any(values.get("by_t") for values in spec.metrics.values())


def plot_by_t(spec: CardSpec) -> bytes:
    """PNG: FVU at masked (solid) and unmasked (dashed) positions and DLM-Scope's delta LM (mask)
    against the masking ratio t, one colour per layer (the smallest k)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 3.6), dpi=100)
    fvu_ax, loss_ax = fig.subplots(1, 2)
    k = min(spec.ks)
    for i, layer in enumerate(spec.layers):
        rows = spec.metrics.get((layer, k), {}).get("by_t") or []
        t = [r["t_mean"] for r in rows]
        colour = f"C{i % 10}"
        if rows:
            fvu_ax.plot(t, [r["fvu_masked"] for r in rows], "o-", color=colour, label=f"L{layer}")
            fvu_ax.plot(t, [r["fvu_unmasked"] for r in rows], "o--", color=colour)
        if rows and "dlm_scope_delta_lm_mask" in rows[0]:
            loss_ax.plot(t, [r["dlm_scope_delta_lm_mask"] for r in rows], "o-", color=colour)
    fvu_ax.set_title(f"FVU by t, k={k} (solid: masked, dashed: unmasked)", fontsize=9)
    loss_ax.set_title("DLM-Scope delta LM (mask), spliced at all positions", fontsize=9)
    for ax in (fvu_ax, loss_ax):
        ax.axvspan(0.05, 0.5, color="0.9", zorder=0)
        ax.set_xlabel("masking ratio t (grey: training range)")
        ax.grid(alpha=0.3)
    fvu_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def is_autoregressive(base_model: str) -> bool:
    """Whether `base_model` is a causal LM (family ar), read from its name or local config.json;
    False when neither tells (a card is never held up by a download)."""
    from hub_sae.models import family, known_family

    known = known_family(base_model)
    if known is not None:
        return known == "ar"
    try:
        return Path(base_model).expanduser().is_dir() and family(base_model) == "ar"
    except (OSError, ValueError):
        return False


def render_card(spec: CardSpec, template: str | Path = TEMPLATE) -> ModelCard:
    """The card of `spec`: metadata (incl. model-index) and body from the Jinja `template`."""
    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(
            f"card template {template} not found: run hub-sae from a source checkout "
            "(model_cards/template.md) or pass --template PATH."
        )
    base_id = _hub_id(spec.base_model)
    autoregressive = is_autoregressive(spec.base_model)
    tags = [t for t in TAGS if not (autoregressive and t == DLM_TAG)] + [f"{spec.policy}-policy"]
    tags += ["autoregressive-baseline"] if autoregressive else []
    dataset_id = _hub_id(spec.training["corpus"].partition(":")[0])
    card_data = ModelCardData(
        model_name=spec.repo_id,
        base_model=base_id,
        datasets=[dataset_id] if dataset_id else None,
        library_name=LIBRARY,
        license=spec.license,
        tags=tags,
        eval_results=eval_results(spec) or None,
    )
    layer = spec.default_layer if spec.default_layer in spec.layers else spec.layers[0]
    measured = [k for (m_layer, k) in sorted(spec.metrics) if m_layer == layer] or spec.ks
    if spec.source and not spec.metrics:
        metrics_intro = (
            f"No per-SAE metrics of this release are reported by {spec.source.name} "
            f"({spec.source.url}); `hub-sae eval` measures the metrics below on a suite it can "
            "load with its base model."
        )
    elif spec.source:
        metrics_intro = (
            f"Reported by {spec.source.name} ({spec.source.url}): {spec.source.note}. "
            "FVU = 1 - variance explained."
        )
    else:
        metrics_intro = (
            f"Measured by hub-sae's held-out evaluation (`hub-sae eval`) on the `{spec.eval_split}` "
            f"split of `{spec.eval_corpus}` "
            f"under the `{spec.policy}` policy and the training corruption ({metric_tokens(spec)} "
            "activations per SAE)."
        )
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        title=f"TopK SAEs for {display_name(spec.base_model)} ({spec.policy} policy)",
        repo_id=spec.repo_id,
        base_model_display=display_name(spec.base_model),
        base_model_url=f"https://huggingface.co/{base_id}" if base_id else "#",
        hookpoint=spec.hookpoint,
        policy=spec.policy,
        policy_text=POLICY_TEXT.get(spec.policy, spec.policy),
        layers=spec.layers,
        ks=spec.ks,
        d_sae=spec.d_sae,
        d_in=spec.d_in,
        n_blocks=spec.n_blocks,
        source=spec.source._asdict() if spec.source else None,
        layout=spec.layout
        or SUITE_LAYOUT.format(
            folder=_folder_pattern(spec.ks), plot=PLOT_FILE, by_t_plot=BY_T_PLOT_FILE
        ),
        metric_definitions=[
            (m.key, m.label, m.meaning)
            for m in METRICS
            if m.key.startswith(DLM_ONLY) != autoregressive or not m.key.startswith(FAMILY_METRICS)
        ],
        has_metrics=bool(spec.metrics),
        by_t_plot=BY_T_PLOT_FILE if has_by_t(spec) else None,
        by_t_table=by_t_table(spec.metrics),
        t_bins=", ".join(f"[{a:g}, {b:g})" for a, b in T_BINS),
        training_note=spec.training_note,
        training_rows=training_rows(spec),
        metrics_intro=metrics_intro,
        metric_table=metric_table(spec.metrics),
        plot=PLOT_FILE,
        snippet_layer=layer,
        snippet_k=f", k={measured[0]}" if len(spec.ks) > 1 else "",
        sae_k=measured[0],
        corpus=spec.training["corpus"],
        bibtex=BIBTEX,
        autoregressive=autoregressive,
    )


def _folder_pattern(ks: list[int]) -> str:
    """How `sae_folder` names the SAE folders of a suite with `ks`, as a pattern."""
    return "layer_{L}" if len(ks) == 1 else "layer_{L}/k_{k}"


def metric_tokens(spec: CardSpec) -> str:
    """The held-out activations per SAE, as text."""
    tokens = {values.get("tokens") for values in spec.metrics.values()} - {None}
    return ", ".join(f"{t:,}" for t in sorted(tokens)) or "unknown"


def write_card(spec: CardSpec, out_dir: str | Path, template: str | Path = TEMPLATE) -> Path:
    """Write README.md and the FVU plot (when there are metrics) into `out_dir`; returns the
    card's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = render_card(spec, template)
    if spec.metrics:
        write_atomic(out_dir / PLOT_FILE, plot_fvu(spec))
    if has_by_t(spec):
        write_atomic(out_dir / BY_T_PLOT_FILE, plot_by_t(spec))
    write_atomic(out_dir / CARD_FILE, str(card).encode())
    return out_dir / CARD_FILE


def suite_spec(root: str | Path, repo_id: str | None = None, license: str = LICENSE) -> CardSpec:
    """The card spec of a trained suite; `repo_id` defaults to the folder name."""
    root = Path(root)
    info = read_suite(root)
    metrics = {}
    for key, folder in layer_folders(root, info).items():
        path = folder / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `hub-sae eval {root}` first.")
        metrics[key] = json.loads(path.read_text())
    training = info.training
    if not training:
        raise ValueError(f"{root / SUITE_FILE} has no `training` block; re-train with hub-sae.")
    summary = inside(root, SUMMARY_FILE)
    evaluated = json.loads(summary.read_text()).get("eval", {}) if summary.is_file() else {}
    return CardSpec(
        repo_id=repo_id or root.resolve().name,
        base_model=info.base_model,
        policy=info.policy,
        layers=info.layers,
        ks=info.ks,
        d_sae=info.d_sae,
        d_in=info.d_in,
        training=training,
        metrics=metrics,
        eval_corpus=evaluated.get("corpus", info.heldout().corpus),
        eval_split=evaluated.get("split", info.heldout().split),
        hookpoint=info.hookpoint,
        default_layer=info.default_layer,
        license=license,
    )


def release_spec(config: str | Path, reported: str | Path, repo_id: str | None = None) -> CardSpec:
    """The card spec of a release trained with `config` (YAML) whose metrics come from `reported`.

    `reported` is JSON: {repo_id, source: {name, url, note}, d_in, n_blocks, split, layout,
    license, results: [{layer, k, <metric>: value, ...}]}.
    """
    training = yaml.safe_load(Path(config).read_text())
    info = json.loads(Path(reported).read_text())
    metrics = {
        (r["layer"], r["k"]): {key: v for key, v in r.items() if key not in ("layer", "k")}
        for r in info["results"]
    }
    unknown = sorted(
        key for key in metrics if key[0] not in training["layers"] or key[1] not in training["ks"]
    )
    if unknown:
        raise ValueError(
            f"{reported}: results for (layer, k) {unknown} are not in {config} "
            f"(layers {training['layers']}, ks {training['ks']}); fix one of the two files."
        )
    d_in = info.get("d_in")
    layers = training["layers"]
    return CardSpec(
        repo_id=repo_id or info["repo_id"],
        base_model=training["model"],
        policy=training["policy"],
        layers=layers,
        ks=training["ks"],
        d_sae=training.get("d_sae") or training["expansion_factor"] * d_in,
        d_in=d_in,
        training=training,
        metrics=metrics,
        eval_corpus=training["corpus"],
        eval_split=info.get("split", "train"),
        default_layer=layers[len(layers) // 2],
        source=MetricsSource(**info["source"]),
        layout=info.get("layout"),
        license=info.get("license", LICENSE),
        n_blocks=info.get("n_blocks"),
        training_note=(
            f"The recipe as written in hub-sae's `training/configs/{Path(config).name}`; "
            f"`accelerate launch training/train.py --config training/configs/{Path(config).name}` "
            "trains it again."
        ),
    )

"""The Space's drawing side: `Explorer` records in, tables, heat maps and markdown out.

Every function here turns what `explorer.py` computed into something Gradio shows (pandas
DataFrames, HighlightedText (text, score-or-label) pairs, markdown); nothing here runs the model.
`app.py` wires them to components.
"""

from __future__ import annotations

import html
from urllib.parse import urlencode

import pandas as pd
from explorer import Analysis, Band, DecodeRun, Explorer, FeatureRow, LensToken, SearchHit

from hub_sae.diffusion import Generation
from hub_sae.evaluate import T_BINS

SEARCH_HELP = (
    "A feature *fires most* on what you search when its largest activation there is the largest "
    "(ties: the larger count). **token**: over the feature's stored training examples (top and "
    "activation bands) whose analysed position holds that token; count = such examples. "
    "**text**: the text is analysed as a prompt (typed mask tokens and the random ratio above; "
    "the suite's policy picks the positions); count = analysed positions it fires on."
)
HISTOGRAM = ("activation from", "positions")
BY_T = ("masking ratio t", "fires on %")
"""The columns (x, y) of the two bar charts."""
HeatMap = list[tuple[str, float | str | None]]
"""HighlightedText pairs: each position's text with its score (or label), None to grey it out."""


def header(explorer: Explorer) -> str:
    """Markdown naming the loaded model and suite."""
    sae = explorer.saes[explorer.layers[0]]
    return (
        f"# Diffusion-LM SAE explorer\n"
        f"**Suite** `{explorer.title}` · **base model** `{explorer.base.name}` · **policy** "
        f"`{explorer.policy}` · **layers** {explorer.layers} · {sae.d_sae:,} latents, "
        f"k = {sae.k}. {mask_line(explorer)}"
    )


def mask_line(explorer: Explorer) -> str:
    """Markdown: the mask token to type, or why there is none."""
    if explorer.mask_text is None:
        return (
            f"`{explorer.base.name}` is autoregressive (family `{explorer.base.family}`): it has "
            "no mask token, so prompts are analysed as clean text and nothing is decoded."
        )
    return f"Type `{explorer.mask_text}` where you want masked positions."


def lens_label(explorer: Explorer, lowest: bool = False) -> str:
    """A logit lens table's label: which tokens, and at which position."""
    where = "at the next position" if explorer.base.shifted else "at the same position"
    return f"Logit lens: tokens {'suppressed' if lowest else 'promoted'} {where}"


def status(explorer: Explorer, analysis: Analysis) -> str:
    p = analysis.prompt
    return (
        f"{len(p.tokens)} tokens · {int(p.is_masked.sum())} masked · {int(p.selected.sum())} "
        f"analysed (`{explorer.policy}` policy; greyed tokens are not analysed)."
    )


def position_choices(analysis: Analysis) -> list[tuple[str, int]]:
    """Dropdown entries "i: token" for the selected positions."""
    tokens, selected = analysis.prompt.tokens, analysis.prompt.selected.tolist()
    return [(f"{i}: {tokens[i].strip()}", i) for i in range(len(tokens)) if selected[i]]


def heat_map(explorer: Explorer, analysis: Analysis, layer: int, feature: int) -> HeatMap:
    """(token, score in [-1, 1]) per position: activation / max |activation| over the selected
    positions; None at positions the policy does not select."""
    acts = explorer.feature_acts(analysis, layer, explorer.check_feature(layer, feature))
    selected = analysis.prompt.selected
    scale = acts[selected].abs().max().clamp_min(1e-12)
    scores = (acts / scale).clamp(-1.0, 1.0).tolist()
    return [
        (token, round(score, 4) if chosen else None)
        for token, score, chosen in zip(
            analysis.prompt.tokens, scores, selected.tolist(), strict=True
        )
    ]


def feature_table(rows: list[FeatureRow]) -> pd.DataFrame:
    """Features with their activation and firing frequency (in %), in the given order."""
    return pd.DataFrame(
        [
            {
                "feature": row.feature,
                "activation": round(row.activation, 4),
                "frequency %": None if row.frequency is None else round(100 * row.frequency, 3),
            }
            for row in rows
        ],
        columns=["feature", "activation", "frequency %"],
    )


def examples_html(bands: list[Band]) -> str:
    """The examples of each band as rows of clean text: the analysed position in a <mark>, masked
    positions of class "masked" (the others in a <u>); every token escaped (corpus text is
    untrusted)."""
    if not bands:
        return "<p>No training examples: this suite has no feature statistics for the layer.</p>"
    out = []
    for band in bands:
        out.append(f"<h4>{html.escape(band.name)}</h4><table class='examples'>")
        out.append("<tr><th>activation</th><th>t</th><th>clean text</th></tr>")
        for ex in band.examples:
            text = []
            for i, (piece, masked) in enumerate(zip(ex.pieces, ex.masked, strict=True)):
                lead = piece[: len(piece) - len(piece.lstrip())]
                word = html.escape(piece.strip() or piece)
                if i == ex.centre:
                    word = f"<mark class='centre{' masked' if masked else ''}'>{word}</mark>"
                elif masked:
                    word = f"<u class='masked'>{word}</u>"
                text.append(html.escape(lead) + word)
            t = "" if ex.t is None else f"{ex.t:.2f}"
            out.append(f"<tr><td>{ex.activation:.3f}</td><td>{t}</td><td>{''.join(text)}</td></tr>")
        out.append("</table>")
    return "".join(out)


def bin_labels(edges: list[float], digits: str) -> list[str]:
    """ "low-high" for each bin between consecutive `edges`."""
    return [f"{low:{digits}}-{high:{digits}}" for low, high in zip(edges, edges[1:], strict=False)]


T_LABELS = bin_labels([T_BINS[0][0], *(high for _, high in T_BINS)], ".2f")
"""The masking ratio bins' labels in axis order (the browser would sort them as text)."""


def histogram_frame(explorer: Explorer, layer: int, feature: int) -> pd.DataFrame | None:
    """The feature's activation histogram: positions per fixed log-spaced bin, labelled by its lower
    edge padded to one width (the browser sorts labels as text); None without one."""
    found = explorer.histogram(layer, feature)
    if found is None:
        return None
    edges, counts = found
    return pd.DataFrame({HISTOGRAM[0]: [f"{low:9.4f}" for low in edges[:-1]], HISTOGRAM[1]: counts})


def frequency_frame(explorer: Explorer, layer: int, feature: int) -> pd.DataFrame | None:
    """The feature's firing frequency (%) by the masking ratio t of the sequence, None without."""
    found = explorer.frequency_by_t(layer, feature)
    if found is None:
        return None
    edges, shares = found
    return pd.DataFrame(
        {BY_T[0]: bin_labels(edges, ".2f"), BY_T[1]: [round(100 * s, 4) for s in shares]}
    )


def search_table(hits: list[SearchHit]) -> pd.DataFrame:
    """Search results: feature, its largest activation there, its count and training frequency."""
    rows = [
        {
            "feature": h.feature,
            "activation": round(h.activation, 4),
            "count": h.count,
            "frequency %": None if h.frequency is None else round(100 * h.frequency, 3),
        }
        for h in hits
    ]
    return pd.DataFrame(rows, columns=["feature", "activation", "count", "frequency %"])


def feature_link(explorer: Explorer, layer: int, feature: int) -> str:
    """Markdown: a link that opens this page on (layer, k, feature)."""
    query = "?" + urlencode({"layer": layer, "k": explorer.k, "feature": feature})
    return f"Link to this feature: [`{query}`]({query})"


def lens_table(tokens: list[LensToken]) -> pd.DataFrame:
    """The logit lens: promoted tokens and their logits."""
    rows = [{"token": t.token, "logit": round(t.logit, 3)} for t in tokens]
    return pd.DataFrame(rows, columns=["token", "logit"])


def feature_summary(explorer: Explorer, analysis: Analysis, layer: int, feature: int) -> str:
    """Markdown: the feature's firing frequency and its peak on the prompt."""
    feature = explorer.check_feature(layer, feature)
    stats = explorer.features.get(layer)
    lines = [f"### Feature {feature} · layer {layer}"]
    if stats is None:
        lines.append("No feature statistics (features.safetensors) were published for this layer.")
    else:
        lines.append(
            f"Fires on **{100 * float(stats.frequency[feature]):.3f} %** of {stats.tokens:,} "
            f"`{explorer.policy}`-policy training positions"
            + (
                "."
                if stats.mean_activation is None
                else f", with mean activation **{float(stats.mean_activation[feature]):.3f}** there."
            )
        )
    if stats is not None and stats.frequency_masked is not None:
        lines.append(
            f"On every masked position: **{100 * float(stats.frequency_masked[feature]):.3f} %** "
            f"of {stats.positions_masked:,}; on every unmasked one (BOS aside): "
            f"**{100 * float(stats.frequency_unmasked[feature]):.3f} %** of "
            f"{stats.positions_unmasked:,}."
        )
    elif stats is not None:
        lines.append(
            "These are version 1 statistics (no histogram, bands or split by masking ratio; "
            "contexts show the corrupted input): regenerate them with `hub-sae features SUITE`."
        )
    peak = explorer.peak_position(analysis, layer, feature)
    value = float(explorer.feature_acts(analysis, layer, feature)[peak])
    lines.append(
        f"On this prompt: max **{value:.3f}** at position {peak} "
        f"(`{analysis.prompt.tokens[peak].strip()}`)."
        if value > 0
        else "Not active on the analysed positions of this prompt."
    )
    if stats is not None and stats.logit_top_ids is not None:
        lines.append(
            "Logit lens (from the statistics: head(decoder row) - head(0), head = final norm + "
            f"LM head): the tokens this feature promotes and suppresses at {explorer.lens_position}."
        )
    elif explorer.head is None:
        lines.append(f"Logit lens: `{explorer.base.name}` has no LM head.")
    else:
        lines.append(
            f"Logit lens (final norm + LM head): the tokens this feature's decoder direction "
            f"promotes and suppresses at {explorer.lens_position}."
        )
    return "\n\n".join(lines)


def decoded_text(explorer: Explorer, run: DecodeRun, generation: Generation) -> HeatMap:
    """The decoded sequence, decoded positions labelled (`changed` where it differs from plain)."""
    plain = run.plain.tokens[0].tolist()
    out: HeatMap = []
    for i, token in enumerate(generation.tokens[0].tolist()):
        if not run.decoded[i]:
            out.append((run.prompt.tokens[i], None))
            continue
        label = "generated"
        if generation is not run.plain:
            label = "changed" if plain[i] != token else "same"
        out.append((" " + explorer.token_text(token).strip(), label))
    return out


def timeline_frame(explorer: Explorer, run: DecodeRun, generation: Generation):
    """Positions x steps: the token once committed (with its confidence at the committing step),
    `…` while masked; shaded by the steered feature's activation (darker = stronger)."""
    timeline, tokens = generation.timeline, generation.tokens[0]
    masked, commit = timeline.masked[:, 0], timeline.commit_step[0]
    (layer,) = timeline.layers
    watched = timeline.layers[layer].watched[:, 0, :, 0]
    columns = ["step"] + [f"{p}:{explorer.token_text(t).strip()}" for p, t in enumerate(tokens)]
    rows = []
    for step in range(len(masked)):
        row = [step + 1]
        for p, token in enumerate(tokens.tolist()):
            text = explorer.token_text(token).strip()
            if int(commit[p]) == step:
                row.append(f"{text} ({float(timeline.confidence[0, p]):.2f})")
            else:
                row.append("…" if masked[step, p] else text)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns)
    scale = float(watched.abs().max().clamp_min(1e-12))

    def shade(_: pd.DataFrame) -> pd.DataFrame:
        styles = pd.DataFrame("", index=frame.index, columns=frame.columns)
        for step in range(len(masked)):
            for p in range(len(tokens)):
                alpha = min(1.0, float(watched[step, p]) / scale)
                colour = f"background-color: rgba(255, 120, 0, {alpha:.2f})"
                bold = "; font-weight: bold" if int(commit[p]) == step else ""
                styles.iat[step, p + 1] = colour + bold
        return styles

    return frame.style.apply(shade, axis=None)


def decode_summary(run: DecodeRun) -> str:
    """Markdown: what was steered, and its effect and damage in the model's own numbers."""
    steer = run.steer
    features = ", ".join(map(str, steer.features))
    positions = steer.positions if isinstance(steer.positions, str) else list(steer.positions)
    window = f"{steer.window[0]:.0%}-{steer.window[1]:.0%} of the steps"
    return (
        f"Decoded with {run.sampling.describe()}.\n\n"
        f"Steered feature(s) {features} of layer {steer.layer}: {steer.mode} {steer.value:g} "
        f"at {positions} positions during {window}.\n\n"
        "| | unsteered | steered |\n|---|---|---|\n"
        f"| mean activation of the steered feature(s) | {run.activation[0]:.3f} | "
        f"{run.activation[1]:.3f} |\n"
        f"| masked-token log-likelihood per token (the model's own) | "
        f"{run.log_likelihood[0]:.3f} | {run.log_likelihood[1]:.3f} |"
    )


def cell_title(
    explorer: Explorer, which: str, generation: Generation, step: int, position: int
) -> str:
    """Markdown naming one timeline cell: which run, step, position, token and its state then."""
    token = explorer.token_text(int(generation.tokens[0, position])).strip()
    state = "masked" if generation.timeline.masked[step, 0, position] else "committed"
    return f"{which}: step {step + 1}, position {position} (`{token}`, {state} then)"

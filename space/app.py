"""Gradio Space: explore the SAE features of a diffusion LM on your own (masked) prompts.

    python space/app.py [--suite FOLDER_OR_HUB_ID] [--host 127.0.0.1] [--port 7860]

The suite comes from --suite, else HUB_SAE_SUITE, else the newest local run under runs/, else the
published LLaDA suite; users never pass paths. The handlers below are plain functions over an
`Explorer`, so tests call them without a server; `build_app` only wires them to components.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

import gradio as gr
import pandas as pd
from explorer import Analysis, DecodeRun, Explorer, InputError

from hub_sae.diffusion import Generation, Steer

EXAMPLE = "The [MASK] statement is used to leave a loop early, and [MASK] skips to the next one."
CONCURRENCY, QUEUE_SIZE = 2, 64
CSS = """
#heatmap .score-token:not(.highlighted) { opacity: 0.45; }
.timeline td { font-size: 12px; padding: 2px 4px; }
"""
STEER_POSITIONS = "still-masked positions, all, or indices such as 3, 5"
HeatMap = list[tuple[str, float | None]]


def user_errors(fn: Callable) -> Callable:
    """Show an `InputError` to the user as a Gradio error message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from e

    return wrapper


def _analysis(explorer: Explorer, prompt: str, ratio: float, seed: float | None) -> Analysis:
    return explorer.analyse(prompt, float(ratio or 0.0), explorer.check_seed(seed))


def position_choices(analysis: Analysis) -> list[tuple[str, int]]:
    """Dropdown entries "i: token" for the analysed positions."""
    tokens, analysed = analysis.prompt.tokens, analysis.prompt.analysed.tolist()
    return [(f"{i}: {tokens[i].strip()}", i) for i in range(len(tokens)) if analysed[i]]


def status(explorer: Explorer, analysis: Analysis) -> str:
    p = analysis.prompt
    return (
        f"{len(p.tokens)} tokens · {int(p.is_masked.sum())} masked · {int(p.analysed.sum())} "
        f"analysed (`{explorer.policy}` policy; greyed tokens are not analysed)."
    )


@user_errors
def analyse(explorer: Explorer, prompt: str, layer: int, ratio: float, seed: float) -> tuple:
    """Everything for a new prompt or layer: the most active feature and where it peaks."""
    analysis = _analysis(explorer, prompt, ratio, seed)
    feature = explorer.default_feature(analysis, layer)
    position = explorer.peak_position(analysis, layer, feature)
    return (
        status(explorer, analysis),
        gr.Dropdown(choices=position_choices(analysis), value=position),
        explorer.token_table(analysis, layer, position),
        feature,
        *show_feature(explorer, prompt, layer, ratio, seed, feature),
    )


@user_errors
def show_feature(
    explorer: Explorer, prompt: str, layer: int, ratio: float, seed: float, feature: int
) -> tuple[HeatMap, str, pd.DataFrame, pd.DataFrame]:
    """Heat map of `feature` over the prompt, its summary, top contexts and logit lens."""
    analysis = _analysis(explorer, prompt, ratio, seed)
    return (
        explorer.heat_map(analysis, layer, feature),
        explorer.feature_summary(analysis, layer, feature),
        explorer.contexts(layer, feature),
        explorer.logit_lens(layer, feature),
    )


@user_errors
def show_token(
    explorer: Explorer, prompt: str, layer: int, ratio: float, seed: float, position: int
) -> pd.DataFrame:
    """The top-k features of the token at `position`."""
    return explorer.token_table(_analysis(explorer, prompt, ratio, seed), layer, position)


def decoded_text(explorer: Explorer, run: DecodeRun, generation: Generation) -> HeatMap:
    """The decoded sequence, decoded positions labelled (`changed` where it differs from plain)."""
    plain = run.plain.tokens[0].tolist()
    out = []
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
        f"Steered feature(s) {features} of layer {steer.layer}: {steer.mode} {steer.value:g} "
        f"at {positions} positions during {window}.\n\n"
        "| | unsteered | steered |\n|---|---|---|\n"
        f"| mean activation of the steered feature(s) | {run.activation[0]:.3f} | "
        f"{run.activation[1]:.3f} |\n"
        f"| masked-token log-likelihood per token (the model's own) | "
        f"{run.log_likelihood[0]:.3f} | {run.log_likelihood[1]:.3f} |"
    )


def parse_steer(
    layer: int, feature: float, value: float, mode: str, share: float, positions: str
) -> Steer:
    """A `Steer` from the Decode tab's inputs (positions: masked, all, or comma-separated)."""
    text = (positions or "masked").strip().lower()
    if text in ("masked", "all"):
        where: str | tuple[int, ...] = text
    else:
        try:
            where = tuple(int(p) for p in text.replace(",", " ").split())
        except ValueError:
            raise InputError(f"Steer at: {STEER_POSITIONS}; got {positions!r}.") from None
    try:
        return Steer(
            int(layer),
            (int(feature or 0),),
            float(value or 0.0),
            mode or "clamp",
            (0.0, float(share or 1.0)),
            where,
        )
    except ValueError as e:
        raise InputError(str(e)) from e


def _run(explorer, prompt, layer, ratio, seed, steps, feature, value, mode, share, positions):
    feature = explorer.check_feature(layer, feature)
    steer = parse_steer(layer, feature, value, mode, share, positions)
    if not isinstance(steer.positions, str):
        n = len(explorer.prepare(prompt, float(ratio or 0.0), explorer.check_seed(seed)).tokens)
        if not all(0 <= p < n for p in steer.positions):
            raise InputError(f"Steer positions must lie in 0..{n - 1}; got {positions!r}.")
    return explorer.decode(
        prompt, float(ratio or 0.0), explorer.check_seed(seed), int(steps or 1), steer
    )


@user_errors
def decode(explorer: Explorer, *args) -> tuple:
    """Plain and steered decoding side by side, their numbers and their timelines.

    args: prompt, layer, ratio, seed, steps, feature, value, mode, share (first share of the
    steps), positions.
    """
    run = _run(explorer, *args)
    return (
        decoded_text(explorer, run, run.plain),
        decoded_text(explorer, run, run.steered),
        decode_summary(run),
        timeline_frame(explorer, run, run.plain),
        timeline_frame(explorer, run, run.steered),
    )


@user_errors
def timeline_cell(
    explorer: Explorer, which: str, cell: list[int], *args
) -> tuple[str, pd.DataFrame]:
    """The features of one timeline cell ([step row, column]; column 0 is the step number)."""
    run = _run(explorer, *args)
    generation = run.plain if which == "unsteered" else run.steered
    step, column = int(cell[0]), int(cell[1])
    position = max(column - 1, 0)
    token = explorer.token_text(int(generation.tokens[0, position])).strip()
    state = "masked" if generation.timeline.masked[step, 0, position] else "committed"
    title = f"{which}: step {step + 1}, position {position} (`{token}`, {state} then)"
    return title, explorer.cell_features(generation, step, position)


def cell_picker(explorer: Explorer, which: str) -> Callable:
    """The select handler of one timeline: the clicked cell's features (Gradio passes the cell)."""

    def pick(prompt, layer, ratio, seed, steps, feature, value, mode, share, positions,
             evt: gr.SelectData):  # fmt: skip
        args = (prompt, layer, ratio, seed, steps, feature, value, mode, share, positions)
        return timeline_cell(explorer, which, evt.index, *args)

    return pick


def explore_tab(explorer: Explorer, inputs: list[gr.Component]) -> gr.Number:
    """Heat map, per-token table and feature panel, wired to `inputs` (prompt, layer, ratio, seed);
    returns the feature box."""
    prompt, layer, ratio, seed = inputs
    run = gr.Button("Analyse", variant="primary")
    info = gr.Markdown()
    with gr.Row():
        feature = gr.Number(label="Feature", step=1, scale=1)  # checked by the handlers
        position = gr.Dropdown(label="Token", choices=[], allow_custom_value=True, scale=2)
    heatmap = gr.HighlightedText(
        label="Activation of the feature (scaled to its max on the prompt)",
        elem_id="heatmap",
        show_legend=False,
        combine_adjacent=False,
    )
    with gr.Row():
        table = gr.Dataframe(label="Top features of the token (click one)", interactive=False)
        with gr.Column():
            summary = gr.Markdown()
            lens = gr.Dataframe(label="Logit lens: promoted tokens", interactive=False)
    contexts = gr.Dataframe(label="Top-activating training contexts", interactive=False, wrap=True)

    feature_out = [heatmap, summary, contexts, lens]
    analyse_io = dict(
        fn=functools.partial(analyse, explorer),
        inputs=inputs,
        outputs=[info, position, table, feature, *feature_out],
    )
    run.click(**analyse_io, api_name="analyze")
    prompt.submit(**analyse_io, api_name=False)
    layer.input(**analyse_io, api_name=False)
    feature_io = dict(fn=functools.partial(show_feature, explorer), outputs=feature_out)
    feature.submit(**feature_io, inputs=[*inputs, feature], api_name="feature")
    token_io = dict(fn=functools.partial(show_token, explorer), outputs=table)
    position.input(**token_io, inputs=[*inputs, position], api_name="token")

    def pick_token(evt: gr.SelectData) -> int:
        return evt.index

    def pick_feature(frame: pd.DataFrame, evt: gr.SelectData) -> int:
        return int(frame.iloc[evt.index[0]]["feature"])

    heatmap.select(pick_token, None, position, api_name=False).then(
        **token_io, inputs=[*inputs, position], api_name=False
    )
    table.select(pick_feature, table, feature, api_name=False).then(
        **feature_io, inputs=[*inputs, feature], api_name=False
    )
    return feature


def decode_tab(explorer: Explorer, inputs: list[gr.Component], explored: gr.Number) -> None:
    """Decoding of the masked positions, plain and with a feature steered over a window of steps
    (by default the feature shown in the Explore tab), and each decode's timeline."""
    if explorer.head is None:
        gr.Markdown(f"Decoding needs an LM head; `{explorer.base.name}` has none.")
        return
    gr.Markdown(
        f"LLaDA's decoding (greedy, low-confidence remasking) of `{explorer.base.name}`: each "
        "step predicts every masked position and commits the most confident ones. The steered "
        "run adds to or clamps one feature (the SAE error term is kept, so only that feature's "
        "change moves the residual)."
    )
    with gr.Row():
        steps = gr.Slider(1, 64, value=8, step=1, label="Steps")
        feature = gr.Number(label="Feature to steer", minimum=0, value=0)
        value = gr.Number(label="Value", value=10.0)
        mode = gr.Radio(["clamp", "add"], value="clamp", label="Steering")
    with gr.Row():
        share = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Steer during the first share")
        positions = gr.Textbox(value="masked", label=f"Steer at ({STEER_POSITIONS})")
    explored.change(lambda f: f, explored, feature, api_name=False)
    run = gr.Button("Decode", variant="primary")
    with gr.Row():
        plain = gr.HighlightedText(label="Unsteered", elem_id="plain")
        steered = gr.HighlightedText(label="Steered", elem_id="steered")
    summary = gr.Markdown()
    gr.Markdown(
        "**Timelines** (rows: steps, columns: positions; shaded by the steered feature; bold: "
        "committed at that step, with its confidence). Click a cell for its features."
    )
    plain_timeline = gr.Dataframe(
        label="Unsteered timeline", elem_id="timeline", elem_classes="timeline", interactive=False
    )
    steered_timeline = gr.Dataframe(
        label="Steered timeline", elem_classes="timeline", interactive=False
    )
    cell_title = gr.Markdown()
    cell = gr.Dataframe(label="Features of the cell", interactive=False)
    decode_inputs = [*inputs, steps, feature, value, mode, share, positions]
    run.click(
        functools.partial(decode, explorer),
        inputs=decode_inputs,
        outputs=[plain, steered, summary, plain_timeline, steered_timeline],
        api_name="decode",
    )
    for which, frame in (("unsteered", plain_timeline), ("steered", steered_timeline)):
        frame.select(
            cell_picker(explorer, which), decode_inputs, [cell_title, cell], api_name=False
        )


def build_app(source: str | Explorer | None = None) -> gr.Blocks:
    """The Space for a suite (local folder or hub id; default `default_suite()`), loaded once."""
    explorer = source if isinstance(source, Explorer) else Explorer.load(source)
    example = EXAMPLE.replace("[MASK]", explorer.mask_text)
    with gr.Blocks(title="hub-sae explorer") as demo:
        gr.Markdown(explorer.header())
        with gr.Row():
            prompt = gr.Textbox(
                label=f"Prompt (at most {explorer.max_tokens} tokens; type {explorer.mask_text} "
                "for masked positions)",
                value=example,
                lines=3,
                scale=4,
            )
            with gr.Column(scale=1):
                layers = gr.Dropdown(
                    choices=explorer.layers, value=explorer.default_layer, label="Layer"
                )
                ratio = gr.Slider(
                    0.0, 1.0, value=0.0, step=0.05, label="Also mask at random (ratio)"
                )
                seed = gr.Number(value=0, step=1, label="Seed")  # checked by the handlers
        inputs = [prompt, layers, ratio, seed]
        with gr.Tab("Explore"):
            feature = explore_tab(explorer, inputs)
        with gr.Tab("Decode"):
            decode_tab(explorer, inputs, feature)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suite",
        default=None,
        help="suite folder or hub id (default: HUB_SAE_SUITE, newest runs/*, the LLaDA suite)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--base-model", default=None, help="override the suite's base model")
    args = parser.parse_args(argv)
    explorer = Explorer.load(args.suite, device=args.device, base_model=args.base_model)
    build_app(explorer).launch(server_name=args.host, server_port=args.port, css=CSS)


if __name__ == "__main__":
    main()

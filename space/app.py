"""Gradio Space: explore the SAE features of a diffusion LM on your own (masked) prompts.

    python space/app.py [--suite FOLDER_OR_HUB_ID] [--host 127.0.0.1] [--port 7860]

The suite comes from --suite, else HUB_SAE_SUITE, else the newest local run under runs/, else the
published LLaDA suite; users never pass paths.

This file is the Gradio wiring only: `explorer.py` computes (tensors in, records out) and
`views.py` draws (records in, tables, heat maps and markdown out). The handlers below are plain
functions over an `Explorer`, so tests call them without a server; `build_app` wires them to
components.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable

import gradio as gr
import pandas as pd
import views
from explorer import SAMPLERS, Analysis, DecodeRun, Explorer, InputError, Sampling, finite

from hub_sae.diffusion import ALGS, REMASKING, Steer

EXAMPLE = "The {} statement is used to leave a loop early, and {} skips to the next one."
EXAMPLE_WORDS = ("break", "continue")
"""The example prompt: the model's mask token in both blanks, or these words for a model without."""
CONCURRENCY, QUEUE_SIZE = 2, 64
CSS = """
#heatmap .score-token:not(.highlighted) { opacity: 0.45; }
.timeline td { font-size: 12px; padding: 2px 4px; }
"""
STEER_POSITIONS = "still-masked positions, all, or indices such as 3, 5"


def user_errors(fn: Callable) -> Callable:
    """Show an `InputError` to the user as a Gradio error message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from e

    return wrapper


def example(explorer: Explorer) -> str:
    """The example prompt for this model: masked with its own mask token, or clean (ar)."""
    mask = explorer.mask_text
    return EXAMPLE.format(*(EXAMPLE_WORDS if mask is None else (mask, mask)))


def _analysis(explorer: Explorer, prompt: str, ratio: float, seed: float | None) -> Analysis:
    return explorer.analyse(prompt, float(ratio or 0.0), explorer.check_seed(seed))


@user_errors
def analyse(explorer: Explorer, prompt: str, layer: int, ratio: float, seed: float) -> tuple:
    """Everything for a new prompt or layer: the most active feature and where it peaks."""
    analysis = _analysis(explorer, prompt, ratio, seed)
    feature = explorer.default_feature(analysis, layer)
    position = explorer.peak_position(analysis, layer, feature)
    return (
        views.status(explorer, analysis),
        gr.Dropdown(choices=views.position_choices(analysis), value=position),
        views.feature_table(explorer.token_features(analysis, layer, position)),
        feature,
        *show_feature(explorer, prompt, layer, ratio, seed, feature),
    )


@user_errors
def show_feature(
    explorer: Explorer, prompt: str, layer: int, ratio: float, seed: float, feature: int
) -> tuple[views.HeatMap, str, pd.DataFrame, pd.DataFrame]:
    """Heat map of `feature` over the prompt, its summary, top contexts and logit lens."""
    analysis = _analysis(explorer, prompt, ratio, seed)
    return (
        views.heat_map(explorer, analysis, layer, feature),
        views.feature_summary(explorer, analysis, layer, feature),
        views.contexts_table(explorer.contexts(layer, feature)),
        views.lens_table(explorer.logit_lens(layer, feature)),
    )


@user_errors
def show_token(
    explorer: Explorer, prompt: str, layer: int, ratio: float, seed: float, position: int
) -> pd.DataFrame:
    """The top-k features of the token at `position`."""
    analysis = _analysis(explorer, prompt, ratio, seed)
    return views.feature_table(explorer.token_features(analysis, layer, position))


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
    value = finite("Steer value", 0.0 if value is None else value, "a finite number", math.isfinite)
    share = finite(
        "The steered share", 1.0 if share is None else share, "in (0, 1]", lambda s: 0 < s <= 1
    )
    try:
        return Steer(int(layer), (int(feature or 0),), value, mode or "clamp", (0.0, share), where)
    except ValueError as e:
        raise InputError(str(e)) from e


def _run(
    explorer: Explorer,
    prompt: str,
    layer: int,
    ratio: float,
    seed: float,
    steps: float,
    feature: float,
    value: float,
    mode: str,
    share: float,
    positions: str,
    sampler: str | None = None,
    temperature: float | None = Sampling.temperature,
    remasking: str = Sampling.remasking,
    alg: str = Sampling.alg,
    alg_temp: float | None = Sampling.alg_temp,
    top_p: float | None = Sampling.top_p,
    top_k: float | None = Sampling.top_k,
    chat: str | None = "",
    answer: float | None = 16,
) -> DecodeRun:
    """The decode of the Decode tab's inputs (in the order of `decode_tab`'s components)."""
    if explorer.decode_refusal:
        raise InputError(explorer.decode_refusal)
    feature = explorer.check_feature(layer, feature)
    steer = parse_steer(layer, feature, value, mode, share, positions)
    sampling = explorer.sampling(
        sampler, steps, temperature, remasking, alg, alg_temp, top_p, top_k
    )
    if not (chat or "").strip():
        chat, answer = "", 0  # one cache entry per typed prompt
    seed = explorer.check_seed(seed)
    return explorer.decode(prompt, float(ratio or 0.0), seed, sampling, steer, chat, answer)


@user_errors
def decode(explorer: Explorer, *args) -> tuple:
    """Plain and steered decoding side by side, their numbers and their timelines (args: `_run`'s)."""
    run = _run(explorer, *args)
    return (
        views.decoded_text(explorer, run, run.plain),
        views.decoded_text(explorer, run, run.steered),
        views.decode_summary(run),
        views.timeline_frame(explorer, run, run.plain),
        views.timeline_frame(explorer, run, run.steered),
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
    rows = explorer.cell_features(generation, step, position)
    return views.cell_title(explorer, which, generation, step, position), views.feature_table(rows)


def cell_picker(explorer: Explorer, which: str) -> Callable:
    """The select handler of one timeline: the clicked cell's features (Gradio passes the cell)."""

    def pick(evt: gr.SelectData, *args):
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
            lens = gr.Dataframe(label=views.lens_label(explorer), interactive=False)
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
    """Decoding of the masked positions (or of a chat answer), plain and with a feature steered
    over a window of steps (by default the feature shown in the Explore tab), and each decode's
    timeline; the sampler and its options default to the model family's."""
    if explorer.decode_refusal:
        gr.Markdown(explorer.decode_refusal)
        return
    default = explorer.sampling()
    gr.Markdown(
        f"Iterative decoding of `{explorer.base.name}` (family `{explorer.base.family}`): each "
        "step predicts every masked position and commits some of them. LLaDA's sampler commits "
        "the most confident (or random ones, `remasking`); Dream's picks them by its `alg` "
        "(`origin`: at random; the others by confidence, margin or entropy; `alg_temp` samples "
        "them). The steered run adds to or clamps one feature (the SAE error term is kept, so "
        "only that feature's change moves the residual)."
    )
    with gr.Row(visible=explorer.chat):
        chat = gr.Textbox(
            value="",
            placeholder="e.g. Write one sentence about loops.",
            label="Chat message (when given, the decode answers it through the model's chat "
            "template instead of filling the prompt's masks)",
            scale=4,
        )
        answer = gr.Number(value=16, step=1, label="Answer tokens")  # checked by the handlers
    with gr.Row():
        sampler = gr.Radio(
            [(label, name) for name, label in SAMPLERS.items()],
            value=default.sampler,
            label="Sampler",
        )
        steps = gr.Slider(1, 64, value=default.steps, step=1, label="Steps")
        temperature = gr.Number(value=default.temperature, label="temperature (0: greedy)")
    with gr.Row(visible=default.sampler == "llada") as llada_options:
        remasking = gr.Radio(list(REMASKING), value=default.remasking, label="remasking")
    with gr.Row(visible=default.sampler == "dream") as dream_options:
        alg = gr.Dropdown(list(ALGS), value=default.alg, label="alg")
        alg_temp = gr.Number(value=default.alg_temp, label="alg_temp (0: most confident first)")
        top_p = gr.Number(value=default.top_p, label="top_p (1: every token)")
        top_k = gr.Number(value=default.top_k or 0, label="top_k (0: every token)")
    sampler.change(
        lambda name: (gr.Row(visible=name == "llada"), gr.Row(visible=name == "dream")),
        sampler,
        [llada_options, dream_options],
        api_name=False,
    )
    with gr.Row():
        feature = gr.Number(label="Feature to steer", minimum=0, value=0)
        value = gr.Number(label="Value", value=10.0)
        mode = gr.Radio(["clamp", "add", "relative"], value="clamp", label="Steering")
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
    decode_inputs = [*inputs, steps, feature, value, mode, share, positions, sampler, temperature]
    decode_inputs += [remasking, alg, alg_temp, top_p, top_k, chat, answer]
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
    with gr.Blocks(title="hub-sae explorer") as demo:
        gr.Markdown(views.header(explorer))
        with gr.Row():
            prompt = gr.Textbox(
                label=f"Prompt (at most {explorer.max_tokens} tokens; {explorer.mask_hint()})",
                value=example(explorer),
                lines=3,
                scale=4,
            )
            with gr.Column(scale=1):
                layers = gr.Dropdown(
                    choices=explorer.layers, value=explorer.default_layer, label="Layer"
                )
                ratio = gr.Slider(
                    0.0,
                    1.0,
                    value=0.0,
                    step=0.05,
                    label="Also mask at random (ratio)",
                    interactive=explorer.mask_text is not None,  # no mask token: clean text only
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

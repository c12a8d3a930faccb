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
from diffusion import Decoding, Steering
from explorer import Analysis, Explorer, InputError

EXAMPLE = "The [MASK] statement is used to leave a loop early, and [MASK] skips to the next one."
CONCURRENCY, QUEUE_SIZE = 2, 64
CSS = """
#heatmap .score-token:not(.highlighted) { opacity: 0.45; }
"""
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


def decoded_text(explorer: Explorer, decoding: Decoding, prompt_ids, reference=None) -> HeatMap:
    """The decoded sequence, generated positions labelled (`changed` where it differs)."""
    out = []
    for i, token in enumerate(decoding.ids.tolist()):
        label = None
        if prompt_ids[i] == explorer.base.mask_token_id:
            changed = reference is not None and reference[i] != token
            label = "changed" if changed else ("same" if reference is not None else "generated")
        out.append((explorer.token_text(token), label))
    return out


def trace_table(explorer: Explorer, decoding: Decoding, watch: int) -> pd.DataFrame:
    """One row per denoising step: committed tokens, masks left, strongest features."""
    rows = [
        {
            "step": i + 1,
            "committed": ", ".join(
                f"{p}:{explorer.token_text(t).strip()}" for p, t in step.committed.items()
            ),
            "masked left": step.masked_left,
            "top features (max act)": ", ".join(f"{f} ({v:.2f})" for f, v in step.top_features),
            f"feature {watch}": round(step.watched, 3),
        }
        for i, step in enumerate(decoding.steps)
    ]
    return pd.DataFrame(rows)


@user_errors
def decode(
    explorer: Explorer,
    prompt: str,
    layer: int,
    ratio: float,
    seed: float,
    steps: int,
    feature: int,
    value: float,
) -> tuple[HeatMap, HeatMap, pd.DataFrame, pd.DataFrame]:
    """Plain and steered decoding side by side, with the features seen at each step."""
    steering = Steering(int(feature or 0), float(value or 0.0))
    p, plain, steered = explorer.decode(
        prompt, float(ratio or 0.0), explorer.check_seed(seed), layer, int(steps or 1), steering
    )
    ids = p.input_ids.tolist()
    return (
        decoded_text(explorer, plain, ids),
        decoded_text(explorer, steered, ids, plain.ids.tolist()),
        trace_table(explorer, plain, steering.feature),
        trace_table(explorer, steered, steering.feature),
    )


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
    """Iterative decoding of the masked positions, plain and with one feature clamped (by default
    the feature shown in the Explore tab)."""
    if explorer.head is None:
        gr.Markdown(f"Decoding needs an LM head; `{explorer.base.name}` has none.")
        return
    gr.Markdown(
        "LLaDA-style decoding: each step predicts every masked position and commits the most "
        "confident ones. The steered run clamps one feature at the analysed positions "
        "(the SAE error term is kept, so only that feature's change moves the residual)."
    )
    with gr.Row():
        steps = gr.Slider(1, 64, value=8, step=1, label="Steps")
        feature = gr.Number(label="Feature to clamp", precision=0, minimum=0, value=0)
        value = gr.Number(label="Clamp value", value=10.0)
    explored.change(lambda f: f, explored, feature, api_name=False)
    run = gr.Button("Decode", variant="primary")
    with gr.Row():
        plain = gr.HighlightedText(label="Unsteered", elem_id="plain")
        steered = gr.HighlightedText(label="Steered", elem_id="steered")
    with gr.Row():
        plain_trace = gr.Dataframe(label="Unsteered: per step", interactive=False, wrap=True)
        steered_trace = gr.Dataframe(label="Steered: per step", interactive=False, wrap=True)
    run.click(
        functools.partial(decode, explorer),
        inputs=[*inputs, steps, feature, value],
        outputs=[plain, steered, plain_trace, steered_trace],
        api_name="decode",
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

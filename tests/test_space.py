"""The Space: handlers called directly, a tiny LLaDA for decoding and steering, and the HTTP API."""

import dataclasses
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import Client

sys.path.insert(0, str(Path(__file__).parents[1] / "space"))

import app  # noqa: E402
import views  # noqa: E402
from explorer import LLADA_SUITE, Band, Example, Explorer, InputError, default_suite  # noqa: E402

from hub_sae.activations import capture  # noqa: E402
from hub_sae.diffusion import (  # noqa: E402
    Steer,
    diffusion_generate,
    generate,
    masked_log_likelihood,
)
from hub_sae.models.chat import chat_inputs  # noqa: E402
from hub_sae.models.llada import save_llada_model  # noqa: E402
from hub_sae.sae import TopKSAE  # noqa: E402
from hub_sae.suite import SuiteInfo, save_suite  # noqa: E402
from tests.checkpoints import (  # noqa: E402
    write_tiny_dream,
    write_tiny_modernbert,
    write_tiny_qwen2,
)
from tests.test_diffusion import LLADA_MASK, save_llada_tokenizer  # noqa: E402
from tests.test_formats import populate_hub_cache, raw_weights, write_dictionary_learning  # noqa: E402
from tests.test_llada import tiny_model  # noqa: E402

PROMPT = "The [MASK] statement is used to leave a loop early, and [MASK] skips ahead."
CLIENTS, REQUESTS = 20, 3
BAD = (-1.0, float("nan"), float("inf"))
"""Numbers no temperature may take."""


@pytest.fixture(scope="session")
def explorer(trained_suite) -> Explorer:
    return Explorer.load(str(trained_suite), device="cpu")


def masked_positions(explorer: Explorer, text: str) -> list[int]:
    ids, _ = explorer.tokenize(text)
    return [i for i, t in enumerate(ids) if t == explorer.base.mask_token_id]


def test_default_suite_env_then_newest_run_then_llada(tmp_path, monkeypatch):
    monkeypatch.delenv("HUB_SAE_SUITE", raising=False)
    assert default_suite(tmp_path / "runs") == LLADA_SUITE
    # written in this order: hidden temp folders, checkpoints/ and logs/ are the newest, never picked
    for name in ("old", "new", ".new.tmp", ".old.old", "checkpoints", "logs"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "suite.json").write_text("{}")
    (tmp_path / "runs" / "unfinished").mkdir()
    assert default_suite(tmp_path / "runs") == str(tmp_path / "runs" / "new")
    monkeypatch.setenv("HUB_SAE_SUITE", "me/my-suite")
    assert default_suite(tmp_path / "runs") == "me/my-suite"


def test_header_names_suite_model_and_policy(explorer, trained_suite):
    header = views.header(explorer)
    assert f"`{trained_suite.name}`" in header and "`minilm`" in header and "`mask`" in header
    assert explorer.layers == [1, 3] and explorer.default_layer == 3


def test_typed_mask_tokens_are_the_selected_positions(explorer):
    prompt = explorer.prepare(PROMPT)
    expected = masked_positions(explorer, PROMPT)
    assert len(expected) == 2 and prompt.selected.nonzero().flatten().tolist() == expected
    assert prompt.tokens[expected[0]] == " [MASK]" and "".join(prompt.tokens[1:-1]) == PROMPT


@pytest.mark.parametrize("policy", ["unmask", "all", "clean"])
def test_other_policies_select_their_positions(explorer, policy):
    prompt = dataclasses.replace(explorer, policy=policy).prepare(PROMPT)
    masked = set(masked_positions(explorer, PROMPT))
    real = set(range(1, len(prompt.tokens)))
    expected = real - masked if policy == "unmask" else real
    assert set(prompt.selected.nonzero().flatten().tolist()) == expected


def test_random_masking_is_seeded_and_never_masks_bos(explorer):
    text = "Return the value of the named attribute of object."
    a, b = explorer.prepare(text, 0.5, seed=3), explorer.prepare(text, 0.5, seed=3)
    assert torch.equal(a.is_masked, b.is_masked) and a.is_masked.any()
    full = explorer.prepare(text, 1.0, seed=0)
    assert not full.selected[0] and not full.is_masked[0] and full.selected[1:].all()
    assert (full.input_ids[1:] == explorer.base.mask_token_id).all()
    assert torch.equal(full.clean_ids, explorer.prepare(text).clean_ids)


def test_heat_map_is_normalised_and_greys_unanalysed_tokens(explorer):
    analysis = explorer.analyse(PROMPT, 0.3, 1)
    feature = explorer.prompt_feature(analysis, 3)
    heat = views.heat_map(explorer, analysis, 3, feature)
    selected = analysis.prompt.selected.tolist()
    assert [score is not None for _, score in heat] == selected
    scores = [score for _, score in heat if score is not None]
    assert all(-1.0 <= s <= 1.0 for s in scores) and max(scores) == 1.0
    assert heat[0][1] is None  # BOS


def test_token_table_matches_sae_encode(explorer):
    analysis = explorer.analyse(PROMPT, 0.0, 0)
    position = masked_positions(explorer, PROMPT)[1]
    table = views.feature_table(explorer.token_features(analysis, 1, position))
    acts = capture(explorer.base, analysis.prompt.input_ids[None], None, [1])[1][0, position]
    with torch.no_grad():
        top_acts, top_indices = explorer.saes[1].encode(acts)
    expected = sorted(
        ((int(i), round(float(a), 4)) for a, i in zip(top_acts, top_indices, strict=True) if a > 0),
        key=lambda pair: -pair[1],
    )
    assert list(zip(table["feature"], table["activation"], strict=True)) == expected
    assert table["frequency %"].notna().all()


def test_analyse_handler_defaults_to_the_strongest_rare_feature(explorer):
    info, position, table, feature, heat, summary, link, *_, promoted, suppressed = app.analyse(
        explorer, PROMPT, 3, 0.0, 0
    )
    analysis = explorer.analyse(PROMPT, 0.0, 0)
    strongest, frequency = explorer.strongest(analysis, 3), explorer.features[3].frequency
    rare = [f for f in range(len(frequency)) if frequency[f] < 0.01 and strongest[f] > 0]
    assert rare and feature == max(rare, key=lambda f: strongest[f])
    assert dict(heat)  # tokens present
    assert max(s for _, s in heat if s is not None) == 1.0
    assert position.value in masked_positions(explorer, PROMPT)
    assert feature in set(table["feature"]) and "2 analysed" in info
    assert f"Feature {feature}" in summary and "Fires on" in summary and "no LM head" not in summary
    assert len(promoted) == len(suppressed) == 10
    assert promoted["logit"].is_monotonic_decreasing and suppressed["logit"].is_monotonic_increasing
    assert link == views.feature_link(explorer, 3, feature) and f"feature={feature}" in link


def test_default_feature_is_the_most_frequent_rare_one(explorer):
    frequency = explorer.features[3].frequency.tolist()
    rare = [f for f, share in enumerate(frequency) if 0 < share < 0.01]
    expected = max(rare, key=lambda f: (frequency[f], -f))
    assert explorer.default_feature(3) == expected
    assert explorer.default_feature(3) != max(range(len(frequency)), key=frequency.__getitem__)


def test_a_link_opens_its_layer_k_and_feature_and_names_a_bad_one(explorer):
    assert explorer.open_link({"layer": "1", "k": "8", "feature": "5"}) == (1, 5)
    assert explorer.open_link({}) == (3, explorer.default_feature(3))
    for params, message in [
        ({"layer": "2"}, r"No SAE for layer 2; this suite has layers \[1, 3\]"),
        ({"layer": "x"}, "The link's layer must be a whole number between 0 and 3; got 'x'"),
        ({"feature": "768"}, "The link's feature must be a whole number between 0 and 767"),
        ({"feature": "nan"}, "The link's feature must be a whole number"),
        ({"k": "4"}, "The link asks for k = 4; this Space serves the k = 8 SAEs .* --k 4"),
    ]:
        with pytest.raises(InputError, match=message):
            explorer.open_link(params)
    layer, info, *_, feature, heat, summary, link, histogram, by_t, examples, _, _ = app.open_link(
        explorer, PROMPT, 0.0, 0, {"layer": "1", "feature": "<b>1e9"}
    )
    assert "The link's feature must be a whole number" in info and "2 analysed" in info
    assert (layer, feature) == (3, explorer.default_feature(3))
    assert summary.startswith(f"### Feature {feature} · layer 3") and len(histogram)
    shown = app.open_link(explorer, PROMPT, 0.0, 0, {"layer": "1", "k": "8", "feature": "7"})
    assert (shown[0], shown[4]) == (1, 7) and shown[7].count("?layer=1&k=8&feature=7") == 2


def test_feature_page_shows_v2_statistics_on_clean_text(explorer, trained_suite):
    stats = explorer.features[3]
    assert stats.version == 2 and stats.bands > 1
    # a feature with examples in every band (a rare one's few activations are all top examples,
    # and a band never repeats them)
    feature = int((stats.example_values[:, 1:, 0] > 0).all(1).nonzero()[0])
    edges, counts = explorer.histogram(3, feature)
    assert sum(counts) == int(stats.histogram[feature].sum()) > 0 and len(edges) == len(counts) + 1
    t_edges, shares = explorer.frequency_by_t(3, feature)
    assert shares == stats.frequency_by_t[feature].tolist() and t_edges[0] < t_edges[-1]
    bars = views.histogram_frame(explorer, 3, feature)
    assert list(bars["positions"]) == counts
    labels = list(bars["activation from"])
    assert [float(x) for x in labels] == pytest.approx(edges[:-1], abs=1e-4)
    assert labels == sorted(labels)  # as text: the browser's order
    by_t = views.frequency_frame(explorer, 3, feature)
    assert list(by_t["fires on %"]) == [round(100 * s, 4) for s in shares] and len(by_t) == 6
    bands = explorer.examples(3, feature)
    assert bands[0].name == "Top activations" and len(bands) == 1 + stats.bands
    tokenizer, w = explorer.base.tokenizer, stats.window
    for b, band in enumerate(bands):
        for example, value, ids, masked in zip(
            band.examples,
            stats.example_values[feature, b],
            stats.example_ids[feature, b],
            stats.example_masked[feature, b],
            strict=False,
        ):
            kept = [i for i in ids.tolist() if i >= 0]
            assert "".join(example.pieces) == tokenizer.decode(kept)  # the clean text
            assert example.activation == float(value) and "[MASK]" not in example.pieces
            assert example.pieces[example.centre] == explorer.pieces(kept)[ids[:w].ge(0).sum()]
            assert example.masked == [bool(m) for m, i in zip(masked, ids, strict=True) if i >= 0]
    page = views.examples_html(bands)
    assert page.count("<mark class='centre") == sum(len(band.examples) for band in bands)
    assert page.count("class='masked'") + page.count("centre masked") == sum(
        sum(e.masked) for band in bands for e in band.examples
    )
    promoted = explorer.logit_effects(3, feature)
    assert [t.token for t in promoted] == [
        explorer.token_text(i) for i in stats.logit_top_ids[feature]
    ]
    summary = views.feature_summary(explorer, explorer.analyse(PROMPT, 0.0, 0), 3, feature)
    assert f"mean activation **{float(stats.mean_activation[feature]):.3f}**" in summary
    assert f"{100 * float(stats.frequency_masked[feature]):.3f} %** of" in summary


def test_examples_escape_their_text(explorer):
    hostile = Example(
        1.0, ["<script>alert(1)</script>", " a&b", " <i>"], 1, [True, False, True], 0.3
    )
    page = views.examples_html([Band("<b>band</b>", [hostile])])
    assert "<script>" not in page and "<i>" not in page and "<b>band" not in page
    assert "&lt;script&gt;" in page and "<mark class='centre'>a&amp;b</mark>" in page
    assert "<u class='masked'>&lt;i&gt;</u>" in page and "<td>0.30</td>" in page


def test_search_by_token_and_by_text(explorer):
    stats, feature = explorer.features[3], explorer.default_feature(3)
    token = int(stats.example_ids[feature, 0, 0, stats.window])
    hits = explorer.search_token(3, explorer.token_text(token))
    ids = stats.example_ids[..., stats.window].long().flatten(1)
    values = stats.example_values.flatten(1)
    on = [(float(values[f][ids[f] == token].max()), int((ids[f] == token).sum()), f)
          for f in range(len(ids)) if (ids[f] == token).any()]  # fmt: skip
    expected = sorted(on, key=lambda hit: (-hit[0], -hit[1], hit[2]))[:20]
    assert [(h.activation, h.count, h.feature) for h in hits] == expected
    assert feature in [h.feature for h in hits] or len(hits) == 20
    text = app.search(explorer, PROMPT, "text", 1, 0.0, 0)
    analysis = explorer.analyse(PROMPT, 0.0, 0)
    for row in text.itertuples():
        acts = explorer.feature_acts(analysis, 1, row.feature)
        assert row.activation == round(float(acts.max()), 4) and row.count == int((acts > 0).sum())
    assert list(text["activation"]) == sorted(text["activation"], reverse=True) and len(text)
    with pytest.raises(gr.Error, match="Type a token to search for"):
        app.search(explorer, "  ", "token", 3, 0.0, 0)
    with pytest.raises(gr.Error, match=r"'interpretability' is \d tokens for this tokenizer"):
        app.search(explorer, "interpretability", "token", 3, 0.0, 0)
    with pytest.raises(gr.Error, match=r"Type \[MASK\]"):
        app.search(explorer, "no masks here", "text", 3, 0.0, 0)


def test_prompt_too_long_is_a_gradio_error(explorer):
    with pytest.raises(gr.Error, match="at most 256"):
        app.analyse(explorer, "word " * 300, 3, 0.0, 0)


def test_a_huge_prompt_is_refused_before_tokenising(explorer):
    """A 10 MB prompt took 9.3 s and 2.2 GB in the tokenizer before its length was checked."""
    with pytest.raises(gr.Error, match=r"1,000,000 characters long; .* at most 8,192 characters"):
        app.analyse(explorer, "[MASK] " * 142_857 + "x", 3, 0.0, 0)


def test_an_sae_hooked_elsewhere_than_a_block_output_is_refused(explorer):
    """A sparsify `layers.3.mlp` SAE would be applied to the residual stream after block 3."""
    mlp = TopKSAE(explorer.base.d_model, 64, 4, layer=3, hookpoint="layers.3.mlp")
    with pytest.raises(ValueError, match=r"The Space applies SAEs to the residual stream .*mlp"):
        dataclasses.replace(explorer, saes={**explorer.saes, 3: mlp})


def test_bad_inputs_are_clear_errors(explorer):
    with pytest.raises(gr.Error, match=r"Type \[MASK\]"):
        app.analyse(explorer, "No mask in this prompt.", 3, 0.0, 0)
    with pytest.raises(gr.Error, match="layers \\[1, 3\\]"):
        app.analyse(explorer, PROMPT, 2, 0.0, 0)
    with pytest.raises(gr.Error, match="Token 0 is not analysed"):
        app.show_token(explorer, PROMPT, 3, 0.0, 0, 0)  # BOS
    with pytest.raises(gr.Error, match="between 0 and 767"):
        app.show_feature(explorer, PROMPT, 3, 0.0, 0, 768)
    for feature in ("abc", float("nan"), float("inf"), 2.5, None):
        with pytest.raises(gr.Error, match="Feature must be a whole number between 0 and 767"):
            app.show_feature(explorer, PROMPT, 3, 0.0, 0, feature)
    for seed in (1e30, -1, "abc", float("nan")):
        with pytest.raises(gr.Error, match="Seed must be a whole number between 0 and 4294967295"):
            app.analyse(explorer, PROMPT, 3, 0.5, seed)
    with pytest.raises(gr.Error, match="Nothing to decode"):
        app.decode(explorer, "No mask here.", 3, 0.0, 0, 4, 0, 1.0, "clamp", 1.0, "masked")
    with pytest.raises(gr.Error, match="Steer at"):
        app.decode(explorer, PROMPT, 3, 0.0, 0, 4, 0, 1.0, "clamp", 1.0, "first")
    with pytest.raises(gr.Error, match="Feature must be a whole number"):
        app.decode(explorer, PROMPT, 3, 0.0, 0, 4, "abc", 1.0, "clamp", 1.0, "masked")
    with pytest.raises(gr.Error, match="Steps must be a whole number"):
        app.decode(explorer, PROMPT, 3, 0.0, 0, "x", 0, 1.0, "clamp", 1.0, "masked")
    with pytest.raises(gr.Error, match="Steer value must be a finite number; got inf"):
        app.decode(explorer, PROMPT, 3, 0.0, 0, 4, 0, float("inf"), "clamp", 1.0, "masked")
    with pytest.raises(gr.Error, match=r"must lie in 0\.\.18"):
        app.decode(explorer, PROMPT, 3, 0.0, 0, 4, 0, 1.0, "clamp", 1.0, "3, 99")
    for share in (0.0, 1.5, "x", float("nan")):
        with pytest.raises(gr.Error, match=r"The steered share must be in \(0, 1\]"):
            app.decode(explorer, PROMPT, 3, 0.0, 0, 4, 0, 1.0, "clamp", share, "masked")
    with pytest.raises(gr.Error, match="Steer value must be a finite number; got 'x'"):
        app.decode(explorer, PROMPT, 3, 0.0, 0, 4, 0, "x", "clamp", 1.0, "masked")
    steer = (PROMPT, 3, 0.0, 0, 4, 0, 1.0, "clamp", 1.0, "masked")
    for options, message in [
        (("gpt",), "Sampler 'gpt': choose one of llada, dream"),
        (("llada", 0.0, "sometimes"), "Remasking 'sometimes': choose one of low_confidence"),
        (("dream", 0.0, "random", "fastest"), "alg 'fastest': choose one of origin"),
        *[(("dream", t), f"temperature must be a finite number >= 0; got {t!r}") for t in BAD],
        *[(("dream", 0.0, "random", "entropy", t), f"alg_temp must be .*; got {t!r}") for t in BAD],
        *[
            (
                ("dream", 0.0, "random", "entropy", None, p),
                f"top_p must be in \\(0, 1\\]; got {p!r}",
            )
            for p in (0.0, 1.5, float("nan"))
        ],
        *[
            (("dream", 0.0, "random", "entropy", None, None, k), "top_k must be a whole number")
            for k in (-1, 2.5, "x", 1e9)
        ],
    ]:
        with pytest.raises(gr.Error, match=message):
            app.decode(explorer, *steer, *options)


def test_default_decodes_with_its_unmasking_head(explorer):
    """The embedded default (MiniLM + fitted head): decode, timeline, steering, cell features."""
    assert explorer.head is not None and explorer.base.has_lm_head
    masks = masked_positions(explorer, PROMPT)
    args = (PROMPT, 3, 0.0, 0, 2, 7, 50.0, "clamp", 0.5, "masked")
    plain, steered, summary, plain_frame, steered_frame = app.decode(explorer, *args)
    assert [label for _, label in plain].count("generated") == 2
    assert "[MASK]" not in "".join(token for token, _ in plain)
    frame = plain_frame.data
    assert list(frame["step"]) == [1, 2] and frame.shape[1] == len(plain) + 1
    assert [frame.iloc[0, p + 1] for p in masks].count("…") == 1  # one mask left after step 1
    steer = app.parse_steer(3, 7, 50.0, "clamp", 0.5, "masked")
    run = explorer.decode(PROMPT, 0.0, 0, explorer.sampling(steps=2), steer)
    assert run.activation[1] > run.activation[0] and "unsteered | steered" in summary
    decoded = run.decoded
    assert run.log_likelihood[0] == masked_log_likelihood(
        explorer.base, run.plain.tokens[0], decoded
    )
    title, cell = app.timeline_cell(explorer, "steered", [0, masks[0] + 1], *args)
    assert f"position {masks[0]}" in title and "masked then" in title
    trace = run.steered.timeline.layers[3]
    assert list(cell["feature"]) == [
        int(f)
        for f, a in zip(
            trace.top_indices[0, 0, masks[0]], trace.top_acts[0, 0, masks[0]], strict=True
        )
        if a > 0
    ]


# --- a tiny random LLaDA with SAEs made by TopKSAE directly ---------------------------------


@pytest.fixture(scope="module")
def llada(tmp_path_factory) -> Explorer:
    root = tmp_path_factory.mktemp("llada")
    save_llada_model(tiny_model(), root / "model")
    save_llada_tokenizer(root / "model")
    torch.manual_seed(0)
    saes = {(layer, 8): TopKSAE(64, 128, 8, layer=layer) for layer in (1, 2)}
    info = SuiteInfo(str(root / "model"), "mask", layers=[1, 2], ks=[8], d_in=64, d_sae=128)
    save_suite(root / "suite", saes, {}, info)
    return Explorer.load(str(root / "suite"), device="cpu")


def llada_prompt(n_masks: int = 4) -> str:
    return " ".join(["the", "cat", *[LLADA_MASK] * n_masks, "on", "a", "mat"])


def test_large_clamp_steers_to_the_features_logit_lens_token(llada):
    text = llada_prompt(4)
    lens = views.lens_table(llada.logit_lens(2, 5, n=3))
    target = next(t for t in lens["token"] if t != LLADA_MASK)
    run = llada.decode(text, 0.0, 0, llada.sampling(steps=4), Steer(2, (5,), 1e4))
    generated = [llada.token_text(t) for t in run.steered.tokens[0, run.decoded]]
    assert generated == [target] * 4 and not torch.equal(run.plain.tokens, run.steered.tokens)
    assert run.log_likelihood[1] < run.log_likelihood[0]


@pytest.mark.parametrize(
    "value, mode", [(1e39, "clamp"), (-1e39, "add"), (1e300, "add"), (1e4 + 1, "clamp")]
)
def test_steering_value_is_bounded(llada, value, mode):
    """1e39 overflowed float32 and crashed the handler; 1e300 added decoded padding everywhere."""
    with pytest.raises(gr.Error, match=r"steering value must lie between -10,000 and 10,000"):
        app.decode(llada, llada_prompt(2), 2, 0.0, 0, 2, 5, value, mode, 1.0, "masked")


def test_default_is_the_published_llada_release(llada, tmp_path, monkeypatch):
    """No HUB_SAE_SUITE and no runs/: the DLM-Scope repo, read here from an offline hub cache
    holding a miniature of it (dictionary_learning layout, no suite.json, no features)."""
    import huggingface_hub.constants

    release = tmp_path / "release" / "saes_mask_LLaDA-8B-Base_top_k"
    for layer in (1, 2):
        folder = release / f"resid_post_layer_{layer}" / "trainer_0"
        write_dictionary_learning(folder, raw_weights(layer, d_in=64, d_sae=128), layer, k=8)
    populate_hub_cache(tmp_path / "cache", LLADA_SUITE, tmp_path / "release")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HUB_SAE_SUITE", raising=False)
    monkeypatch.chdir(tmp_path)
    explorer = Explorer.load(device="cpu", base_model=llada.base.name)
    assert explorer.title == LLADA_SUITE and explorer.layers == [1, 2]
    assert explorer.policy == "mask" and explorer.features == {1: None, 2: None}
    assert explorer.saes[1].base_model == "GSAI-ML/LLaDA-8B-Base"
    analysis = explorer.analyse(llada_prompt(2), 0.0, 0)
    assert int(analysis.prompt.selected.sum()) == 2


def test_llada_handlers_decode_and_show_the_logit_lens(llada):
    text = llada_prompt(3)
    *_, heat, summary, _, histogram, by_t, examples, promoted, suppressed = app.analyse(
        llada, text, 1, 0.0, 0
    )
    assert len(promoted) == len(suppressed) == 10 and "No feature statistics" in summary
    assert histogram is by_t is None and "no feature statistics" in examples
    assert promoted["logit"].min() > suppressed["logit"].max()  # the live lens, both ends
    assert [s is not None for _, s in heat] == [False, False, False, True, True, True] + [False] * 3
    plain, steered, summary, plain_frame, steered_frame = app.decode(
        llada, text, 2, 0.0, 0, 3, 5, 1e4, "clamp", 1.0, "masked"
    )
    assert [label for _, label in plain].count("generated") == 3
    assert {label for _, label in steered} <= {None, "changed", "same"}
    masked_left = [(row[4:7] == "…").sum() for row in plain_frame.data.to_numpy()]  # 3..5
    assert masked_left == [2, 1, 0] and len(steered_frame.data) == 3


# --- the app over HTTP -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(explorer):
    demo = app.build_app(explorer)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True)
    yield demo.local_url
    demo.close()


def test_api_analyse_feature_and_token(server, explorer):
    client = Client(server, verbose=False)
    info, position, table, feature, heat, summary, *_ = client.predict(
        PROMPT, 3, 0.0, 0, api_name="/analyze"
    )
    assert "2 analysed" in info and position["value"] in masked_positions(explorer, PROMPT)
    assert feature in column(table, "feature") and summary.startswith(f"### Feature {feature}")
    tokens = [t["token"] for t in heat]
    assert tokens[0] == "[CLS] " and tokens.count(" [MASK]") == 2
    assert max(t["class_or_confidence"] or 0 for t in heat) == 1.0
    heat2, summary2, *_ = client.predict(PROMPT, 3, 0.0, 0, 7, api_name="/feature")
    assert summary2.startswith("### Feature 7") and len(heat2) == len(heat)
    table2 = client.predict(PROMPT, 1, 0.0, 0, position["value"], api_name="/token")
    assert column(table2, "feature")
    with pytest.raises(Exception, match="at most 256"):
        client.predict("word " * 300, 3, 0.0, 0, api_name="/analyze")
    with pytest.raises(Exception, match="Feature must be a whole number"):
        client.predict(PROMPT, 3, 0.0, 0, "abc", api_name="/feature")
    with pytest.raises(Exception, match="Seed must be a whole number"):
        client.predict(PROMPT, 3, 0.5, 1e30, api_name="/analyze")


def column(frame: dict, name: str) -> list:
    return [row[frame["headers"].index(name)] for row in frame["data"]]


def test_twenty_concurrent_clients(server):
    """20 clients, each sending analyse, feature and token requests: every one is answered."""

    def one(i: int) -> list[str]:
        client = Client(server, verbose=False)
        text, layer = f"Example {i}: the [MASK] statement ends the loop.", 1 + 2 * (i % 2)
        failures = []
        for request in range(REQUESTS):
            try:
                info, position, *_ = client.predict(text, layer, 0.2, i, api_name="/analyze")
                assert "analysed" in info
                client.predict(text, layer, 0.2, i, request, api_name="/feature")
                client.predict(text, layer, 0.2, i, position["value"], api_name="/token")
            except Exception as e:  # every failure is counted, none hidden
                failures.append(f"client {i} request {request}: {e!r}")
        return failures

    with ThreadPoolExecutor(CLIENTS) as pool:
        failures = [f for client in pool.map(one, range(CLIENTS)) for f in client]
    assert failures == [], f"{len(failures)} of {CLIENTS * REQUESTS} rounds failed"


def test_api_decode_on_llada(llada):
    demo = app.build_app(llada)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True)
    try:
        client = Client(demo.local_url, verbose=False)
        plain, steered, summary, plain_frame, steered_frame = client.predict(
            llada_prompt(3), 2, 0.0, 0, 3, 5, 1e4, "add", 0.2, "masked", api_name="/decode"
        )
    finally:
        demo.close()
    assert [t["class_or_confidence"] for t in plain].count("generated") == 3
    assert len(plain_frame["data"]) == 3 and len(steered) == len(plain)
    assert "add 10000 at masked positions during 0%-20% of the steps" in summary


def test_main_serves_on_localhost_7860_by_default(monkeypatch, explorer):
    calls = {}
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    monkeypatch.setattr(Explorer, "load", classmethod(lambda cls, *a, **kw: explorer))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.update(kw))
    app.main([])
    assert (calls["server_name"], calls["server_port"]) == ("127.0.0.1", 7860)
    app.main(["--host", "0.0.0.0", "--port", "8000"])
    assert (calls["server_name"], calls["server_port"]) == ("0.0.0.0", 8000)


# --- every family: a tiny Dream (Dream's sampler, chat), mask text, the autoregressive baseline --


def tiny_suite(root: Path, model: Path, policy: str, layers=(1, 2), d_in: int = 32) -> Explorer:
    """Random TopK SAEs (d_sae 64, k 4) on `layers` of the model at `model`, saved as a suite."""
    torch.manual_seed(0)
    saes = {(layer, 4): TopKSAE(d_in, 64, 4, layer=layer) for layer in layers}
    info = SuiteInfo(str(model), policy, layers=list(layers), ks=[4], d_in=d_in, d_sae=64)
    save_suite(root / "suite", saes, {}, info)
    return Explorer.load(str(root / "suite"), device="cpu")


@pytest.fixture(scope="module")
def dream(tmp_path_factory) -> Explorer:
    root = tmp_path_factory.mktemp("dream")
    return tiny_suite(root, write_tiny_dream(root / "model"), "mask")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Explorer:
    """A tiny random Qwen2 causal LM (family ar: no mask token) with clean-policy SAEs."""
    root = tmp_path_factory.mktemp("qwen")
    return tiny_suite(root, write_tiny_qwen2(root / "model"), "clean")


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory) -> Explorer:
    """A tiny random ModernBERT masked LM (family mlm)."""
    root = tmp_path_factory.mktemp("modernbert")
    return tiny_suite(root, write_tiny_modernbert(root / "model"), "mask")


DREAM_PROMPT = "the cat <|mask|> <|mask|> on the mat"


def gradio_strings(demo: gr.Blocks) -> str:
    """Every label and value of the page's components, as one string."""
    props = [c.get("props", {}) for c in demo.config["components"]]
    return " ".join(str(p.get(key)) for p in props for key in ("label", "value"))


def test_mask_text_comes_from_each_familys_tokenizer(explorer, llada, dream, modernbert, qwen):
    assert [e.mask_text for e in (explorer, llada, dream, modernbert)] == [
        "[MASK]",
        LLADA_MASK,
        "<|mask|>",
        "[MASK]",
    ]
    page = gradio_strings(app.build_app(dream))
    assert "type <|mask|> for masked positions" in page and "[MASK]" not in page
    assert app.example(dream).count("<|mask|>") == 2 and "<|mask|>" in views.header(dream)
    with pytest.raises(gr.Error, match="Type <\\|mask\\|> in the prompt"):
        app.analyse(dream, "the cat sat", 1, 0.0, 0)
    assert qwen.mask_text is None and app.example(qwen) == app.EXAMPLE.format(*app.EXAMPLE_WORDS)
    assert "no mask token" in views.header(qwen)


def test_dream_decodes_through_the_space_with_its_sampler_and_alg_options(dream):
    options = dict(alg="topk_margin", alg_temp=0.5, temperature=0.7, top_p=0.9, top_k=5)
    prompt = dream.prepare(DREAM_PROMPT)
    masks = prompt.is_masked.nonzero().flatten().tolist()
    expected = diffusion_generate(
        dream.base, prompt.input_ids[None], 0, 3,
        generator=torch.Generator().manual_seed(3), **options,
    ).tokens[0]  # fmt: skip
    assert dream.sampling().sampler == "dream"  # the family's default
    demo = app.build_app(dream)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True)
    try:
        client = Client(demo.local_url, verbose=False)
        steer = (1, 0.0, 3, 3, 7, 1.0, "add", 1.0, "masked")  # layer, ratio, seed, steps, ...
        plain, _, summary, frame, _ = client.predict(
            DREAM_PROMPT, *steer, "dream", 0.7, "low_confidence", "topk_margin", 0.5, 0.9, 5,
            api_name="/decode",
        )  # fmt: skip
        default = client.predict(DREAM_PROMPT, *steer, api_name="/decode")[2]
        llada_plain, _, llada_summary, *_ = client.predict(
            DREAM_PROMPT, *steer, "llada", 0.0, "low_confidence", api_name="/decode"
        )
    finally:
        demo.close()
    assert [t["token"] for t in plain if t["class_or_confidence"] == "generated"] == [
        " " + dream.token_text(int(expected[p])).strip() for p in masks
    ]
    assert len(frame["data"]) == 3 and "<|mask|>" not in "".join(t["token"] for t in plain)
    assert "Dream's diffusion_generate (3 steps, temperature 0.7, alg topk_margin, " in summary
    assert "alg_temp 0.5, top_p 0.9, top_k 5)" in summary
    assert (
        "Dream's diffusion_generate (3 steps, temperature 0, alg entropy, alg_temp 0, top_p 1, top_k all)"
        in default
    )
    greedy = generate(dream.base, prompt.input_ids[None], 3, 0).tokens[0]
    assert "LLaDA's generate (3 steps, temperature 0, remasking low_confidence)" in llada_summary
    assert [t["token"] for t in llada_plain if t["class_or_confidence"] == "generated"] == [
        " " + dream.token_text(int(greedy[p])).strip() for p in masks
    ]


def test_logit_lens_is_the_models_own_final_norm_and_head(dream, qwen, modernbert, llada):
    """The lens of a decoder direction equals the model's logits with the last block's output
    replaced by it; shifted families (Dream, ar) promote them at the next position."""
    assert views.lens_label(llada) == "Logit lens: tokens promoted at the same position"
    for explorer in (dream, qwen, modernbert):
        layer = explorer.layers[-1]
        direction = explorer.saes[layer].W_dec[5]
        last = explorer.base.blocks[-1]

        def replace(module, args, output, direction=direction):
            hidden = output[0] if isinstance(output, tuple) else output
            new = direction.expand_as(hidden)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = last.register_forward_hook(replace)
        try:
            with torch.no_grad():
                logits = explorer.base.run(torch.tensor([[1, 2]]))[0, 0]
        finally:
            handle.remove()
        lens = explorer.logit_lens(layer, 5, n=3)
        assert [t.token for t in lens] == [explorer.token_text(i) for i in logits.topk(3).indices]
        assert [t.logit for t in lens] == pytest.approx(logits.topk(3).values.tolist(), abs=1e-4)
        analysis = explorer.analyse(app.example(explorer), 0.0, 0)
        summary = views.feature_summary(explorer, analysis, layer, 5)
        where = "NEXT" if explorer.base.shifted else "same"
        assert f"promotes and suppresses at the {where} position" in summary
        label = f"Logit lens: tokens promoted at the {where.lower()} position"
        assert views.lens_label(explorer) == label


def test_chat_box_appends_masked_answer_tokens_after_the_chat_prompt(dream, llada):
    assert dream.chat and not llada.chat
    chat_ids = chat_inputs(dream.base, "hello world")[0][0].tolist()
    args = ("", 1, 0.0, 0, 2, 0, 1.0, "clamp", 1.0, "masked", "dream", 0.0, "low_confidence")
    plain, _, summary, frame, _ = app.decode(
        dream, *args, "entropy", None, None, None, "hello world", 3
    )
    assert [token for token, label in plain if label is None] == [
        dream.token_text(i) for i in chat_ids
    ]
    assert [label for _, label in plain] == [None] * len(chat_ids) + ["generated"] * 3
    assert "<|mask|>" not in "".join(token for token, _ in plain)
    assert "<|im_start|>" in plain[0][0] and frame.data.shape == (2, len(chat_ids) + 3 + 1)
    steer = app.parse_steer(1, 0, 1.0, "clamp", 1.0, "masked")
    run = dream.decode("", 0.0, 0, dream.sampling("dream", 2), steer, "hello world", 3)
    mask = dream.base.mask_token_id
    assert run.prompt.input_ids.tolist() == chat_ids + [mask] * 3  # what the model reads
    expected = diffusion_generate(dream.base, torch.tensor([chat_ids]), 3, 2, alg="entropy")
    assert torch.equal(run.plain.tokens, expected.tokens)
    for answer in (0, "x", 2.5, 64 - len(chat_ids) + 1, 10_000):  # 64: the model's context
        with pytest.raises(gr.Error, match="Answer tokens must be a whole number between 1 and"):
            app.decode(dream, *args, "entropy", None, None, None, "hello world", answer)
    with pytest.raises(gr.Error, match="has no chat template"):
        app.decode(llada, *args, "entropy", None, None, None, "hello", 3)
    huge = "hello " * 200_000  # bounded before the chat template and the tokenizer run
    with pytest.raises(gr.Error, match=r"chat message is 1,200,000 characters long; .* at most"):
        app.decode(dream, *args, "entropy", None, None, None, huge, 3)


def test_autoregressive_model_explores_clean_text_and_refuses_to_decode(qwen):
    text = "Return the value of the named attribute."
    info, position, table, feature, heat, summary, *_, promoted, _ = app.analyse(
        qwen, text, 1, 0.0, 0
    )
    assert qwen.base.family == "ar" and qwen.policy == "clean" and len(heat) > 5
    assert [score is not None for _, score in heat] == [False] + [True] * (len(heat) - 1)
    assert f"{len(heat) - 1} analysed" in info and len(promoted) == 10
    with pytest.raises(gr.Error, match="no mask token, so its SAEs read clean text only. Set the"):
        app.analyse(qwen, text, 1, 0.5, 0)
    with pytest.raises(gr.Error, match=r"autoregressive model \(family ar\): it has no mask token"):
        app.decode(qwen, text, 1, 0.0, 0, 2, 0, 1.0, "clamp", 1.0, "masked")
    demo = app.build_app(qwen)
    page = gradio_strings(demo)
    assert "no mask token to denoise" in page and "clean text only" in page
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True)
    try:
        client = Client(demo.local_url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        remote = client.predict(text, 1, 0.0, 0, api_name="/analyze")[0]
    finally:
        demo.close()
    assert "/decode" not in endpoints and "/analyze" in endpoints and remote == info

"""Decoding dynamics: every metric against a plain transcription of DESIGN.md's definitions (loops
over steps and positions, with sets) on real decodes of the embedded default, hand-built Timelines
for the edge cases, and `hub-sae analyze order` end to end."""

import json
import math
import re

import pytest
import torch

from hub_sae.analysis.dynamics import (
    COUNTS,
    METRICS,
    SAMPLERS,
    decode,
    decoding_dynamics,
    pool,
    prompt_ids,
)
from hub_sae.analysis.report import open_suite
from hub_sae.cli import main
from hub_sae.diffusion import Generation, LayerTrace, Timeline, masked_log_likelihood
from hub_sae.sae import TopKSAE
from hub_sae.suite import SuiteInfo, save_suite
from tests.checkpoints import write_tiny_qwen2

PROMPTS = ["Return the absolute value of a number.", "Open a file."]


def reference_terms(generation: Generation, layer: int) -> tuple[list, list, list, list]:
    """DESIGN.md's terms, written out: (stable masked, stable committed, drift, flips). A set is a
    position's recorded features with activation > 0; J(empty, empty) = 1; only positions masked
    at some step count, a commit at the last step has no drift."""
    timeline = generation.timeline
    trace = timeline.layers[layer]
    acts, features = trace.top_acts.tolist(), trace.top_indices.tolist()
    masked, commit = timeline.masked.tolist(), timeline.commit_step.tolist()
    steps, rows, length = len(masked), len(masked[0]), len(masked[0][0])

    def cell(s, b, t):
        return {f for f, a in zip(features[s][b][t], acts[s][b][t], strict=True) if a > 0}

    def top1(s, b, t):
        best = max(range(len(acts[s][b][t])), key=lambda i: acts[s][b][t][i])
        return features[s][b][t][best] if acts[s][b][t][best] > 0 else None

    def jaccard(a, b):
        return 1.0 if not a and not b else len(a & b) / len(a | b)

    stable_masked, stable_committed, drift, flips = [], [], [], []
    for b in range(rows):
        for t in range(length):
            if not any(masked[s][b][t] for s in range(steps)):
                continue  # prompt or padding
            for s in range(steps - 1):
                j = jaccard(cell(s, b, t), cell(s + 1, b, t))
                if masked[s][b][t] and masked[s + 1][b][t]:
                    stable_masked.append(j)
                if not masked[s][b][t] and not masked[s + 1][b][t]:
                    stable_committed.append(j)
                flips.append(float(top1(s, b, t) != top1(s + 1, b, t)))
            c = commit[b][t]
            if 0 <= c < steps - 1:
                drift.append(1 - jaccard(cell(c, b, t), cell(steps - 1, b, t)))
    return stable_masked, stable_committed, drift, flips


def summary(terms) -> dict:
    means = [sum(x) / len(x) if x else math.nan for x in terms]
    return dict(zip(METRICS + COUNTS, means + [len(x) for x in terms], strict=True))


def assert_matches(dynamics, expected: dict) -> None:
    assert set(dynamics._asdict()) == set(expected)
    for name, value in dynamics._asdict().items():
        assert value == pytest.approx(expected[name], nan_ok=True, abs=1e-9), name


@pytest.fixture(scope="module")
def suite(trained_suite):
    return open_suite(trained_suite)


@pytest.fixture(scope="module")
def padded(suite):
    """The two prompts (of different lengths) left-padded into one batch, and its attention mask."""
    rows = [prompt_ids(suite.base, p)[0] for p in PROMPTS]
    width = max(len(r) for r in rows)
    pad = suite.base.tokenizer.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([(torch.arange(width) >= width - len(r)).long() for r in rows])
    assert len(rows[0]) != len(rows[1]) and pad != suite.base.mask_token_id
    return ids, mask


@pytest.mark.parametrize(
    ("sampler", "top", "block_length"),
    [("llada:low_confidence", 8, 4), ("llada:random", 3, 8), ("dream:entropy", 8, 8)],
)
def test_dynamics_of_real_padded_decodes_match_the_definitions(
    suite, padded, sampler, top, block_length
):
    ids, attention_mask = padded
    layer = max(suite.saes)
    generation = decode(
        suite.base, sampler, ids, 8, 8, block_length, suite.saes, top, 0, attention_mask
    )
    assert generation.timeline.layers[layer].top_acts.shape[-1] == top  # the sets' bound
    padding = attention_mask == 0
    prompt_masked = generation.timeline.masked[:, :, : ids.shape[1]]
    assert padding.any() and not prompt_masked[:, padding].any()
    dynamics = decoding_dynamics(generation, layer)
    assert_matches(dynamics, summary(reference_terms(generation, layer)))
    # every term is there: 2 rows x 8 new tokens, 7 pairs of steps each
    assert dynamics.pairs == 2 * 8 * 7 and dynamics.committed_positions > 0
    assert dynamics.masked_pairs > 0 and dynamics.committed_pairs > 0
    assert 0 < dynamics.stable_masked < 1 or 0 < dynamics.stable_committed < 1


def test_pooled_decodes_are_the_mean_over_all_their_terms(suite):
    layer = min(suite.saes)
    generations = [
        decode(suite.base, "dream:origin", prompt_ids(suite.base, p), 6, 3, 6, suite.saes, 8, i)
        for i, p in enumerate(PROMPTS)
    ]
    terms = [reference_terms(g, layer) for g in generations]
    together = summary([a + b for a, b in zip(*terms, strict=True)])
    assert_matches(pool([decoding_dynamics(g, layer) for g in generations]), together)


def hand_built(cells, masked, commit) -> Generation:
    """One row from per-step, per-position lists of (feature, activation), strongest first, padded
    to 3 slots with feature 1 at activation 0 (which must not count as feature 1)."""
    slots = [[c + [(1, 0.0)] * (3 - len(c)) for c in step] for step in cells]
    trace = LayerTrace(
        top_acts=torch.tensor([[[[a for _, a in c] for c in step]] for step in slots]),
        top_indices=torch.tensor([[[[f for f, _ in c] for c in step]] for step in slots]),
        watched=torch.zeros(len(cells), 1, len(cells[0]), 0),
    )
    timeline = Timeline(
        masked=torch.tensor(masked, dtype=torch.bool)[:, None],
        commit_step=torch.tensor([commit]),
        confidence=torch.full((1, len(commit)), math.nan),
        layers={0: trace},
        watch=(),
    )
    return Generation(torch.zeros(1, len(commit), dtype=torch.long), timeline)


def test_a_hand_built_timeline_gives_the_hand_computed_numbers():
    # position 0: prompt; 1: committed at step 0; 2: committed at the last step
    cells = [
        [[(7, 1.0)], [(2, 0.9), (1, 0.5)], [(5, 0.3)]],
        [[(8, 1.0)], [(2, 0.9), (1, 0.5), (3, 0.1)], [(6, 0.4), (5, 0.3)]],
        [[(9, 1.0)], [(4, 0.2)], [(6, 0.4), (5, 0.3)]],
    ]
    masked = [[0, 1, 1], [0, 0, 1], [0, 0, 1]]
    generation = hand_built(cells, masked, [-1, 0, 2])
    expected = dict(
        stable_masked=(1 / 2 + 1) / 2,  # position 2: {5} -> {5, 6} -> {5, 6}
        stable_committed=0.0,  # position 1: {1, 2, 3} -> {4}
        drift_after_commit=1.0,  # position 1: 1 - J({1, 2}, {4}); position 2 committed last
        top1_flip_rate=2 / 4,  # position 1: 2, 2, 4; position 2: 5, 6, 6
        masked_pairs=2,
        committed_pairs=1,
        committed_positions=1,
        pairs=4,
    )
    assert_matches(decoding_dynamics(generation, 0), expected)
    assert_matches(decoding_dynamics(generation, 0), summary(reference_terms(generation, 0)))


def test_nothing_firing_is_perfectly_stable():
    cells = [[[], [], []]] * 3
    generation = hand_built(cells, [[0, 1, 1], [0, 0, 1], [0, 0, 0]], [-1, 0, 1])
    assert tuple(decoding_dynamics(generation, 0)) == (1.0, 1.0, 0.0, 0.0, 1, 1, 2, 4)


def test_what_no_term_qualifies_for_is_nan():
    # a position masked at every step and never committed: masked pairs only
    cells = [[[], [(1, 0.5), (2, 0.2)]], [[], [(3, 0.6), (2, 0.1)]], [[], []]]
    never = decoding_dynamics(hand_built(cells, [[0, 1]] * 3, [-1, -1]), 0)
    assert never.stable_masked == pytest.approx((1 / 3 + 0) / 2) and never.top1_flip_rate == 1
    assert math.isnan(never.stable_committed) and math.isnan(never.drift_after_commit)
    assert (never.committed_pairs, never.committed_positions) == (0, 0)
    # one step: no pair at all; only a prompt: no counted position
    one = decoding_dynamics(hand_built(cells[:1], [[0, 1]], [-1, 0]), 0)
    prompt = decoding_dynamics(hand_built(cells, [[0, 0]] * 3, [-1, -1]), 0)
    for dynamics in (one, prompt):
        assert all(math.isnan(getattr(dynamics, m)) for m in METRICS)
        assert all(getattr(dynamics, c) == 0 for c in COUNTS)
    assert all(math.isnan(getattr(pool([one, prompt]), m)) for m in METRICS)


def test_a_layer_the_timeline_did_not_record_is_named():
    generation = hand_built([[[]]], [[1]], [0])
    with pytest.raises(ValueError, match=r"recorded layers \[0\], not 4: decode with saes=\{4"):
        decoding_dynamics(generation, 4)


def test_order_command_writes_what_the_library_computes(trained_suite, suite, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    args = ["--gen-length", "8", "--steps", "4", "--block-length", "4", "--seed", "5"]
    out = tmp_path / "out"
    command = ["analyze", "order", str(trained_suite), "--prompts", str(prompts), "--out", str(out)]
    assert main([*command, *args, "--device", "cpu"]) == 0
    data = json.loads((out / "order.json").read_text())
    table = (out / "order.md").read_text()
    assert (out / "order.png").read_bytes()[:4] == b"\x89PNG"
    layer, sae = suite.info.default_layer, suite.saes[suite.info.default_layer]
    assert (data["layer"], data["top"], data["block_length"]) == (layer, sae.k, 4)
    assert sorted(data["samplers"]) == sorted(SAMPLERS)
    ids = prompt_ids(suite.base, PROMPTS[0])
    for sampler, row in data["samplers"].items():
        generation = decode(suite.base, sampler, ids, 8, 4, 4, {layer: sae}, sae.k, 5)
        expected = decoding_dynamics(generation, layer)._asdict()
        new = generation.timeline.commit_step[0] >= 0
        expected["log_likelihood"] = masked_log_likelihood(
            suite.base, generation.tokens[0], new, seed=5
        )
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, nan_ok=True), (sampler, name)
        assert row["outputs"] == [suite.base.tokenizer.decode(generation.tokens[0, new])]
        cells = [
            f"{row[m]:.3f}" if row[m] is not None else "n/a" for m in (*METRICS, "log_likelihood")
        ]
        assert f"| {sampler} | " + " | ".join(cells) + " |" in table
    assert table in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--steps", "9", "--gen-length", "8"], r"--steps 9 with --gen-length 8: give 1 <= steps"),
        (["--layer", "2"], r"--layer 2: the suite has SAEs on layers \[1, 3\]"),
        (["--block-length", "5", "--gen-length", "8", "--steps", "4"], "multiple of block_length"),
    ],
)
def test_order_command_names_bad_numbers(trained_suite, tmp_path, capsys, args, error):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "analyze",
                "order",
                str(trained_suite),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                *args,
            ]
        )
        == 1
    )
    assert re.search(error, capsys.readouterr().err)
    assert not out.exists()


def test_order_command_refuses_an_autoregressive_suite_by_name(tmp_path, capsys):
    model = write_tiny_qwen2(tmp_path / "qwen")
    saes = {(1, 4): TopKSAE(32, 64, 4, layer=1)}
    save_suite(tmp_path / "suite", saes, {}, SuiteInfo(str(model), "clean", [1], [4], 32, 64))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\n")
    command = ["analyze", "order", str(tmp_path / "suite"), "--prompts", str(prompts)]
    assert main([*command, "--out", str(tmp_path / "out")]) == 1
    assert "is autoregressive (family ar)" in capsys.readouterr().err

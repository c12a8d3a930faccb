"""LLaDA decoding on a tiny random LLaDA: each rule of the official sampler, token for token
against a plain transcription of it, the timeline and scheduled steering."""

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hub_sae.diffusion import (
    Steer,
    add_gumbel_noise,
    diffusion_generate,
    feature_acts,
    feature_onsets,
    generate,
    masked_log_likelihood,
    num_transfer_tokens,
    steer_residual,
    timeline_records,
    vocab_limit,
)
from hub_sae.models import BaseModel, load_base_model
from hub_sae.models.llada import save_llada_model
from hub_sae.sae import TopKSAE
from tests.test_llada import tiny_model

WORDS = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog"]
LLADA_MASK = "<|mdm_mask|>"
MASK = 299


def save_llada_tokenizer(path: Path) -> None:
    """A word-level tokenizer with LLaDA's special tokens; the mask is id 299 as in tiny_model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {LLADA_MASK: MASK}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=WORDS[0], eos_token=WORDS[1], mask_token=LLADA_MASK
    ).save_pretrained(path)


def tiny_llada(path: Path) -> BaseModel:
    """The tiny random LLaDA of tests/test_llada.py with the word-level tokenizer, in float32."""
    save_llada_model(tiny_model(), path)
    save_llada_tokenizer(path)
    return load_base_model(str(path), dtype=torch.float32)


def tiny_saes() -> dict[int, TopKSAE]:
    """Random SAEs (d_sae 128, k 8) on layers 1 and 2 of the tiny LLaDA."""
    torch.manual_seed(0)
    return {
        layer: TopKSAE(64, 128, 8, layer=layer).eval().requires_grad_(False) for layer in (1, 2)
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> BaseModel:
    return tiny_llada(tmp_path_factory.mktemp("llada"))


@pytest.fixture(scope="module")
def saes() -> dict[int, TopKSAE]:
    return tiny_saes()


def prompts(batch: int = 2, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_generate(model, prompt, attention_mask, steps, gen_length, block_length, cfg_scale):
    """LLaDA's official generate() at temperature 0 with low-confidence remasking, transcribed."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), MASK, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(prompt.shape[0], gen_length)], -1)
    prompt_index = x != MASK
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, start : start + block_length] == MASK
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        num_transfer = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
        for i in range(mask_num.size(0)):
            num_transfer[i, : mask_num[i] % steps] += 1
        for i in range(steps):
            mask_index = x == MASK
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = MASK
                both = None if attention_mask is None else torch.cat([attention_mask] * 2)
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x]), both), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask)
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, start + block_length :] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


def banned_model(base: BaseModel):
    """The tiny LLaDA's logits with the ids hub-sae never commits far below the others (finite,
    so that guidance's difference of two passes stays a number)."""

    def model(x, attention_mask=None):
        logits = base.run(x, attention_mask).float()
        logits[..., vocab_limit(base) :] = -1e30
        logits[..., MASK] = -1e30
        return logits

    return model


@pytest.mark.parametrize(
    "steps, gen_length, block_length, cfg_scale",
    [(8, 8, 8, 0.0), (9, 12, 4, 0.0), (6, 6, 6, 1.5), (4, 8, 2, 0.7), (5, 5, 5, 0.0)],
)
def test_generate_matches_the_reference_token_for_token(
    base, steps, gen_length, block_length, cfg_scale
):
    prompt = prompts()
    with torch.no_grad():
        expected = reference_generate(
            banned_model(base), prompt, None, steps, gen_length, block_length, cfg_scale
        )
    out = generate(base, prompt, steps, gen_length, block_length, cfg_scale=cfg_scale)
    assert out.tokens.shape == (2, 5 + gen_length)
    assert torch.equal(out.tokens, expected)


def test_padded_batch_matches_the_reference_with_its_attention_mask(base):
    prompt = prompts()
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :2] = 0
    prompt[1, :2] = base.eos_token_id
    with torch.no_grad():
        expected = reference_generate(banned_model(base), prompt, attention_mask, 4, 8, 4, 0.0)
    out = generate(base, prompt, 4, 8, 4, attention_mask=attention_mask)
    assert torch.equal(out.tokens, expected)
    unmasked = generate(base, prompt, 4, 8, 4)
    assert not torch.equal(unmasked.tokens[1], out.tokens[1])


def test_transfer_counts_spread_each_blocks_masks_over_its_steps():
    masked = torch.zeros(2, 10, dtype=torch.bool)
    masked[0, :] = True
    masked[1, :3] = True
    assert num_transfer_tokens(masked, 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_blocks_decode_left_to_right_with_the_schedule(base):
    out = generate(base, prompts(), steps=6, gen_length=12, block_length=4)
    commit = out.timeline.commit_step[:, 5:]
    assert (commit[:, :4] < 2).all() and ((commit[:, 4:8] >= 2) & (commit[:, 4:8] < 4)).all()
    assert (commit[:, 8:] >= 4).all() and (out.timeline.commit_step[:, :5] == -1).all()
    per_step = [Counter(row.tolist()) for row in commit]
    assert all([c[s] for s in range(6)] == [2] * 6 for c in per_step)
    masked = out.timeline.masked[:, :, 5:]
    steps = torch.arange(6)[:, None, None]
    assert torch.equal(masked, steps <= commit[None])


def test_never_commits_the_mask_token_or_ids_beyond_the_tokenizer(base):
    prompt = prompts(4, 6, seed=3)
    with torch.no_grad():
        raw = base.run(torch.cat([prompt, torch.full((4, 10), MASK)], 1)).argmax(-1)
    assert ((raw == MASK) | (raw >= vocab_limit(base))).any()  # the raw model would
    tokens = generate(base, prompt, 10, 10, 10).tokens
    assert not ((tokens == MASK) | (tokens >= vocab_limit(base))).any()


def test_gumbel_noise_samples_the_tempered_softmax_in_float64():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).expand(40_000, 4)
    noisy = add_gumbel_noise(logits, 0.5, torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.float64 and add_gumbel_noise(logits, 0.0, None) is logits
    freq = torch.bincount(noisy.argmax(-1), minlength=4) / len(logits)
    assert torch.allclose(freq, F.softmax(logits[0] / 0.5, -1), atol=0.01)


def test_temperature_and_random_remasking_follow_the_generator(base):
    def run(seed, **kw):
        return generate(
            base, prompts(), 4, 8, 8, generator=torch.Generator().manual_seed(seed), **kw
        )

    greedy = generate(base, prompts(), 4, 8, 8)
    hot = run(0, temperature=1.0)
    assert torch.equal(hot.tokens, run(0, temperature=1.0).tokens)
    assert not torch.equal(hot.tokens, greedy.tokens)
    rand = run(1, remasking="random")
    assert not torch.equal(rand.timeline.commit_step, greedy.timeline.commit_step)
    assert (rand.timeline.masked.sum((1, 2)) == torch.tensor([16, 12, 8, 4])).all()


def test_eos_options(base):
    plain = generate(base, prompts(), 4, 8, 8)
    common = Counter(plain.tokens[:, 5:].flatten().tolist()).most_common(1)[0][0]
    eos_base = dataclasses.replace(base, eos_token_id=common)
    banned = generate(eos_base, prompts(), 4, 8, 8, logits_eos_inf=True).tokens
    assert not (banned[:, 5:] == common).any()
    last = generate(eos_base, prompts(), 4, 8, 8, confidence_eos_eot_inf=True)
    is_eos = plain.tokens == common
    assert (plain.timeline.confidence[is_eos] > 0).all()
    is_eos = last.tokens == common
    assert is_eos.any() and (last.timeline.confidence[is_eos] == -1e9).all()


def test_bad_shapes_name_the_fix(base):
    with pytest.raises(ValueError, match="multiple of block_length"):
        generate(base, prompts(), 4, 10, 4)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        generate(base, prompts(), 3, 8, 4)
    with pytest.raises(ValueError, match="has no SAE in `saes`"):
        generate(base, prompts(), 4, 8, 8, steering=[Steer(1, (3,), 5.0)])
    with pytest.raises(ValueError, match="window"):
        Steer(1, (3,), 5.0, window=(0.5, 0.5))


def test_infilling_decodes_the_prompts_own_masks(base):
    prompt = prompts(1, 8)
    prompt[0, [2, 5, 6]] = MASK
    out = generate(base, prompt, steps=3, gen_length=0)
    assert out.tokens.shape == (1, 8) and not (out.tokens == MASK).any()
    assert sorted(out.timeline.commit_step[0, [2, 5, 6]].tolist()) == [0, 1, 2]


def test_timeline_records_top_features_every_step_and_exports(base, saes):
    out = generate(base, prompts(1), 4, 8, 4, saes=saes, top=3)
    trace = out.timeline.layers[1]
    assert trace.top_acts.shape == (4, 1, 13, 3) and trace.top_indices.shape == (4, 1, 13, 3)
    assert (trace.top_acts[..., :-1] >= trace.top_acts[..., 1:]).all()
    records = json.loads(json.dumps(timeline_records(out, str)))
    assert records["steps"] == 4 and len(records["top_features"]["2"][0]) == 13
    assert records["commit_step"][:5] == [-1] * 5 and records["confidence"][0] is None
    onsets = feature_onsets(out.timeline, out.tokens, 1)
    assert onsets[0].step == 0 and len({o.feature for o in onsets}) == len(onsets)
    fired = set(trace.top_indices[trace.top_acts > 0].tolist())
    assert {o.feature for o in onsets} == fired
    generated = set(out.tokens[0, 5:].tolist())
    assert all(set(o.preceded) <= generated for o in onsets)


def test_clamping_a_feature_to_its_own_value_changes_nothing(saes):
    sae = saes[1]
    h = torch.randn(6, 64)
    acts, indices = sae.encode(h)
    feature = int(indices[0, 0])
    own = Steer(1, (feature,), float(acts[0, 0]), positions="all")
    assert torch.allclose(steer_residual(sae, h[:1], own), h[:1], atol=1e-5)
    shifted = steer_residual(sae, h, Steer(1, (feature,), 2.0, mode="add"))
    assert torch.allclose(shifted - h, 2.0 * sae.W_dec[feature].expand(6, 64), atol=1e-5)


def test_top_positions_rank_each_row_also_under_guidance(base, saes):
    sae, h = saes[1], torch.randn(4, 13, 64, generator=torch.Generator().manual_seed(1))
    feature = int(sae.encode(h)[1].flatten().mode().values)
    steer = Steer(1, (feature,), 3.0, "relative", positions="top", top_positions=3)
    where = steer.where(sae, h, prompts(2, 13), MASK)  # guidance: 2 rows of tokens, 4 of h
    acts = feature_acts(sae, h.flatten(0, 1), (feature,)).view(4, 13)
    for row in range(4):
        ranked = sorted(range(13), key=lambda p: (-acts[row, p], p))[:3]
        assert where[row].nonzero().flatten().tolist() == sorted(p for p in ranked if acts[row, p])
    plain = generate(base, prompts(1), 4, 8, 8, cfg_scale=1.0)
    guided = generate(base, prompts(1), 4, 8, 8, cfg_scale=1.0, saes=saes, steering=[steer])
    assert guided.tokens.shape == plain.tokens.shape and not (guided.tokens == MASK).any()


def test_steering_window_and_positions(base, saes):
    prompt = prompts(1)
    plain = generate(base, prompt, 4, 8, 8, saes=saes)
    steer = Steer(1, (5,), 50.0, window=(0.5, 1.0), positions=(7,))
    late = generate(base, prompt, 4, 8, 8, saes=saes, steering=[steer])
    assert late.timeline.watch == (5,)
    watched = late.timeline.layers[1].watched[..., 0]  # [steps, 1, T]
    plain_acts = plain.timeline.layers[1]
    early = (plain.timeline.commit_step[0] >= 0) & (plain.timeline.commit_step[0] < 2)
    assert torch.equal(late.timeline.commit_step[0, early], plain.timeline.commit_step[0, early])
    assert torch.equal(late.tokens[0, early], plain.tokens[0, early])
    assert torch.equal(late.timeline.layers[1].top_acts[:2], plain_acts.top_acts[:2])
    assert (watched[2:, 0, 7] > watched[:2, 0, 7]).all()
    others = [p for p in range(13) if p != 7]
    assert torch.equal(
        late.timeline.layers[1].top_acts[2, 0, others], plain_acts.top_acts[2, 0, others]
    )


def test_a_large_clamp_at_the_last_block_steers_every_masked_token(base, saes):
    sae = saes[2]
    head = base.model.model.transformer
    lens = head.ff_out(head.ln_f(sae.W_dec[5][None].float()))[0]
    lens[MASK] = lens[vocab_limit(base) :] = -float("inf")
    steer = Steer(2, (5,), 1e4)
    out = generate(base, prompts(1), 4, 8, 8, saes=saes, steering=[steer])
    assert (out.tokens[0, 5:] == lens.argmax()).all()
    plain = generate(base, prompts(1), 4, 8, 8)
    own = masked_log_likelihood(base, plain.tokens[0], torch.arange(13) >= 5)
    steered = masked_log_likelihood(base, out.tokens[0], torch.arange(13) >= 5)
    assert own > steered


def test_prompt_masks_are_decoded_with_the_first_block(base):
    prompt = prompts(2, 8)
    prompt[:, [2, 5]] = MASK
    prompt[1, 6] = MASK
    out = generate(base, prompt, steps=6, gen_length=12, block_length=4)
    assert not (out.tokens == MASK).any()
    commit = out.timeline.commit_step
    assert (commit[:, [2, 5]] < 2).all() and (commit[1, 6] < 2) and (commit[:, [2, 5]] >= 0).all()
    assert ((commit[:, 12:16] >= 2) & (commit[:, 12:16] < 4)).all() and (commit[:, 16:] >= 4).all()
    first = [Counter(row.tolist()) for row in commit]
    assert [first[0][0], first[0][1], first[1][0], first[1][1]] == [3, 3, 4, 3]


def test_steer_feature_ids_must_be_whole_numbers_of_the_sae(base, saes):
    with pytest.raises(ValueError, match="Steer feature id must be a whole number >= 0; got -1"):
        Steer(1, (-1,), 1.0)
    with pytest.raises(ValueError, match="Steer feature id must be a whole number >= 0; got 3.0"):
        Steer(1, (3.0,), 1.0)
    with pytest.raises(ValueError, match="Steer feature id must be a whole number >= 0; got True"):
        Steer(1, (True,), 1.0)
    with pytest.raises(ValueError, match="Steer feature ids must be a sequence"):
        Steer(1, 3, 1.0)
    with pytest.raises(ValueError, match="Steer position must be a whole number >= 0; got -2"):
        Steer(1, (3,), 1.0, positions=(-2,))
    assert Steer(1, (torch.tensor(3), 4), 1.0).features == (3, 4)
    out_of_range = (
        r"Steer feature id\(s\) \[128\] are out of range for the layer-1 SAE, which has 128"
    )
    for decode in (generate, lambda *a, **kw: diffusion_generate(*a[:1], prompts(), 8, 4, **kw)):
        with pytest.raises(ValueError, match=out_of_range):
            decode(base, prompts(), 4, 8, 8, saes=saes, steering=[Steer(1, (5, 128), 1.0)])
        with pytest.raises(ValueError, match=r"watch feature id\(s\) \[999\]"):
            decode(base, prompts(), 4, 8, 8, saes=saes, watch=[999])
        with pytest.raises(ValueError, match=r"window \(0.3, 0.45\) holds none of the 4 steps"):
            decode(
                base,
                prompts(),
                4,
                8,
                8,
                saes=saes,
                steering=[Steer(1, (5,), 1.0, window=(0.3, 0.45))],
            )
    with pytest.raises(ValueError, match="out of range"):
        steer_residual(saes[1], torch.randn(2, 64), Steer(1, (500,), 1.0))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number >= 0"),
        (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number >= 0"),
        (dict(steps=0), "steps must be a whole number >= 1"),
        (dict(steps=0, gen_length=0), "steps must be a whole number >= 1"),
        (dict(gen_length=-8, block_length=8), "gen_length must be a whole number >= 0"),
        (dict(gen_length=8.0), "gen_length must be a whole number"),
        (dict(prompt_ids=prompts(2, 60)), "68 exceed the model's maximum context of 64 tokens"),
        (dict(attention_mask=torch.ones(2, 3)), r"attention_mask has shape \(2, 3\)"),
        (dict(prompt_ids=prompts()[0]), r"\[batch, length\] tensor of token ids"),
    ],
)
def test_bad_numbers_name_the_problem(base, options, message):
    args = dict(prompt_ids=prompts(), steps=4, gen_length=8, block_length=8) | options
    with pytest.raises(ValueError, match=message):
        generate(base, **args)


def test_samplers_refuse_saes_off_the_block_output(base):
    mlp = TopKSAE(64, 128, 8, layer=1, hookpoint="layers.1.mlp")
    with pytest.raises(ValueError, match=r"reads 'layers.1.mlp' of block 1.*resid_post"):
        generate(base, prompts(), steps=2, gen_length=2, block_length=2, saes={1: mlp})
    with pytest.raises(ValueError, match=r"saes\[2\] is an SAE of layer 1"):
        diffusion_generate(base, prompts(), 2, 2, saes={2: tiny_saes()[1]})

"""Dream's sampler on tiny random models (the tiny LLaDA read as a shifted family, a native Dream
checkpoint): token for token against a plain transcription of the official `_sample`, every alg,
greedy and sampled; the logits' shift taken from the base model (shifted, unshifted, a real masked
LM); recording and steering as `generate`; bad numbers."""

import dataclasses
import math

import pytest
import torch
import torch.distributions as dists
import torch.nn.functional as F
from torch import nn

from hub_sae.diffusion import (
    Steer,
    diffusion_generate,
    generate,
    masked_log_likelihood,
    vocab_limit,
)
from hub_sae.models import BaseModel, load_base_model
from hub_sae.models.unmasking import with_unmasking_head
from hub_sae.sae import TopKSAE
from tests.checkpoints import write_tiny_dream
from tests.test_diffusion import MASK, prompts, tiny_llada, tiny_saes


@pytest.fixture(scope="module")
def llada(tmp_path_factory) -> BaseModel:
    return tiny_llada(tmp_path_factory.mktemp("llada"))


@pytest.fixture(scope="module")
def dream(llada) -> BaseModel:
    """The tiny LLaDA read as a shifted family: position i's logits predict token i + 1."""
    return dataclasses.replace(llada, family="dream")


@pytest.fixture(scope="module")
def saes() -> dict[int, TopKSAE]:
    return tiny_saes()


# ---- Dream's generation_utils.py, transcribed (sample_tokens and _sample) ----------------------


def ref_top_p_logits(logits, top_p):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def ref_top_k_logits(logits, top_k):
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def ref_sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin=False, entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = ref_top_p_logits(logits, top_p)
    if top_k is not None:
        logits = ref_top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:  # the reference wraps this in a bare try/except (argmax fallback)
        x0 = dists.Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def reference_sample(
    model, input_ids, attention_mask, max_length, steps, alg, alg_temp, temperature, top_p, top_k,
    logits_hook, mask_id, eps=1e-3,
):  # fmt: skip
    """Dream's `_sample` with the global RNG; `logits_hook` is its generation_logits_hook_func."""
    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_id)
    if attention_mask is not None:
        attention_mask = F.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x, attention_mask)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits = logits_hook(i, x, logits)
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_id
            transfer_index_t_s = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer_index_t_s] = ref_sample_tokens(
                mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k
            )
            x[mask_index] = x0.clone()
        else:
            confidence, x0 = ref_sample_tokens(
                mask_logits, temperature, top_p=top_p, top_k=top_k,
                margin=alg == "topk_margin", entropy=alg == "entropy",
            )  # fmt: skip
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = (
                int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            )
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = full_confidence / alg_temp
                    full_confidence = F.softmax(full_confidence, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, number_transfer_tokens)
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x


def raw_model(base: BaseModel):
    """The model's own, unshifted float logits."""
    return lambda x, attention_mask=None: base.run(x, attention_mask).float()


def ban(base: BaseModel):
    """hub-sae's one deliberate difference, as a logits hook: never the mask id nor an id the
    tokenizer cannot write."""

    def hook(step, x, logits):
        logits[..., vocab_limit(base) :] = -torch.inf
        logits[..., base.mask_token_id] = -torch.inf
        return logits

    return hook


def reference(base, prompt, new, steps, seed, attention_mask=None, **options):
    options = {"alg": "origin", "alg_temp": None, "temperature": 0.0, "top_p": None,
               "top_k": None} | options  # fmt: skip
    torch.manual_seed(seed)
    with torch.no_grad():
        return reference_sample(
            raw_model(base), prompt.clone(), attention_mask, prompt.shape[1] + new, steps,
            logits_hook=ban(base), mask_id=base.mask_token_id, **options,
        )  # fmt: skip


ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
SETTINGS = [
    dict(),
    dict(alg_temp=0.5),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=0.8, alg_temp=0.3, top_k=20),
    dict(temperature=1.2, top_p=0.7, top_k=50, alg_temp=0.0),
]


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("options", SETTINGS, ids=lambda o: ",".join(o) or "greedy")
def test_matches_the_reference_sample_token_for_token(dream, alg, options):
    prompt = prompts()
    expected = reference(dream, prompt, 10, 6, seed=3, alg=alg, **options)
    out = diffusion_generate(
        dream, prompt, 10, 6, alg=alg, generator=torch.Generator().manual_seed(3), **options
    )
    assert out.tokens.shape == (2, 15) and not (out.tokens == MASK).any()
    assert torch.equal(out.tokens, expected)


def test_without_a_generator_the_global_rng_as_the_reference(dream):
    for options in (dict(temperature=0.9), dict(alg="maskgit_plus", alg_temp=0.4, temperature=1.0)):
        expected = reference(dream, prompts(), 10, 6, seed=4, **options)
        torch.manual_seed(4)
        assert torch.equal(diffusion_generate(dream, prompts(), 10, 6, **options).tokens, expected)


@pytest.mark.parametrize(
    "alg, new, steps",
    [("origin", 4, 9), ("maskgit_plus", 7, 1), ("topk_margin", 12, 5), ("entropy", 3, 3)],
)
def test_more_steps_than_tokens_one_step_and_uneven_schedules(dream, alg, new, steps):
    prompt = prompts(3, 4, seed=1)
    options = dict(temperature=0.9, alg_temp=0.7)
    expected = reference(dream, prompt, new, steps, seed=5, alg=alg, **options)
    gen = torch.Generator().manual_seed(5)
    out = diffusion_generate(dream, prompt, new, steps, alg=alg, generator=gen, **options)
    assert torch.equal(out.tokens, expected) and not (out.tokens == MASK).any()


def test_padded_batch_matches_the_reference_with_its_attention_mask(dream):
    prompt = prompts()
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :2] = 0
    prompt[1, :2] = dream.eos_token_id
    options = dict(alg="entropy", temperature=0.7, top_k=30)
    expected = reference(dream, prompt, 8, 4, 0, attention_mask=attention_mask, **options)
    gen = torch.Generator().manual_seed(0)
    out = diffusion_generate(
        dream, prompt, 8, 4, attention_mask=attention_mask, generator=gen, **options
    )
    assert torch.equal(out.tokens, expected)
    unmasked = diffusion_generate(
        dream, prompt, 8, 4, generator=torch.Generator().manual_seed(0), **options
    )
    assert not torch.equal(unmasked.tokens[1], out.tokens[1])


def test_the_seed_decides_sampled_tokens_and_positions(dream):
    def run(seed, **options):
        gen = torch.Generator().manual_seed(seed)
        return diffusion_generate(
            dream, prompts(), 10, 5, alg="maskgit_plus", generator=gen, **options
        )

    assert torch.equal(run(0, temperature=1.0).tokens, run(0, temperature=1.0).tokens)
    assert not torch.equal(run(0, temperature=1.0).tokens, run(1, temperature=1.0).tokens)
    greedy = run(0)
    assert torch.equal(greedy.tokens, run(1).tokens)  # greedy draws nothing
    positions = run(1, alg_temp=1.0)  # same tokens per position, another order
    assert not torch.equal(positions.timeline.commit_step, greedy.timeline.commit_step)


def test_unequal_mask_counts_decode_every_mask_and_keep_the_prompt(dream):
    """The reference's batch-averaged count re-masks prompt tokens or leaves masks; not here."""
    prompt = prompts(2, 8, seed=2)
    prompt[0, [2, 3, 5, 6]] = MASK
    broken = reference(dream, prompt, 2, 2, 0, alg="maskgit_plus")
    prompt_kept = (broken[:, :8] == prompt) | (prompt == MASK)
    assert (broken == MASK).any() or not prompt_kept.all()  # the reference's quirk
    for alg in ALGS:
        out = diffusion_generate(dream, prompt, 2, 2, alg=alg, alg_temp=0.5)
        assert not (out.tokens == MASK).any(), alg
        kept = prompt != MASK
        assert torch.equal(out.tokens[:, :8][kept], prompt[kept]), alg
        assert (out.timeline.commit_step[0, [2, 3, 5, 6]] >= 0).all()


def test_infilling_with_no_new_tokens_decodes_the_prompts_masks(dream):
    prompt = prompts(1, 8)
    prompt[0, [2, 5, 6]] = MASK
    out = diffusion_generate(dream, prompt, 0, 3, alg="topk_margin")
    assert out.tokens.shape == (1, 8) and not (out.tokens == MASK).any()
    assert torch.equal(out.tokens, reference(dream, prompt, 0, 3, 0, alg="topk_margin"))
    assert (out.timeline.commit_step[0, [2, 5, 6]] >= 0).all()


def test_a_tiny_native_dream_checkpoint_matches_the_reference(tmp_path):
    """The native Dream (unshifted logits, `family` "dream" from its config.json) through the
    sampler equals the reference, which shifts the model's own logits itself."""
    dream = load_base_model(str(write_tiny_dream(tmp_path)), dtype=torch.float32)
    assert dream.family == "dream" and dream.shifted
    prompt = torch.randint(4, 23, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :2] = 0
    prompt[1, :2] = dream.eos_token_id
    for alg, options, mask in [
        ("origin", dict(temperature=0.7), None),
        ("maskgit_plus", dict(temperature=1.0, top_k=5), attention_mask),
        ("topk_margin", dict(temperature=1.0, top_p=0.8, alg_temp=0.5), None),
        ("entropy", dict(), attention_mask),
    ]:
        expected = reference(dream, prompt, 8, 4, 2, attention_mask=mask, alg=alg, **options)
        gen = torch.Generator().manual_seed(2)
        out = diffusion_generate(
            dream, prompt, 8, 4, alg=alg, attention_mask=mask, generator=gen, **options
        )
        assert torch.equal(out.tokens, expected), alg
        assert not (out.tokens == dream.mask_token_id).any()


class Shifted(nn.Module):
    """A model whose logits are moved one position to the right as Dream's sampler does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def test_both_samplers_take_the_shift_from_the_base_model(llada, dream):
    """A shifted family decodes (and scores its decodes) as the unshifted family would on logits
    moved one to the right."""
    moved = dataclasses.replace(llada, model=Shifted(llada.model))
    prompt = prompts()
    for decode in (
        lambda model: generate(model, prompt, 4, 8, 4).tokens,
        lambda model: diffusion_generate(model, prompt, 8, 4, alg="maskgit_plus").tokens,
    ):
        assert torch.equal(decode(dream), decode(moved))
        assert not torch.equal(decode(dream), decode(llada))
    tokens, scored = prompts(1, 12)[0], torch.arange(12) >= 4
    fluency = {b.family: masked_log_likelihood(b, tokens, scored, draws=3) for b in (dream, llada)}
    assert fluency["dream"] == masked_log_likelihood(moved, tokens, scored, draws=3)
    assert fluency["dream"] != fluency["llada"]


@pytest.fixture(scope="module")
def minilm() -> BaseModel:
    return with_unmasking_head(load_base_model("minilm"))


def test_both_samplers_decode_an_unshifted_masked_lm(minilm):
    """On a masked LM (not shifted) one mask in one step is the model's own best token there;
    read as a shifted family it is the best token of the logits one position earlier."""
    prompt = minilm.tokenizer("def f(x): [MASK] x + 1", return_tensors="pt").input_ids
    at = int((prompt[0] == minilm.mask_token_id).nonzero())
    with torch.no_grad():
        logits = minilm.run(prompt)[0].float()
    logits[:, vocab_limit(minilm) :] = -math.inf
    logits[:, minilm.mask_token_id] = -math.inf
    for base, row in ((minilm, at), (dataclasses.replace(minilm, family="dream"), at - 1)):
        infilled = generate(base, prompt, steps=1, gen_length=0).tokens
        dreamed = diffusion_generate(base, prompt, 0, 1, alg="maskgit_plus").tokens
        assert int(infilled[0, at]) == int(dreamed[0, at]) == int(logits[row].argmax())
    assert logits[at].argmax() != logits[at - 1].argmax()
    out = diffusion_generate(minilm, prompt, 4, 4, alg="entropy", temperature=0.5, top_p=0.9)
    assert (
        out.tokens.shape == (1, prompt.shape[1] + 4)
        and not (out.tokens == minilm.mask_token_id).any()
    )


def test_timeline_and_steering_as_generate(dream, saes):
    plain = diffusion_generate(dream, prompts(1), 8, 4, alg="maskgit_plus", saes=saes, top=3)
    trace = plain.timeline.layers[1]
    assert trace.top_acts.shape == (4, 1, 13, 3)
    commit = plain.timeline.commit_step[0]
    assert (commit[:5] == -1).all() and (commit[5:] >= 0).all()
    assert torch.equal(
        plain.timeline.masked[:, 0, 5:], torch.arange(4)[:, None] <= commit[None, 5:]
    )
    sae = saes[2]
    head = dream.model.model.transformer
    lens = head.ff_out(head.ln_f(sae.W_dec[5][None].float()))[0]
    lens[MASK] = lens[vocab_limit(dream) :] = -math.inf
    steer = Steer(2, (5,), 1e4, positions="all")
    out = diffusion_generate(
        dream, prompts(1), 8, 4, alg="maskgit_plus", saes=saes, steering=[steer]
    )
    assert (out.tokens[0, 5:] == lens.argmax()).all() and out.timeline.watch == (5,)
    assert not (plain.tokens[0, 5:] == lens.argmax()).all()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(alg="greedy"), "alg 'greedy': choose one of origin"),
        (dict(steps=0), "steps must be a whole number >= 1"),
        (dict(steps=2.5), "steps must be a whole number"),
        (dict(max_new_tokens=-1), "max_new_tokens must be a whole number >= 0"),
        (dict(max_new_tokens=60), "exceed the model's maximum context of 64"),
        (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), r"top_p must be None or in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be None or in \(0, 1\]"),
        (dict(top_k=0), "top_k must be a whole number >= 1"),
        (dict(alg_temp=math.nan), "alg_temp must be None or a finite number >= 0"),
        (dict(alg_temp=-1.0), "alg_temp must be None or a finite number >= 0"),
        (dict(eps=0.0), r"eps must be in \(0, 1\)"),
        (dict(eps=1.0), r"eps must be in \(0, 1\)"),
        (dict(attention_mask=torch.ones(2, 4)), r"attention_mask has shape \(2, 4\)"),
        (dict(input_ids=torch.zeros(5, dtype=torch.long)), r"\[batch, length\] tensor"),
    ],
)
def test_bad_numbers_name_the_problem(dream, options, message):
    args = dict(input_ids=prompts(), max_new_tokens=8, steps=4) | options
    with pytest.raises(ValueError, match=message):
        diffusion_generate(dream, **args)

"""Families on tiny random checkpoints: masked LMs (mlm) and causal LMs (ar) through transformers,
the clean-only rule of ar, and the shift (`BaseModel.align`) in every cross entropy (ar, Dream)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hub_sae.activations import capture, harvest
from hub_sae.data import DataConfig, token_batches
from hub_sae.evaluate import (
    METRICS,
    evaluate_by_t,
    evaluate_saved_suite,
    evaluate_suite,
    masked_lm_loss,
    next_token_loss,
    predictions,
    unmasked_lm_loss,
)
from hub_sae.masking import CorruptedBatch, Corruption, check_policy, corrupt
from hub_sae.models import BaseModel, family, load_base_model
from hub_sae.models.hf import load_hf
from hub_sae.sae import TopKSAE
from hub_sae.suite import SuiteInfo, save_suite
from hub_sae.training.plan import model_shape
from tests.checkpoints import (
    DREAM_SPECIAL,
    DREAM_WORDS,
    TINY_LAYERS,
    write_tiny_bert,
    write_tiny_dream,
    write_tiny_modernbert,
    write_tiny_qwen2,
)

DATA = DataConfig(split="heldout", ctx_len=32, batch_size=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "bert": write_tiny_bert(root / "bert"),
        "modernbert": write_tiny_modernbert(root / "modernbert"),
        "qwen2": write_tiny_qwen2(root / "qwen2"),
    }


@pytest.fixture(scope="module")
def qwen(folders) -> BaseModel:
    return load_base_model(str(folders["qwen2"]))


def text_batch(base: BaseModel) -> tuple[torch.Tensor, torch.Tensor]:
    return next(token_batches(DATA, base.tokenizer, base.bos_token_id, base.eos_token_id))


@pytest.mark.parametrize("name", ["bert", "modernbert"])
def test_masked_lms_load_as_mlm_with_their_head(folders, name):
    base = load_base_model(str(folders[name]))
    mask = base.tokenizer.mask_token_id
    assert family(str(folders[name])) == base.family == "mlm" and not base.shifted
    assert base.has_lm_head and base.n_layers == TINY_LAYERS and base.mask_token_id == mask
    ids, attention_mask = text_batch(base)
    assert (ids[:, 0] == base.bos_token_id).all() and base.bos_token_id != mask
    logits = base.run(ids, attention_mask)
    assert logits.shape == (*ids.shape, base.model.config.vocab_size)
    assert predictions(base, ids, attention_mask).equal(logits)  # unshifted: as the model says


def test_causal_lm_loads_as_ar_without_a_mask_token(folders, qwen):
    """Qwen2.5-like tokenizer: no BOS, no mask; packed contexts start with <|endoftext|>."""
    eos = qwen.tokenizer.eos_token_id
    assert family(str(folders["qwen2"])) == qwen.family == "ar" and qwen.shifted
    assert qwen.mask_token_id is None and qwen.bos_token_id == qwen.eos_token_id == eos
    assert qwen.has_lm_head and qwen.n_layers == TINY_LAYERS and qwen.d_model == 32
    ids, attention_mask = text_batch(qwen)
    assert (ids[:, 0] == eos).all() and attention_mask.all()
    # the plan counts the causal LM with its head, as loaded
    assert model_shape(str(folders["qwen2"])).params == sum(
        p.numel() for p in qwen.model.parameters()
    )


def test_remote_code_is_refused_without_a_prompt(folders, tmp_path):
    """A config that asks for code from a hub repo is an error, never transformers' [y/N]."""
    folder = tmp_path / "remote"
    folder.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (folder / file).write_bytes((folders["modernbert"] / file).read_bytes())
    config = {
        "model_type": "mystery",
        "architectures": ["MysteryForMaskedLM"],
        "auto_map": {"AutoModelForMaskedLM": "modeling_mystery.MysteryForMaskedLM"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="custom code|mystery"):
        load_hf(str(folder))


def test_llada_and_dream_folders_are_not_loaded_by_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "Dream"}))
    with pytest.raises(ValueError, match="dream model: hub-sae runs it with its own code"):
        load_hf(str(tmp_path))


def test_ar_runs_only_the_clean_policy(qwen):
    ids, attention_mask = text_batch(qwen)
    for policy in ("mask", "unmask", "all"):
        with pytest.raises(ValueError, match=f"policy '{policy}'.*never trained on masked inputs"):
            check_policy(policy, qwen.family)
        with pytest.raises(ValueError, match="needs a mask token.*use policy 'clean'"):
            harvest(qwen, ids, attention_mask, [1], policy)
    assert check_policy("clean", "ar") == "clean" and check_policy("mask", "mlm") == "mask"
    clean = harvest(qwen, ids, attention_mask, [1], "clean")
    assert len(clean.token_ids) == ids.numel() - len(ids)  # every real token but position 0


def test_next_token_loss_is_the_causal_lms_own_loss(qwen):
    """Token j scored by the logits at j - 1: the same number as transformers' shifted loss."""
    ids, attention_mask = text_batch(qwen)
    batch = corrupt(ids, attention_mask, qwen.mask_token_id, "clean")
    logits = predictions(qwen, ids, attention_mask)
    raw = qwen.run(ids, attention_mask)
    assert logits[:, 1:].equal(raw[:, :-1])
    reference = qwen.model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
    torch.testing.assert_close(next_token_loss(logits, ids, batch), reference)


@pytest.fixture(scope="module")
def dream(tmp_path_factory) -> BaseModel:
    return load_base_model(str(write_tiny_dream(tmp_path_factory.mktemp("dream"))), torch.float32)


def dream_batch(dream: BaseModel, p: float) -> tuple[torch.Tensor, torch.Tensor, CorruptedBatch]:
    """Random real words (ids after the specials and [UNK]) behind BOS, masked with rate p."""
    first = len(DREAM_SPECIAL) + 1
    ids = torch.randint(
        first, len(DREAM_WORDS), (2, 16), generator=torch.Generator().manual_seed(0)
    )
    ids[:, 0] = dream.bos_token_id
    attention_mask = torch.ones_like(ids)
    generator = torch.Generator().manual_seed(1)
    corruption = Corruption(t_min=p, t_max=p)
    batch = corrupt(ids, attention_mask, dream.mask_token_id, "mask", corruption, generator)
    assert batch.is_masked.any() and (~batch.is_masked[:, 1:]).any()
    return ids, attention_mask, batch


def test_masked_losses_of_dream_score_token_j_with_the_logits_at_j_minus_1(dream):
    assert dream.family == "dream" and dream.shifted
    ids, attention_mask, batch = dream_batch(dream, 0.3)
    raw = dream.run(batch.input_ids, attention_mask)
    ce = F.cross_entropy(raw[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    ce = ce.view(len(ids), -1)  # ce[:, j - 1] scores token j
    masked, visible = batch.is_masked[:, 1:], ~batch.is_masked[:, 1:]
    logits = predictions(dream, batch.input_ids, attention_mask)
    expected = (ce * masked).sum() / 0.3 / ids.numel()
    torch.testing.assert_close(masked_lm_loss(logits, ids, batch), expected)
    expected = (ce * visible).sum() / 0.7 / ids.numel()
    torch.testing.assert_close(unmasked_lm_loss(logits, ids, batch), expected)


def test_mask_policy_of_dream_keeps_the_masked_tokens_own_index(dream):
    """DLM-Scope's Dream buffer: the activation at the mask token itself, not the one before."""
    ids, attention_mask, _ = dream_batch(dream, 0.3)
    h = harvest(dream, ids, attention_mask, [1], "mask", Corruption(t_min=0.3, t_max=0.3))
    b, t = h.positions.T
    assert (h.batch.input_ids[b, t] == dream.mask_token_id).all() and h.token_ids.equal(ids[b, t])
    full = capture(dream, h.batch.input_ids, attention_mask, [1])[1]
    assert h.acts[1].equal(full[b, t])


def sae_for(base: BaseModel, layer: int, policy: str) -> TopKSAE:
    torch.manual_seed(layer)
    return TopKSAE(
        d_in=base.d_model, d_sae=64, k=4, layer=layer, base_model=base.name, policy=policy
    )


def test_ar_evaluation_uses_next_token_cross_entropy(qwen):
    saes = {(layer, 4): sae_for(qwen, layer, "clean") for layer in (1, 2)}
    metrics = evaluate_suite(
        qwen, saes, "clean", Corruption(), DATA, 128, splice_batches=1, progress=False
    )
    ids, attention_mask = text_batch(qwen)  # the one spliced batch: the first held-out one
    own = qwen.model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
    keys = {m.key for m in METRICS}
    for values in metrics.values():
        assert {"next_token_delta_ce", "next_token_loss_recovered"} <= keys & values.keys()
        assert values["next_token_ce_clean"] == pytest.approx(float(own), rel=1e-5)
        assert values["next_token_ce_spliced"] != values["next_token_ce_clean"]
        assert values["next_token_delta_ce"] == pytest.approx(
            values["next_token_ce_spliced"] - values["next_token_ce_clean"]
        )
        assert not any(k.startswith(("policy_splice", "dlm_scope")) for k in values)
        assert "by_t" not in values
    with pytest.raises(ValueError, match="policy 'mask'.*autoregressive"):
        evaluate_suite(qwen, saes, "mask", Corruption(), DATA, 128, progress=False)
    with pytest.raises(ValueError, match="autoregressive.*by_t_batches=0"):
        evaluate_by_t(qwen, saes, DATA)


def test_eval_of_a_saved_ar_suite_with_a_mask_policy_is_refused(folders, qwen, tmp_path):
    name = str(folders["qwen2"])
    saes = {(1, 4): sae_for(qwen, 1, "mask")}
    save_suite(tmp_path / "s", saes, {}, SuiteInfo(name, "mask", [1], [4], 32, 64))
    with pytest.raises(ValueError, match="policy 'mask'.*never trained on masked inputs"):
        evaluate_saved_suite(tmp_path / "s")
    assert not (tmp_path / "s" / "metrics.json").exists()


def test_samplers_refuse_a_model_without_a_mask_token(qwen):
    from hub_sae.diffusion import diffusion_generate, generate

    ids, _ = text_batch(qwen)
    with pytest.raises(ValueError, match="no mask token, so there is nothing to denoise"):
        generate(qwen, ids[:, :4], steps=2, gen_length=2, block_length=2)
    with pytest.raises(ValueError, match="no mask token, so there is nothing to denoise"):
        diffusion_generate(qwen, ids[:, :4], max_new_tokens=2, steps=2)


def test_plan_knows_qwen2_5_7b_without_its_config():
    """transformers' Qwen2ForCausalLM on `meta` counts the published 7.62B parameters, as many as
    the native Dream of the same shape."""
    assert model_shape("Qwen/Qwen2.5-7B") == (7_615_616_512, 3584, 28, 18944)
    assert model_shape("Qwen/Qwen2.5-7B") == model_shape("Dream-org/Dream-v0-Base-7B")

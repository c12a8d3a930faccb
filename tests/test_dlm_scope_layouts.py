"""The five DLM-Scope release repos (DESIGN.md) load by layer and k with their base model, policy
and family; the autoregressive baseline's SAEs are clean-policy SAEs."""

from pathlib import Path

import pytest

from hub_sae import TopKSAE
from hub_sae.models import family
from tests.test_formats import assert_same_math, raw_weights, write_dictionary_learning

LLADA, DREAM, QWEN = "GSAI-ML/LLaDA-8B-Base", "Dream-org/Dream-v0-Base-7B", "Qwen/Qwen2.5-7B"
RELEASE = {  # repo: (folder of the SAEs, base model, dlm_mask_policy in the buffer, expected policy)
    "llada-mask-topk-sae": ("", LLADA, "mask", "mask"),
    "llada-unmask-topk-sae": ("", LLADA, "unmask", "unmask"),
    "dlm-mask-topk-sae": ("saes_mask_Dream-org_Dream-v0-Base-7B_top_k", DREAM, "mask", "mask"),
    "dlm-unmask-topk-sae": (
        "saes_unmask_Dream-org_Dream-v0-Base-7B_top_k",
        DREAM,
        "unmask",
        "unmask",
    ),
    "qwen-topk-sae": ("saes__Qwen_Qwen2.5-7B_top_k", QWEN, "mask", "clean"),
}
FAMILY = {LLADA: "llada", DREAM: "dream", QWEN: "ar"}
LAYERS, KS = (1, 27), (50, 80)


def write_release(root: Path, run: str, lm_name: str, policy: str | None) -> dict:
    """A miniature of one repo: 2 layers x trainer_0, trainer_1 (k = 50, 80)."""
    weights = {}
    for layer in LAYERS:
        for i, k in enumerate(KS):
            weights[layer, k] = raw_weights(seed=layer * 10 + i)
            folder = root / run / f"resid_post_layer_{layer}" / f"trainer_{i}"
            write_dictionary_learning(folder, weights[layer, k], layer, k, policy, lm_name)
    return weights


@pytest.mark.parametrize("repo", sorted(RELEASE))
def test_each_release_repo_loads_with_its_layer_k_model_policy_and_family(tmp_path, repo):
    run, lm_name, buffer_policy, policy = RELEASE[repo]
    weights = write_release(tmp_path, run, lm_name, buffer_policy)
    for layer in LAYERS:
        for k in KS:
            sae = TopKSAE.from_pretrained(tmp_path, layer=layer, k=k)
            assert (sae.layer, sae.k, sae.base_model, sae.policy) == (layer, k, lm_name, policy)
            assert family(sae.base_model) == FAMILY[lm_name]
            assert_same_math(sae, weights[layer, k], k=k)


@pytest.mark.parametrize(
    ("run", "lm_name"),
    [
        ("saes__Qwen_Qwen2.5-7B_top_k", QWEN),  # no dlm_mask_policy in the buffer at all
        ("my_qwen_run", "Qwen/Qwen2.5-0.5B"),  # an autoregressive base model, any folder name
        ("saes__someone_tiny-causal_top_k", "someone/tiny-causal"),  # no policy in the name
    ],
)
def test_autoregressive_saes_are_clean_by_model_or_folder_name(tmp_path, run, lm_name):
    write_release(tmp_path, run, lm_name, None)
    assert TopKSAE.from_pretrained(tmp_path, layer=1, k=50).policy == "clean"


def test_a_masked_dlm_without_a_buffer_policy_stays_mask(tmp_path):
    write_release(tmp_path, "saes_mask_Dream-org_Dream-v0-Base-7B_top_k", DREAM, None)
    assert TopKSAE.from_pretrained(tmp_path, layer=27, k=80).policy == "mask"

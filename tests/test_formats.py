"""Every published layout, written on disk by the test, loads to the same math as the original."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub_sae import TopKSAE
from hub_sae.data import DataConfig
from hub_sae.evaluate import evaluate_suite
from hub_sae.features import collect_features
from hub_sae.formats import SAELoadError, layer_from_hookpoint
from hub_sae.masking import Corruption
from hub_sae.suite import SuiteInfo, save_suite

D_IN, D_SAE, K = 24, 96, 5
MISSING = object()


def raw_weights(seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
        "b_dec": torch.randn(d_in, generator=g) * 0.5,
    }


def original(
    w: dict[str, torch.Tensor], x: torch.Tensor, k: int = K
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published TopK math, written out densely: returns (dense latents, reconstruction)."""
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"])
    acts, idx = pre.topk(k)
    z = torch.zeros_like(pre).scatter(1, idx, acts)
    return z, z @ w["W_dec"] + w["b_dec"]


def assert_same_math(sae: TopKSAE, w: dict[str, torch.Tensor], k: int = K) -> None:
    x = torch.randn(64, w["W_enc"].shape[1]) * 2
    z, x_hat = original(w, x, k)
    acts, idx = sae.encode(x)
    torch.testing.assert_close(torch.zeros_like(z).scatter(1, idx, acts), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(acts, idx), x_hat, atol=1e-5, rtol=1e-5)


def write_dictionary_learning(
    folder: Path,
    w: dict,
    layer: int,
    k: int,
    policy: str | None = "mask",
    lm_name: str = "GSAI-ML/LLaDA-8B-Base",
) -> None:
    folder.mkdir(parents=True)
    d_sae, d_in = w["W_enc"].shape
    state = {
        "encoder.weight": w["W_enc"],
        "encoder.bias": w["b_enc"],
        "decoder.weight": w["W_dec"].T.contiguous(),
        "b_dec": w["b_dec"],
        "k": torch.tensor(k),
        "threshold": torch.tensor(-1.0),
    }
    torch.save(state, folder / "ae.pt")
    config = {
        "trainer": {
            "trainer_class": "TopKTrainer",
            "activation_dim": d_in,
            "dict_size": d_sae,
            "k": k,
            "layer": layer,
            "lm_name": lm_name,
            "lr": 3e-4,
        },
        "buffer": {"ctx_len": 2048, "dlm_t_min": 0.05, "dlm_t_max": 0.5},
    }
    if policy is not None:
        config["buffer"]["dlm_mask_policy"] = policy
    (folder / "config.json").write_text(json.dumps(config))


def dlm_scope_release(root: Path) -> dict:
    """A miniature of the DLM-Scope repo: 2 layers x 2 trainers (k = 5, 8)."""
    weights = {}
    base = root / "saes_mask_LLaDA-8B-Base_top_k"
    for layer in (1, 16):
        for i, k in enumerate((5, 8)):
            weights[layer, k] = raw_weights(seed=layer * 10 + i)
            write_dictionary_learning(
                base / f"resid_post_layer_{layer}" / f"trainer_{i}", weights[layer, k], layer, k
            )
    return weights


def test_round_trip_is_bit_exact(tmp_path):
    sae = TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K, layer=2, base_model="minilm", policy="unmask")
    sae.save_pretrained(tmp_path / "one")
    loaded = TopKSAE.from_pretrained(tmp_path / "one")
    assert (loaded.d_in, loaded.d_sae, loaded.k, loaded.layer, loaded.policy) == (
        D_IN,
        D_SAE,
        K,
        2,
        "unmask",
    )
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def make_suite(root: Path, layers=(1, 3, 5), default_layer=3) -> dict[int, TopKSAE]:
    saes = {}
    for layer in layers:
        torch.manual_seed(layer)
        saes[layer] = TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K, layer=layer, base_model="minilm")
    info = SuiteInfo("minilm", "mask", list(layers), [K], D_IN, D_SAE, default_layer=default_layer)
    save_suite(root, {(layer, K): sae for layer, sae in saes.items()}, {}, info)
    return saes


def test_suite_layout_default_and_chosen_layer(tmp_path):
    saes = make_suite(tmp_path)
    assert TopKSAE.from_pretrained(tmp_path).layer == 3
    five = TopKSAE.from_pretrained(tmp_path, layer=5)
    assert torch.equal(five.W_dec, saes[5].W_dec)
    suite = TopKSAE.load_suite(tmp_path)
    assert sorted(suite) == [1, 3, 5]
    assert all(
        torch.equal(suite[layer].encoder.weight, saes[layer].encoder.weight) for layer in suite
    )
    with pytest.raises(SAELoadError, match=r"No SAE for layer 4 .* available layers: \[1, 3, 5\]"):
        TopKSAE.from_pretrained(tmp_path, layer=4)


def test_dictionary_learning_layout_by_layer_and_k(tmp_path):
    weights = dlm_scope_release(tmp_path)
    sae = TopKSAE.from_pretrained(tmp_path, layer=16, k=8)
    assert (sae.layer, sae.k, sae.policy, sae.base_model) == (
        16,
        8,
        "mask",
        "GSAI-ML/LLaDA-8B-Base",
    )
    assert_same_math(sae, weights[16, 8], k=8)
    smallest = TopKSAE.from_pretrained(tmp_path, layer=1)
    assert smallest.k == 5
    assert_same_math(smallest, weights[1, 5])
    assert sorted(TopKSAE.load_suite(tmp_path, k=8)) == [1, 16]
    with pytest.raises(
        SAELoadError, match=r"No SAE with k=50 for layer 16 .* available k: \[5, 8\]"
    ):
        TopKSAE.from_pretrained(tmp_path, layer=16, k=50)
    with pytest.raises(SAELoadError, match=r"available layers: \[1, 16\]"):
        TopKSAE.from_pretrained(tmp_path, layer=6)
    with pytest.raises(SAELoadError, match=r"layers \[1, 16\]; pass layer="):
        TopKSAE.from_pretrained(tmp_path)


def test_dictionary_learning_ambiguous_folders_ask_for_subfolder(tmp_path):
    dlm_scope_release(tmp_path)
    shutil.copytree(
        tmp_path / "saes_mask_LLaDA-8B-Base_top_k", tmp_path / "saes_unmask_LLaDA-8B-Base_top_k"
    )
    with pytest.raises(SAELoadError, match="pass subfolder="):
        TopKSAE.from_pretrained(tmp_path, layer=1, k=5)
    assert (
        TopKSAE.from_pretrained(
            tmp_path, layer=1, k=5, subfolder="saes_unmask_LLaDA-8B-Base_top_k"
        ).k
        == 5
    )


def test_ae_pt_loads_weights_only(tmp_path):
    folder = tmp_path / "trainer_0"
    write_dictionary_learning(folder, raw_weights(), layer=1, k=K)
    state = torch.load(folder / "ae.pt", weights_only=True)
    state["extra"] = {"a callable": print}  # a pickle that weights_only must refuse
    torch.save(state, folder / "ae.pt")
    with pytest.raises(SAELoadError, match=r"ae\.pt with torch\.load\(weights_only=True\)"):
        TopKSAE.from_pretrained(folder)


def test_sparsify_layout(tmp_path):
    w = raw_weights(3)
    for layer in (2, 7):
        folder = tmp_path / f"layers.{layer}"
        folder.mkdir()
        cfg = {
            "expansion_factor": 4,
            "normalize_decoder": True,
            "num_latents": D_SAE,
            "k": K,
            "d_in": D_IN,
        }
        (folder / "cfg.json").write_text(json.dumps(cfg))
        save_file(
            {
                "encoder.weight": w["W_enc"],
                "encoder.bias": w["b_enc"],
                "W_dec": w["W_dec"],
                "b_dec": w["b_dec"],
            },
            folder / "sae.safetensors",
        )
    sae = TopKSAE.from_pretrained(tmp_path, layer=7)
    assert (sae.layer, sae.k) == (7, K)
    assert_same_math(sae, w)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_saelens_layout(tmp_path, apply_b_dec_to_input):
    w = raw_weights(4)
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none",
        "hook_name": "blocks.9.hook_resid_post",
        "model_name": "some-model",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {
            "W_enc": w["W_enc"].T.contiguous(),
            "b_enc": w["b_enc"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
        },
        tmp_path / "sae_weights.safetensors",
    )
    sae = TopKSAE.from_pretrained(tmp_path)
    assert (sae.layer, sae.base_model) == (9, "some-model")
    if apply_b_dec_to_input:
        assert_same_math(sae, w)
    else:  # SAELens then encodes x itself, not x - b_dec
        x = torch.randn(16, D_IN)
        pre = torch.relu(x @ w["W_enc"].T + w["b_enc"])
        acts, idx = pre.topk(K)
        expected = torch.zeros_like(pre).scatter(1, idx, acts) @ w["W_dec"] + w["b_dec"]
        torch.testing.assert_close(sae(x).reconstruction, expected, atol=1e-5, rtol=1e-5)


def test_missing_tensor_is_named(tmp_path):
    TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K).save_pretrained(tmp_path)
    state = {
        n: t for n, t in TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K).state_dict().items() if n != "b_dec"
    }
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(SAELoadError, match=r"model\.safetensors is missing \['b_dec'\]"):
        TopKSAE.from_pretrained(tmp_path)


def test_d_in_mismatch_is_named(tmp_path):
    folder = tmp_path / "trainer_0"
    write_dictionary_learning(folder, raw_weights(d_in=32), layer=1, k=K)
    config = json.loads((folder / "config.json").read_text())
    config["trainer"]["activation_dim"] = D_IN
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        SAELoadError, match=r"encoder\.weight has shape \(96, 32\), expected \(96, 24\)"
    ):
        TopKSAE.from_pretrained(folder)


def test_corrupt_files_are_named(tmp_path):
    TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(SAELoadError, match=r"Could not read .*model\.safetensors"):
        TopKSAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SAELoadError, match=r"Could not read .*config\.json"):
        TopKSAE.from_pretrained(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(SAELoadError, match="No SAE found"):
        TopKSAE.from_pretrained(tmp_path)
    with pytest.raises(SAELoadError, match="No such folder"):
        TopKSAE.from_pretrained(tmp_path / "nope")


def populate_hub_cache(cache: Path, repo_id: str, files_from: Path) -> None:
    """Lay out a hub cache entry (refs/main -> snapshot) as huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)


def test_loads_from_hub_cache_offline(tmp_path):
    weights = dlm_scope_release(tmp_path / "release")
    populate_hub_cache(
        tmp_path / "cache", "AwesomeInterpretability/llada-mask-topk-sae", tmp_path / "release"
    )
    sae = TopKSAE.from_pretrained(
        "AwesomeInterpretability/llada-mask-topk-sae", layer=16, cache_dir=tmp_path / "cache"
    )
    assert (sae.layer, sae.k) == (16, 5)
    assert_same_math(sae, weights[16, 5])

    make_suite(tmp_path / "suite")
    populate_hub_cache(tmp_path / "cache", "me/minilm-suite", tmp_path / "suite")
    suite = TopKSAE.load_suite("me/minilm-suite", cache_dir=tmp_path / "cache")
    assert sorted(suite) == [1, 3, 5]


# --- Folders written by the real libraries (the `bench` extra), loaded against their own math ---


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights in every parameter, decoder rows of uneven norm (0.5 to 2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            if name == "W_dec":
                p.mul_(
                    0.5 + 1.5 * torch.rand(p.shape[0], 1, generator=g) / p.norm(dim=1, keepdim=True)
                )


def assert_same_reconstruction(sae: TopKSAE, reference, x: torch.Tensor) -> None:
    """Our latents and reconstruction equal `reference(x)` = (dense latents, reconstruction)."""
    z, x_hat = reference(x)
    acts, idx = sae.encode(x)
    torch.testing.assert_close(torch.zeros_like(z).scatter(1, idx, acts), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x).reconstruction, x_hat, atol=1e-5, rtol=1e-5)


def saelens_reference(sae):
    def run(x):
        with torch.no_grad():
            z = sae.encode(x)
            return z, sae.decode(z)

    return run


def sparsify_reference(coder):
    def run(x):
        with torch.no_grad():
            out = coder.encode(x)
            z = torch.zeros(len(x), coder.num_latents).scatter(1, out.top_indices, out.top_acts)
            return z, coder.decode(out.top_acts, out.top_indices)

    return run


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_saelens_6_save_model_loads_exactly(tmp_path, rescale, apply_b_dec_to_input):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    cfg = sae_lens.TopKSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        apply_b_dec_to_input=apply_b_dec_to_input,
        rescale_acts_by_decoder_norm=rescale,
        metadata=SAEMetadata(model_name="some/model", hook_name="blocks.9.hook_resid_post"),
    )
    theirs = sae_lens.TopKSAE(cfg)
    randomize(theirs, seed=5)
    theirs.save_model(tmp_path / "sae")
    ours = TopKSAE.from_pretrained(tmp_path / "sae")
    assert (ours.layer, ours.base_model, ours.hookpoint, ours.k) == (
        9,
        "some/model",
        "resid_post",
        K,
    )
    assert_same_reconstruction(ours, saelens_reference(theirs), torch.randn(64, D_IN) * 2)


def test_sparsify_save_to_disk_loads_exactly_with_layer_and_model(tmp_path):
    pytest.importorskip("sparsify")
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig

    run = tmp_path / "run"
    coders = {}
    for seed, hookpoint in enumerate(["layers.3", "layers.16.mlp"]):
        coders[hookpoint] = SparseCoder(
            D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, multi_topk=True)
        )
        randomize(coders[hookpoint], seed)
        coders[hookpoint].save_to_disk(run / hookpoint)
    RunConfig(sae=SparseCoderConfig(k=K), model="some/model", hookpoints=list(coders)).save_json(
        run / "config.json"
    )
    assert TopKSAE.load_suite(run).keys() == {3, 16}
    ours = TopKSAE.from_pretrained(run, layer=16)
    assert (ours.layer, ours.base_model, ours.hookpoint) == (16, "some/model", "layers.16.mlp")
    assert_same_reconstruction(
        ours, sparsify_reference(coders["layers.16.mlp"]), torch.randn(64, D_IN)
    )
    assert TopKSAE.from_pretrained(run, layer=3).hookpoint == "resid_post"


@pytest.mark.parametrize(
    "flag, value", [("activation", "groupmax"), ("skip_connection", True), ("transcode", True)]
)
def test_sparsify_variants_are_refused_by_name(tmp_path, flag, value):
    pytest.importorskip("sparsify")
    from sparsify import SparseCoder, SparseCoderConfig

    SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, **{flag: value})).save_to_disk(
        tmp_path / "layers.2"
    )
    with pytest.raises(
        SAELoadError, match=rf"layers\.2/cfg\.json: {flag}={value!r} is not supported"
    ):
        TopKSAE.from_pretrained(tmp_path)


def test_saelens_jumprelu_is_refused_by_name(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")

    sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)).save_model(tmp_path)
    with pytest.raises(SAELoadError, match=r"cfg\.json: architecture='jumprelu' is not supported"):
        TopKSAE.from_pretrained(tmp_path)


# --- One hand-made fixture per refused flag (these run without the libraries) ---


def saelens_folder(folder: Path, **overrides) -> None:
    """A SAELens 6 TopK folder with `overrides` in its cfg.json."""
    w = raw_weights(6)
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": K,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.2.hook_resid_post"},
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({**w, "W_enc": w["W_enc"].T.contiguous()}, folder / "sae_weights.safetensors")


def sparsify_folder(folder: Path, **overrides) -> None:
    """A sparsify 1.3 folder with `overrides` in its cfg.json."""
    w = raw_weights(7)
    cfg = {"activation": "topk", "num_latents": D_SAE, "k": K, "d_in": D_IN, **overrides}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    state = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"]}
    save_file({**state, "b_dec": w["b_dec"]}, folder / "sae.safetensors")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("architecture", "batchtopk"),
        ("normalize_activations", "expected_average_only_in"),
        ("normalize_activations", "layer_norm"),
        ("reshape_activations", "hook_z"),
        ("hook_head_index", 3),
        ("finetuning_scaling_factor", True),
    ],
)
def test_saelens_flags_that_change_the_math_are_refused(tmp_path, flag, value):
    saelens_folder(tmp_path, **{flag: value})
    with pytest.raises(SAELoadError, match=rf"cfg\.json: {flag}={value!r} is not supported"):
        TopKSAE.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "flag, value", [("activation", "groupmax"), ("skip_connection", True), ("transcode", True)]
)
def test_sparsify_flags_that_change_the_math_are_refused(tmp_path, flag, value):
    sparsify_folder(tmp_path / "layers.1", **{flag: value})
    with pytest.raises(SAELoadError, match=rf"cfg\.json: {flag}={value!r} is not supported"):
        TopKSAE.from_pretrained(tmp_path)


def test_dictionary_learning_batch_topk_is_refused(tmp_path):
    folder = tmp_path / "trainer_0"
    write_dictionary_learning(folder, raw_weights(), layer=1, k=K)
    config = json.loads((folder / "config.json").read_text())
    config["trainer"].update(trainer_class="BatchTopKTrainer", dict_class="BatchTopKSAE")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        SAELoadError, match=r"config\.json: dict_class='BatchTopKSAE' is not supported"
    ):
        TopKSAE.from_pretrained(folder)


@pytest.mark.parametrize(
    "name, layer",
    [
        ("layers.16", 16),
        ("layers.16.mlp", 16),
        ("model.layers.7.self_attn", 7),
        ("blocks.9.hook_resid_post", 9),
        ("transformer.h.3", 3),
        ("encoder.layer.2.output", 2),
        ("resid_post_layer_16", 16),
        ("layer_3", 3),
        ("embed_tokens", None),
    ],
)
def test_layer_from_hookpoint(name, layer):
    assert layer_from_hookpoint(name) == layer


# --- Bad configs and weights: a clear error naming the file, before anything is allocated ---


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": 32.5}, "k must be a positive integer, got 32.5"),
        ({"k": True}, "k must be a positive integer, got True"),
        ({"k": "8"}, "k must be a positive integer, got '8'"),
        ({"k": None}, "k must be a positive integer, got None"),
        ({"d_in": MISSING}, "d_in must be a positive integer, got None"),
        ({"k": 200}, "k=200 must be smaller than d_sae=96"),
        ({"layer": "three"}, "layer must be a non-negative integer"),
    ],
)
def test_bad_config_values_are_named(tmp_path, change, message):
    TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not MISSING})
    )
    with pytest.raises(SAELoadError, match=rf"config\.json: .*{re.escape(message)}"):
        TopKSAE.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [(b"[1, 2]", "holds a JSON list"), (b"\x80\x81\xfe\xff" * 8, "Could not read")],
)
def test_config_that_is_no_json_object_is_named(tmp_path, content, message):
    TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(SAELoadError, match=rf"config\.json.*{message}|{message}.*config\.json"):
        TopKSAE.from_pretrained(tmp_path)


def test_huge_d_sae_fails_on_the_header_before_allocating(tmp_path):
    TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_sae": 10**12}))
    with pytest.raises(
        SAELoadError, match=r"encoder\.weight has shape \(96, 24\), expected \(1000000000000, 24\)"
    ):
        TopKSAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    sae = TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K)
    with torch.no_grad():
        sae.W_dec[3, 4] = bad
    sae.save_pretrained(tmp_path)
    with pytest.raises(SAELoadError, match=r"model\.safetensors: tensor W_dec holds NaN or Inf"):
        TopKSAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_or_bool_weights_are_refused_naming_tensor_dtype_and_file(tmp_path, dtype):
    sae = TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K)
    sae.save_pretrained(tmp_path / "ours")
    state = {n: t.contiguous() for n, t in sae.state_dict().items()}
    save_file({**state, "b_dec": state["b_dec"].to(dtype)}, tmp_path / "ours/model.safetensors")
    saelens_folder(tmp_path / "saelens")
    w = raw_weights(6)
    save_file(
        {**w, "W_enc": w["W_enc"].T.contiguous(), "W_dec": w["W_dec"].to(dtype)},
        tmp_path / "saelens/sae_weights.safetensors",
    )
    folder = tmp_path / "dl/trainer_0"
    write_dictionary_learning(
        folder, {**raw_weights(), "b_enc": torch.ones(D_SAE, dtype=dtype)}, 1, K
    )
    for root, name, file in [
        ("ours", "b_dec", "model.safetensors"),
        ("saelens", "W_dec", "sae_weights.safetensors"),
        ("dl", "encoder.bias", "ae.pt"),
    ]:
        with pytest.raises(
            SAELoadError, match=rf"{file}: tensor {name} has dtype {dtype}; SAE weights are floats"
        ):
            TopKSAE.from_pretrained(tmp_path / root)


def test_float64_weights_beyond_float32_are_refused(tmp_path):
    sae = TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K)
    sae.save_pretrained(tmp_path)
    state = {n: t.double().contiguous() for n, t in sae.state_dict().items()}
    state["W_dec"][0, 0] = 1e300
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(SAELoadError, match=r"model\.safetensors: tensor W_dec holds NaN or Inf"):
        TopKSAE.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "layout, flag",
    [
        ("saelens", "apply_b_dec_to_input"),
        ("saelens", "rescale_acts_by_decoder_norm"),
        ("sparsify", "skip_connection"),
        ("sparsify", "transcode"),
    ],
)
@pytest.mark.parametrize("value", ["false", "true", 0, None])
def test_booleans_must_be_json_booleans(tmp_path, layout, flag, value):
    """SAELens' "false" as a string would count as true: refused, naming the file and the key."""
    if layout == "saelens":
        saelens_folder(tmp_path, **{flag: value})
    else:
        sparsify_folder(tmp_path / "layers.1", **{flag: value})
    with pytest.raises(
        SAELoadError, match=rf"cfg\.json: {flag} must be true or false \(a JSON boolean\), got"
    ):
        TopKSAE.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"metadata": {"hook_name": 7}}, "hook_name must be a string"),
        ({"metadata": {"hook_name": ["blocks.2.hook_resid_post"]}}, "hook_name must be a string"),
        ({"metadata": {"model_name": 7}}, "base_model must be a string"),
        ({"metadata": [1]}, "metadata must be a JSON object"),
        (
            {"activation_fn_kwargs": "k=5", "k": MISSING},
            "activation_fn_kwargs must be a JSON object",
        ),
    ],
)
def test_bad_saelens_config_values_are_named(tmp_path, overrides, message):
    saelens_folder(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(
        json.dumps({k: v for k, v in {**cfg, **overrides}.items() if v is not MISSING})
    )
    with pytest.raises(SAELoadError, match=rf"cfg\.json: .*{re.escape(message)}"):
        TopKSAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("factor", ["32", [1], 0])
def test_bad_sparsify_expansion_factor_is_named(tmp_path, factor):
    """A list or string factor would be repeated d_in times before any check."""
    sparsify_folder(tmp_path / "layers.1", num_latents=None, expansion_factor=factor)
    with pytest.raises(SAELoadError, match=r"cfg\.json: expansion_factor must be a positive int"):
        TopKSAE.from_pretrained(tmp_path)


def test_bad_dictionary_learning_buffer_is_named(tmp_path):
    folder = tmp_path / "trainer_0"
    write_dictionary_learning(folder, raw_weights(), layer=1, k=K)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "buffer": ["mask"]}))
    with pytest.raises(SAELoadError, match=r"config\.json: buffer must be a JSON object"):
        TopKSAE.from_pretrained(folder)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"d_in": ' + "9" * 5000 + "}", r"Exceeds the limit \(4300 digits\)"),
    ],
)
def test_unreadable_json_names_the_file(tmp_path, text, message):
    """Python's own limits (recursion, digits of an int) are named with the file."""
    saelens_folder(tmp_path)
    (tmp_path / "cfg.json").write_text(text)
    with pytest.raises(SAELoadError, match=rf"cfg\.json.*{message}"):
        TopKSAE.from_pretrained(tmp_path)


# --- Hookpoints: what maps exactly onto a block's output is mapped; the rest is refused in use ---


@pytest.mark.parametrize(
    "hook, layer, hookpoint",
    [
        ("blocks.3.hook_resid_post", 3, "resid_post"),
        ("blocks.3.hook_resid_pre", 2, "resid_post"),  # the input of block 3 = output of block 2
        ("blocks.0.hook_resid_pre", 0, "blocks.0.hook_resid_pre"),  # the embedding output
        ("blocks.3.hook_mlp_out", 3, "blocks.3.hook_mlp_out"),
        ("blocks.3.hook_resid_mid", 3, "blocks.3.hook_resid_mid"),
    ],
)
@pytest.mark.parametrize("hook_layer", [False, True])
def test_saelens_hook_maps_to_a_block_output_or_keeps_its_name(
    tmp_path, hook, layer, hookpoint, hook_layer
):
    """SAELens before 6 also writes hook_layer (the block of the hook: 3 for resid_pre of 3)."""
    extra = {"hook_layer": layer_from_hookpoint(hook)} if hook_layer else {}
    saelens_folder(tmp_path, metadata={"hook_name": hook}, **extra)
    sae = TopKSAE.from_pretrained(tmp_path, layer=layer)
    assert (sae.layer, sae.hookpoint) == (layer, hookpoint)
    assert_same_math(sae, raw_weights(6))
    if hookpoint == "resid_post":
        assert sae.require_resid_post("The test") is sae
    else:
        with pytest.raises(ValueError, match=rf"The test .* reads {re.escape(repr(hook))}"):
            sae.require_resid_post("The test")


def test_sparsify_mlp_sae_is_refused_on_the_residual_stream(tmp_path):
    sparsify_folder(tmp_path / "layers.4.mlp")
    sae = TopKSAE.from_pretrained(tmp_path)
    assert (sae.layer, sae.hookpoint) == (4, "layers.4.mlp")
    with pytest.raises(
        ValueError,
        match=r"SAE-spliced evaluation applies SAEs to the residual stream after a block "
        r"\(resid_post\), but this SAE reads 'layers\.4\.mlp' of block 4.*hookpoint 'resid_post'",
    ):
        evaluate_suite(None, {(4, K): sae}, "mask", Corruption(), DataConfig(), 16)
    with pytest.raises(ValueError, match=r"collect_features applies .* reads 'layers\.4\.mlp'"):
        collect_features(None, {(4, K): sae}, "mask", Corruption(), DataConfig(), 16)

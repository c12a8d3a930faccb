"""Native LLaDA: checkpoint names, sharded loading, bidirectional attention, RoPE, padding."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
from pathlib import Path

import pytest
import torch

from hub_sae.models import is_llada, load_base_model
from hub_sae.models.llada import (
    LLaDAConfig,
    LLaDAModelLM,
    load_llada,
    load_llada_model,
    save_llada_model,
)
from hub_sae.models.native import INDEX_FILE, apply_rope, rope_cos_sin
from hub_sae.training.plan import model_shape
from tests.checkpoints import edit_shard

BLOCK_PARAMS = (
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attn_out",
    "ff_norm",
    "ff_proj",
    "up_proj",
    "ff_out",
)


def tiny_config(**overrides) -> LLaDAConfig:
    kwargs = dict(
        d_model=64,
        n_layers=3,
        n_heads=4,
        mlp_hidden_size=128,
        vocab_size=300,
        embedding_size=320,
        mask_token_id=299,
        eos_token_id=1,
        pad_token_id=1,
        max_sequence_length=64,
    )
    return LLaDAConfig(**{**kwargs, **overrides})


def tiny_model(**overrides) -> LLaDAModelLM:
    torch.manual_seed(0)
    model = LLaDAModelLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.1 * torch.randn_like(p)
                if name.endswith("norm.weight") or "ln_f" in name
                else p
            )
    return model.eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[LLaDAModelLM, Path]:
    model = tiny_model()
    save_llada_model(model, tmp_path, max_shard_size=200_000)
    return model, tmp_path


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(1))


def reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Turn each pair (x[i], x[i + hd/2]) at position t by t / theta^(2i/hd), as complex numbers."""
    hd, T = x.shape[-1], x.shape[-2]
    z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2 :].double())
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1).float()


def reference_block(
    block, x: torch.Tensor, config: LLaDAConfig, key_mask: torch.Tensor
) -> torch.Tensor:
    """One block with attention written out head by head: softmax(q k^T / sqrt(d) + mask) v."""

    def norm(h, w):
        return w * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    B, T, _ = x.shape
    H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
    h = norm(x, block.attn_norm.weight)
    q = (h @ block.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2)
    k = (h @ block.k_proj.weight.T).view(B, T, KV, hd).transpose(1, 2)
    v = (h @ block.v_proj.weight.T).view(B, T, KV, hd).transpose(1, 2)
    q, k = reference_rope(q, config.rope_theta), reference_rope(k, config.rope_theta)
    heads = []
    for head in range(H):
        kv = head // (H // KV)
        scores = q[:, head] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
    x = x + torch.cat(heads, dim=-1) @ block.attn_out.weight.T
    h = norm(x, block.ff_norm.weight)
    gate, up = h @ block.ff_proj.weight.T, h @ block.up_proj.weight.T
    return x + (gate * torch.sigmoid(gate) * up) @ block.ff_out.weight.T


def test_sharded_save_and_reload_is_exact(saved):
    model, path = saved
    assert len(list(path.glob("*.safetensors"))) >= 2 and (path / INDEX_FILE).is_file()
    loaded = load_llada_model(path, dtype=torch.float32)
    assert loaded.config == model.config
    x = ids(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_default_load_is_bfloat16_and_off_meta(saved):
    _, path = saved
    model = load_llada_model(path)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert model(ids(1, 5)).shape == (1, 5, 320)


def test_parameter_names_match_the_official_checkpoint(saved):
    _, path = saved
    official = {
        "model.transformer.wte.weight",
        "model.transformer.ln_f.weight",
        "model.transformer.ff_out.weight",
    }
    official |= {f"model.transformer.blocks.{i}.{p}.weight" for i in range(3) for p in BLOCK_PARAMS}
    assert set(load_llada_model(path).state_dict()) == official
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    assert set(weight_map) == official


INSTRUCT_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}
"""config.json of GSAI-ML/LLaDA-8B-Instruct (LLaDA-1.5 has the same keys and values)."""


def test_instruct_and_llada_1_5_config_json_loads(tmp_path):
    """The Instruct / 1.5 config names the remote code (auto_map) and options hub-sae checks."""
    assert LLaDAConfig.from_dict(INSTRUCT_CONFIG) == LLaDAConfig()
    (tmp_path / "config.json").write_text(json.dumps(INSTRUCT_CONFIG))
    assert is_llada(str(tmp_path))
    # LLaDA-8B's 8.02B parameters, counted on `meta` from this config.json
    assert model_shape(str(tmp_path)) == (8_015_581_184, 4096, 32, 12288)


def test_config_from_real_config_json_ignores_unknown_keys():
    real = {
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "mlp_hidden_size": 12288,
    }
    real |= {"block_type": "llama", "include_bias": False, "rope": True, "init_device": "meta"}
    config = LLaDAConfig.from_dict(real)
    assert config == LLaDAConfig()
    assert (
        config.rope_theta == 500000
        and config.mask_token_id == 126336
        and config.eos_token_id == 126081
    )
    assert LLaDAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="weight_tying"):
        LLaDAConfig.from_dict({"weight_tying": True})


def test_attention_is_bidirectional():
    model = tiny_model()
    x = ids(1, 10)
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % 300
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])


@pytest.mark.parametrize("theta, tol", [(500000.0, 1e-6), (10.0, 1e-5)])
def test_rope_matches_complex_rotation(theta, tol):
    """Angles are float32 as in LLaDA, so fast rotations (small theta) drift by ~1e-6 rad."""
    x = torch.randn(2, 4, 16, 32, generator=torch.Generator().manual_seed(2))
    rotated = apply_rope(x, *rope_cos_sin(torch.arange(16), 32, theta))
    torch.testing.assert_close(rotated, reference_rope(x, theta), atol=tol, rtol=tol)


def test_right_padding_leaves_real_positions_unchanged():
    model = tiny_model()
    short, long = ids(1, 7), ids(1, 10)
    batch = torch.cat((torch.cat((short, torch.ones(1, 3, dtype=torch.long)), dim=1), long))
    mask = torch.tensor([[1] * 7 + [0] * 3, [1] * 10])
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        torch.testing.assert_close(padded[0, :7], model(short)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(padded[1], model(long)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_block_matches_explicit_attention(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    config, block = model.config, model.blocks[1]
    x = torch.randn(2, 9, config.d_model)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 6:] = False
    with torch.no_grad():
        out = block(
            x,
            rope_cos_sin(torch.arange(9), config.head_dim, config.rope_theta),
            key_mask[:, None, None, :],
        )
        torch.testing.assert_close(
            out, reference_block(block, x, config, key_mask), atol=1e-5, rtol=0
        )


def test_forward_hook_on_a_block_replaces_resid_post():
    model = tiny_model()
    x = ids(1, 6)
    seen = {}

    def hook(module, args, output):
        seen["resid_post"] = output
        return torch.zeros_like(output)

    handle = model.blocks[2].register_forward_hook(hook)
    with torch.no_grad():
        hooked = model(x)
    handle.remove()
    assert seen["resid_post"].shape == (1, 6, 64)
    ln_f, head = model.model.transformer.ln_f, model.model.transformer.ff_out
    torch.testing.assert_close(hooked, head(ln_f(torch.zeros(1, 6, 64))).expand_as(hooked))


def test_shard_missing_a_tensor_names_it(saved):
    _, path = saved
    name = "model.transformer.blocks.0.q_proj.weight"
    shard = edit_shard(path, name, lambda tensors: tensors.pop(name))
    with pytest.raises(ValueError, match=rf"{name} \[64, 64\]: not in {shard}"):
        load_llada_model(path)


def test_mis_shaped_tensor_names_it_and_the_file(saved):
    _, path = saved
    name = "model.transformer.wte.weight"
    shard = edit_shard(path, name, lambda tensors: tensors.update({name: tensors[name][:-1]}))
    with pytest.raises(ValueError, match=rf"{name} in {shard} has shape \[319, 64\].*\[320, 64\]"):
        load_llada_model(path)


def test_unexpected_tensor_names_it(saved):
    _, path = saved
    extra = "model.transformer.wpe.weight"
    shard = edit_shard(
        path,
        "model.transformer.wte.weight",
        lambda tensors: tensors.update({extra: torch.zeros(2)}),
    )
    with pytest.raises(ValueError, match=rf"{shard} holds {extra}"):
        load_llada_model(path)


def test_missing_config_or_weights_is_a_clear_error(saved, tmp_path):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llada_model(path)
    with pytest.raises(FileNotFoundError, match="does-not-exist does not exist"):
        load_llada_model(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="llada-typo. is neither an existing local path"):
        load_llada_model("llada-typo")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_llada_model(empty)


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "hello", "world"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=words[0], eos_token=words[1]
    )
    tokenizer.save_pretrained(path)


def test_load_llada_fills_the_base_model(saved):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_llada(path)
    save_tokenizer(path)
    assert is_llada(str(path))
    base = load_base_model(str(path), dtype=torch.float32)
    assert (base.mask_token_id, base.bos_token_id, base.eos_token_id) == (299, 0, 1)
    assert (base.n_layers, base.d_model, base.max_length, base.has_lm_head) == (3, 64, 64, True)
    assert base.blocks is base.model.blocks
    input_ids = torch.tensor([base.tokenizer("hello world").input_ids])
    with torch.no_grad():
        assert base.run(input_ids, torch.ones_like(input_ids)).shape == (1, 2, 320)

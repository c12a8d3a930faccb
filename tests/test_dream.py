"""Native Dream: the forward against an implementation written from DESIGN.md (padded and not),
the official checkpoint and tokenizer layouts, loader errors, and planning without a download."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_sae.models import family, load_base_model
from hub_sae.models.dream import DreamConfig, load_dream, load_dream_model
from hub_sae.models.native import INDEX_FILE, rope_cos_sin
from hub_sae.training.plan import model_shape
from tests.checkpoints import DREAM_WORDS, edit_shard, write_tiny_dream
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_dream(tmp_path_factory.mktemp("dream"))


def official_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files, by name, in float64."""
    weights = {}
    for file in path.glob("*.safetensors"):
        weights |= {name: t.double() for name, t in load_file(file).items()}
    return weights


def reference(path: Path, ids: torch.Tensor, real: torch.Tensor) -> list[torch.Tensor]:
    """Dream as DESIGN.md states it, in float64 with loops: the output of every layer, then logits.

    A query and a key meet only when both are real; positions count real tokens (pads at 1); a
    query that meets no key (a pad) gets a zero attention output.
    """
    c = json.loads((path / "config.json").read_text())
    W = official_weights(path)
    H, KV, d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    hd, eps, B, T = d // H, c["rms_norm_eps"], *ids.shape
    positions = torch.ones(B, T, dtype=torch.float64)
    for b in range(B):
        count = 0
        for t in range(T):
            if real[b, t]:
                positions[b, t] = count
                count += 1

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rope(x):  # x [B, T, heads, hd]: pairs (i, i + hd/2) turn by position / theta^(2i/hd)
        angle = positions[:, :, None, None] * c["rope_theta"] ** (-torch.arange(0, hd, 2) / hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat(
            (x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), -1
        )

    meet = real[:, :, None] & real[:, None, :]
    x, outputs = W["model.embed_tokens.weight"][ids], []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        proj = {
            n: h @ W[f"{p}self_attn.{n}_proj.weight"].T + W[f"{p}self_attn.{n}_proj.bias"]
            for n in "qkv"
        }
        q = rope(proj["q"].view(B, T, H, hd))
        k, v = rope(proj["k"].view(B, T, KV, hd)), proj["v"].view(B, T, KV, hd)
        heads = []
        for head in range(H):
            g = head // (H // KV)  # grouped-query: H / KV query heads share a key/value head
            scores = torch.einsum("bqe,bke->bqk", q[:, :, head], k[:, :, g]) / math.sqrt(hd)
            weights = torch.softmax(scores.masked_fill(~meet, -math.inf), -1).nan_to_num(0.0)
            heads.append(torch.einsum("bqk,bke->bqe", weights, v[:, :, g]))
        x = x + torch.cat(heads, -1) @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        gate, up = h @ W[p + "mlp.gate_proj.weight"].T, h @ W[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ W[p + "mlp.down_proj.weight"].T
        outputs.append(x)
    head = W["model.embed_tokens.weight"] if c["tie_word_embeddings"] else W["lm_head.weight"]
    return [*outputs, rms(x, W["model.norm.weight"]) @ head.T]


def run_with_hooks(base, ids, mask) -> list[torch.Tensor]:
    """Each block's output (read by a forward hook, as hub-sae's harvesting does), then `run`."""
    seen = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(out)) for b in base.blocks]
    try:
        with torch.no_grad():
            logits = base.run(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    return [*seen, logits]


LAYOUTS = {
    "unpadded": [[1] * 9, [1] * 9],
    "right": [[1] * 6 + [0] * 3, [1] * 9],
    "left": [[0] * 4 + [1] * 5, [1] * 9],
    "mixed": [[0, 0] + [1] * 5 + [0, 0], [1] * 7 + [0, 0], [0] * 9],  # the last row is all padding
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_equals_the_design_reference(tiny, layout):
    base = load_dream(tiny, dtype=torch.float32)
    mask = torch.tensor(LAYOUTS[layout])
    ids = torch.randint(0, 24, mask.shape, generator=torch.Generator().manual_seed(3))
    ours = run_with_hooks(base, ids, mask)
    expected = reference(tiny, ids, mask.bool())
    assert len(ours) == len(expected) == base.n_layers + 1
    for got, want in zip(ours, expected, strict=True):
        assert got.isfinite().all()
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_row_equals_its_tokens_alone(tiny, side):
    """Positions count real tokens, so padding on either side changes no real position."""
    base = load_dream(tiny, dtype=torch.float32)
    short, other = (
        torch.tensor([[5, 9, 10, 11, 13]]),
        torch.tensor([[14, 15, 16, 17, 18, 19, 20, 5]]),
    )
    pads = torch.zeros(1, 3, dtype=torch.long)
    row = torch.cat((short, pads) if side == "right" else (pads, short), 1)
    real = torch.tensor([[1] * 5 + [0] * 3 if side == "right" else [0] * 3 + [1] * 5])
    with torch.no_grad():
        padded = base.run(torch.cat((row, other)), torch.cat((real, torch.ones_like(real))))
        alone = base.run(short)
    torch.testing.assert_close(padded[0][real[0].bool()], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1:], base.run(other), atol=1e-5, rtol=0)


def test_rope_positions_count_real_tokens(tiny):
    """RoPE is shift-invariant, so only rounding shows the positions: read them off the rotation
    each layer receives (pads at 1, as Dream's own sampler sets them)."""
    base = load_dream(tiny, dtype=torch.float32)
    mask = torch.tensor(LAYOUTS["mixed"])
    seen = []
    handle = base.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    with torch.no_grad():
        base.run(torch.zeros_like(mask), mask)
    handle.remove()
    positions = torch.tensor([[1, 1, 0, 1, 2, 3, 4, 1, 1], [0, 1, 2, 3, 4, 5, 6, 1, 1], [1] * 9])
    cos, sin = rope_cos_sin(positions, 8, 1e6)
    assert torch.equal(seen[0][0], cos[:, None]) and torch.equal(seen[0][1], sin[:, None])


def test_attention_is_bidirectional_and_logits_unshifted(tiny):
    base = load_dream(tiny, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 10, 11, 13, 14]])
    changed = ids.clone()
    changed[0, -1] = 15
    with torch.no_grad():
        a, b = base.run(ids), base.run(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first position sees the last token
    assert base.shifted and torch.equal(base.align(a)[:, 1:], a[:, :-1])


def test_bfloat16_padded_batch_is_finite_and_close(tiny):
    base = load_dream(tiny)  # bfloat16 by default
    assert all(p.dtype == torch.bfloat16 for p in base.model.parameters())
    mask = torch.tensor(LAYOUTS["mixed"])
    ids = torch.randint(0, 24, mask.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = base.run(ids, mask)
    exact = load_dream(tiny, dtype=torch.float32).run(ids, mask)
    assert logits.isfinite().all()
    real = mask.bool()
    assert (logits.float() - exact)[real].abs().max() < 0.1 * exact[real].abs().max()


def test_official_layout_loads_through_load_base_model(tiny):
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(3):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{n}_proj.{w}" for n in "qkv" for w in ("weight", "bias")}
        names |= {p + "self_attn.o_proj.weight"}
        names |= {f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    assert set(json.loads((tiny / INDEX_FILE).read_text())["weight_map"]) == names
    config = json.loads((tiny / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("Dream", ["DreamModel"])
    assert "auto_map" in config  # remote code is named, and never run
    assert family(str(tiny)) == "dream"
    base = load_base_model(str(tiny))
    assert (base.family, base.n_layers, base.d_model, base.max_length) == ("dream", 3, 32, 64)
    assert base.mask_token_id == DREAM_WORDS.index("<|mask|>") == base.tokenizer.mask_token_id
    assert base.bos_token_id == base.eos_token_id == DREAM_WORDS.index("<|endoftext|>")
    assert base.blocks is base.model.model.layers
    assert next(base.model.parameters()).dtype == torch.bfloat16


def test_single_file_and_tied_embeddings(tmp_path):
    path = write_tiny_dream(tmp_path, shard_size="1GB", tie_word_embeddings=True)
    assert (path / "model.safetensors").is_file() and not (path / INDEX_FILE).is_file()
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = load_dream_model(path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(
        logits.double(), reference(path, ids, ids > 0)[-1], atol=1e-4, rtol=1e-4
    )


def test_loader_errors_name_the_tensor_and_the_file(tmp_path):
    name = "model.layers.1.self_attn.k_proj.bias"
    path = write_tiny_dream(tmp_path / "missing")
    shard = edit_shard(path, name, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"{name} \[16\]: not in {shard}"):
        load_dream_model(path)
    path = write_tiny_dream(tmp_path / "shape")
    shard = edit_shard(path, name, lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(ValueError, match=rf"{name} in {shard} has shape \[15\].*\[16\]"):
        load_dream_model(path)
    path = write_tiny_dream(tmp_path / "extra")
    extra = "model.layers.0.mlp.gate_proj.bias"
    shard = edit_shard(path, name, lambda t: t.update({extra: torch.zeros(64)}))
    with pytest.raises(ValueError, match=rf"{shard} holds {extra}, which Dream has no parameter"):
        load_dream_model(path)


def test_shards_may_be_links_but_must_sit_in_the_folder(tmp_path):
    path = write_tiny_dream(tmp_path / "d")
    snapshot = tmp_path / "snapshot"  # a hub cache links every file of a snapshot to a blob
    snapshot.mkdir()
    for file in path.iterdir():
        (snapshot / file.name).symlink_to(file)
    assert load_dream_model(snapshot).config.num_hidden_layers == 3
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = "gone.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="names gone.safetensors, which is missing"):
        load_dream_model(path)
    index["weight_map"]["lm_head.weight"] = "../outside.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="weight_map of tensor name -> shard file"):
        load_dream_model(path)


def test_missing_files_and_bad_configs_are_named(tmp_path):
    path = write_tiny_dream(tmp_path / "d")
    (path / "tokenizer.json").unlink()
    with pytest.raises(
        FileNotFoundError, match="no tokenizer .*vocab.json and merges.txt from Dream"
    ):
        load_dream(path)
    (path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_dream(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json: a Dream checkpoint folder"):
        load_dream_model(path)
    for bad, message in [
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"num_attention_heads": 0}, "num_attention_heads=0"),
        ({"num_key_value_heads": 3}, "divisible"),
        ({"mask_token_id": 24}, "mask_token_id=24"),
        ({"rope_theta": "1e6"}, "rope_theta > 0"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps in"),
    ]:
        (path / "config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(ValueError, match=message):
            load_dream_model(path)


def test_official_tokenizer_files_load_without_tokenizer_json(tmp_path):
    """Dream's repos ship vocab.json + merges.txt for a remote DreamTokenizer (a Qwen2 copy)."""
    path = write_tiny_dream(tmp_path)
    (path / "tokenizer.json").unlink()
    vocab = {"<|endoftext|>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "ll": 6, "hell": 7}
    vocab |= {"hello": 8, "Ġ": 9, "w": 10, "r": 11, "d": 12}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nh e\nl l\nhe ll\nhell o\n")
    added = {
        str(i): {"content": t, "special": True} for i, t in [(0, "<|endoftext|>"), (13, "<|mask|>")]
    }
    config = json.loads((path / "tokenizer_config.json").read_text())
    config |= {
        "added_tokens_decoder": added,
        "mask_token": "<|mask|>",
        "pad_token": "<|endoftext|>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_dream(path, dtype=torch.float32).tokenizer
    assert tokenizer("hello world<|mask|>", add_special_tokens=False).input_ids == [
        8,
        9,
        10,
        4,
        11,
        3,
        12,
        13,
    ]
    assert tokenizer.chat_template == config["chat_template"]


def test_no_code_path_can_ask_to_trust_remote_code():
    """Remote code is never run or asked about: no module passes trust_remote_code (other than
    False, which makes transformers refuse instead of asking)."""
    sources = [*ROOT.glob("hub_sae/**/*.py"), *ROOT.glob("training/**/*.py")]
    sources += ROOT.glob("space/*.py")
    trusting = re.compile(r"trust_remote_code(?!\s*=\s*False\b)")
    assert sources and not [p for p in sources if trusting.search(p.read_text())]


def test_plan_knows_dream_7b_without_a_download(tiny):
    """Qwen2.5-7B's published parameter count (7.62B), which Dream-v0-Base-7B shares."""
    assert model_shape("Dream-org/Dream-v0-Base-7B") == (7_615_616_512, 3584, 28, 18944)
    assert model_shape(str(tiny)).params == sum(
        p.numel() for p in load_dream_model(tiny).parameters()
    )
    assert DreamConfig.from_dict(DreamConfig().to_dict()) == DreamConfig()


def test_dream_recipe_plans_offline():
    config = ROOT / "training" / "configs" / "dream-7b-mask.yaml"
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(config)]
    out = subprocess.run([*cmd, "--plan", "--json", "--num_processes", "8"], capture_output=True)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    result = json.loads(out.stdout)
    assert result["model"] == "Dream-org/Dream-v0-Base-7B" and result["saes"] == 36
    modules = result["modes"]["modules"]
    assert modules["base_model"] == 2 * 7_615_616_512  # bfloat16
    assert modules["tokens_per_sae_per_step"] == 8 * 2048
